#!/usr/bin/env bash
# GPU validation on a bare Linux machine with one NVIDIA GPU (PyPI reachable, nothing else needed):
#   bash benchmarks/gpu_check.sh OUTDIR
# Sets up a venv (or reuses $VENV), installs the pinned stack and this package, then writes into OUTDIR:
#   env.txt               date, git sha, nvidia-smi, python/torch/triton versions
#   backends.txt          python -m threeg_kernels
#   tests_cuda.txt        pytest -m cuda (the CUDA tests of every test file, tests/test_triton.py included;
#                         launch-config tuning off except in tests/test_tuning.py, to spare compile time)
#   pool_speed.json/.txt  python -m benchmarks.pool_speed at B in {64, 256}, C=256, N=196, K=5 (when present)
#   triton_modes.json     built-in timing: every backend, and triton in each precision mode, fwd+bwd,
#                         torch.cuda.Event p20/p50/p80 ms and max_memory_allocated, and the launch config
#                         the tuner (threeg_kernels/ops/tuning.py) chose per shape with each candidate's time
#   keep_vs_recompute.txt python -m benchmarks.keep_vs_recompute at B=256 (keep the iterates or recompute them)
# A failing stage is recorded (status.txt) and the next one still runs. Budget: well under 10 minutes
# (install ~3 min, tests ~2-3 min, timings ~2 min); every stage has its own timeout.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1
VENV=${VENV:-.venv-gpu}
PY="$VENV/bin/python"
STATUS="$OUT/status.txt"
: > "$STATUS"

stage() {  # stage NAME TIMEOUT_S LOGFILE CMD...: runs CMD with a timeout, tees its log, records its status
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS rc
    echo "== $name" >&2
    timeout "$limit" "$@" > >(tee "$log") 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$STATUS" >&2
    return "$rc"
}

# --- 1. environment ---------------------------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV" || exit 1
fi
stage install 420 "$OUT/install.txt" bash -c "
    set -e
    '$PY' -m pip install --quiet --upgrade pip
    '$PY' -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    '$PY' -m pip install --quiet -r requirements-dev.txt
    '$PY' -m pip install --quiet --no-build-isolation -e .
" || { echo "install failed: see $OUT/install.txt" >&2; exit 1; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "host: $(uname -a)"
    "$PY" -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    nvidia-smi || echo "nvidia-smi failed"
} > "$OUT/env.txt" 2>&1

stage backends 120 "$OUT/backends.txt" "$PY" -m threeg_kernels

# --- 2. CUDA tests ----------------------------------------------------------------------------------
stage tests_cuda 300 "$OUT/tests_cuda.txt" env THREEG_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --durations=10

# --- 3. timings -------------------------------------------------------------------------------------
if [[ -f benchmarks/pool_speed.py ]]; then
    stage pool_speed 240 "$OUT/pool_speed.txt" "$PY" -m benchmarks.pool_speed --device cuda \
        --B 64 256 --C 256 --N 196 --iters 5 --json "$OUT/pool_speed.json"
fi

stage triton_modes 240 "$OUT/triton_modes.txt" "$PY" - "$OUT/triton_modes.json" <<'EOF'
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
with open(sys.argv[1], "w") as f:
    json.dump(dict(records=records, tuned=tuned), f, indent=1)
EOF

stage keep_vs_recompute 150 "$OUT/keep_vs_recompute.txt" "$PY" -m benchmarks.keep_vs_recompute --device cuda \
    --B 256 --C 256 --N 196 --iters 5 --rounds 5

echo "done: results in $OUT" >&2
cat "$STATUS" >&2
