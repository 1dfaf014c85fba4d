#!/usr/bin/env bash
# GPU validation on a Linux machine with one NVIDIA GPU:
#   bash benchmarks/gpu_check.sh OUTDIR
# Python: $PYTHON if set, else python3 when it imports torch and triton (the lent GPU machines have a
# preinstalled stack and no network: the project's pins do not apply there and nothing is downloaded),
# else a venv with the pinned stack from PyPI. The package is installed editable (building the C++/CUDA
# extension for sm_90; if that build fails, once more without the extension so the Triton checks still run).
# Writes at most 7 files into OUTDIR (the device tool returns 8 at most):
#   status.txt            one line per stage: name, exit code, seconds
#   env.txt               date, git sha, nvidia-smi, python/torch/triton versions, python -m threeg_kernels
#   install.txt           the install / extension build log
#   tests_cuda.txt        pytest -m cuda (the CUDA tests of every test file, tests/test_triton.py included;
#                         launch-config tuning off except in tests/test_tuning.py, to spare compile time)
#   pool_speed.json       python -m benchmarks.pool_speed at B in {64, 256}, C=256, N=196, K=5
#   triton_modes.json     built-in timing: every backend, and triton in each precision mode, fwd+bwd,
#                         torch.cuda.Event p20/p50/p80 ms and max_memory_allocated, the launch config
#                         the tuner (threeg_kernels/ops/tuning.py) chose per shape with each candidate's time,
#                         and a summary: triton at B=256 per mode, x vs reference / torch, TF32-roofline share
#   timings.txt           the printed tables of pool_speed, triton_modes and benchmarks.keep_vs_recompute
#                         (B=256: keep the iterates or recompute them)
# A failing stage is recorded in status.txt and the next one still runs. Estimated (never run yet): install
# 1-3 min (the extension's CUDA build), tests 2-3 min, timings 3-4 min (the tuner's first compilations
# included); every stage has its own timeout.
set -uo pipefail
export PYTHONUNBUFFERED=1

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1
STATUS="$OUT/status.txt"
: > "$STATUS"

stage() {  # stage NAME TIMEOUT_S LOGFILE CMD...: runs CMD with a timeout, appends its output to LOGFILE
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS rc
    echo "== $name" | tee -a "$log" >&2
    timeout "$limit" "$@" > >(tee -a "$log") 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$STATUS" >&2
    return "$rc"
}

# --- 1. environment ---------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # one architecture: half the extension's build
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif python3 -c "import torch, triton" 2>/dev/null; then
    PY=$(command -v python3)
else
    VENV=${VENV:-.venv-gpu}
    PY="$VENV/bin/python"
    if [[ ! -x "$PY" ]]; then
        python3 -m venv "$VENV" || exit 1
    fi
    stage pip_stack 420 "$OUT/install.txt" bash -c "
        set -e
        '$PY' -m pip install --quiet --upgrade pip
        '$PY' -m pip install --quiet torch==2.14.1 torchvision==0.29.1
        '$PY' -m pip install --quiet -r requirements-dev.txt
    " || { echo "installing the pinned stack failed: see $OUT/install.txt" >&2; exit 1; }
fi
if ! stage install 420 "$OUT/install.txt" "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    stage install_without_ext 180 "$OUT/install.txt" env THREEG_BUILD_EXT=0 \
        "$PY" -m pip install --no-build-isolation --no-deps -e . \
        || { echo "install failed: see $OUT/install.txt" >&2; exit 1; }
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "host: $(uname -a)"
    echo "python: $PY"
    "$PY" -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    nvidia-smi || echo "nvidia-smi failed"
} >> "$OUT/env.txt" 2>&1

stage backends 120 "$OUT/env.txt" "$PY" -m threeg_kernels

# --- 2. CUDA tests ----------------------------------------------------------------------------------
stage tests_cuda 300 "$OUT/tests_cuda.txt" env THREEG_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --durations=10

# --- 3. timings -------------------------------------------------------------------------------------
if [[ -f benchmarks/pool_speed.py ]]; then
    stage pool_speed 240 "$OUT/timings.txt" "$PY" -m benchmarks.pool_speed --device cuda \
        --B 64 256 --C 256 --N 196 --iters 5 --json "$OUT/pool_speed.json"
fi

stage triton_modes 300 "$OUT/timings.txt" "$PY" - "$OUT/triton_modes.json" <<'EOF'
"""Every backend and each triton precision mode, fwd+bwd, B in {64, 256}, C=256, N=196, K=5."""
import json
import sys

import torch

import threeg_kernels
from benchmarks.timing import percentiles

device = torch.device("cuda")
records = []


def measure(backend, precision, b, c=256, n=196, iters=5, repeats=20):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, n, device=device, generator=gen).requires_grad_()
    w = (torch.rand(b, n, device=device, generator=gen) + 0.1).requires_grad_()
    grad = torch.randn(b, c * (c + 1) // 2, device=device, generator=gen)

    def step():
        out = threeg_kernels.cov_pool(x, w, iters=iters, backend=backend, precision=precision)
        torch.autograd.grad(out, (x, w), grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    p20, p50, p80 = percentiles(times)
    return dict(op="cov_pool", backend=backend, precision=precision, mode="fwd+bwd", B=b, C=c, N=n, K=iters,
                dtype="float32", ms_p20=p20, ms_p50=p50, ms_p80=p80,
                peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20,
                device_name=torch.cuda.get_device_name(device), torch_version=torch.__version__)


runs = [(name, "ieee") for name in threeg_kernels.available_backends(device)]
if "triton" in threeg_kernels.available_backends(device):
    runs += [("triton", "tf32x3"), ("triton", "tf32"), ("triton", "bf16")]
for b in (64, 256):
    for backend, precision in runs:
        try:
            rec = measure(backend, precision, b)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next backend
            rec = dict(backend=backend, precision=precision, B=b, error=f"{type(exc).__name__}: {exc}")
        records.append(rec)
        print(json.dumps(rec), flush=True)
try:
    from threeg_kernels.ops import tuning
    tuned = tuning.tuned()
except ImportError as exc:
    tuned = f"ImportError: {exc}"

# The numbers issue 3 asks for: triton at B=256 against "reference" and "torch" of the same run, and the
# fraction of the TF32 roofline for the symmetry-minimal work (benchmarks/flops.py, ~220 GFLOP).
from benchmarks.flops import cov_pool_flops

TF32_PEAK = 495e12  # H100 SXM dense TF32 (shared/PERFORMANCE.md)
ms = {(r["backend"], r["precision"], r["B"]): r.get("ms_p50") for r in records}
summary = []
for precision in ("ieee", "tf32x3", "tf32", "bf16"):
    t = ms.get(("triton", precision, 256))
    if t is None:
        continue
    ref, tor = ms.get(("reference", "ieee", 256)), ms.get(("torch", "ieee", 256))
    summary.append(dict(precision=precision, B=256, C=256, N=196, K=5, ms_p50=t,
                        x_vs_reference=ref / t if ref else None, x_vs_torch=tor / t if tor else None,
                        tf32_roofline_fraction=cov_pool_flops(256, 256, 196, 5, "full") / (t * 1e-3) / TF32_PEAK,
                        target_1ms_met=t <= 1.0))
    print("summary", json.dumps(summary[-1]), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(dict(summary=summary, records=records, tuned=tuned), f, indent=1)
EOF

stage keep_vs_recompute 150 "$OUT/timings.txt" "$PY" -m benchmarks.keep_vs_recompute --device cuda \
    --B 256 --C 256 --N 196 --iters 5 --rounds 5

echo "done: results in $OUT" >&2
cat "$STATUS" >&2
