#!/usr/bin/env bash
# GPU validation on a Linux machine with one NVIDIA GPU:
#   bash benchmarks/gpu_check.sh OUTDIR
# Python: $PYTHON if set, else python3 when it imports torch and triton (a GPU machine with a preinstalled
# stack and no network: the project's pins do not apply there and nothing is downloaded), else a venv with
# the pinned stack from PyPI. The package is installed editable (building the C++/CUDA extension for sm_90;
# if that build fails, once more without the extension so the Triton checks still run).
# Writes 7 files into OUTDIR:
#   status.txt            one line per stage: name, exit code, seconds
#   env.txt               date, git sha, nvidia-smi, python/torch/triton versions, python -m threeg_kernels
#   install.txt           the install / extension build log
#   tests_cuda.txt        pytest -m cuda (the CUDA tests of every test file, tests/test_triton.py included;
#                         launch-config tuning off except in tests/test_tuning.py, to spare compile time)
#   pool_speed.json       python -m benchmarks.pool_speed at B in {64, 256}, C=256, N=196, K=5: every backend
#                         and every baseline, fwd / bwd / fwd+bwd
#   triton_modes.json     the triton backend in each precision mode, fwd+bwd, B in {64, 256} (pool_speed's
#                         records), the launch config the tuner (threeg_kernels/triton_kernels/tuning.py) chose
#                         per shape with each candidate's time, and a summary: triton at B=256 per mode,
#                         x vs reference / torch (from pool_speed.json), share of the TF32 tensor-core peak
#   timings.txt           the printed tables of the three pool_speed runs, the third one keep vs recompute
#                         of the Newton-Schulz iterates at B=256 (--iterates keep recompute)
# A failing stage is recorded in status.txt and the next one still runs. Estimated, not measured: install
# 1-3 min (the extension's CUDA build), tests 2-3 min, timings 3-5 min (the tuner's first compilations
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
SHAPE=(--device cuda --C 256 --N 196 --iters 5 --no-progress)
stage pool_speed 240 "$OUT/timings.txt" "$PY" -m benchmarks.pool_speed "${SHAPE[@]}" --B 64 256 \
    --json "$OUT/pool_speed.json"

stage triton_modes 300 "$OUT/timings.txt" "$PY" - "$OUT/triton_modes.json" "$OUT/pool_speed.json" <<'EOF'
"""The triton backend in each precision mode, fwd+bwd, B in {64, 256}, C=256, N=196, K=5; the tuner's choices."""
import json
import sys
from pathlib import Path

from benchmarks import pool_speed

out_path, pool_json = sys.argv[1], Path(sys.argv[2])
records = pool_speed.main(
    ["--device", "cuda", "--C", "256", "--N", "196", "--iters", "5", "--no-progress", "--B", "64", "256"]
    + ["--backends", "triton", "--precision", "ieee", "tf32x3", "tf32", "bf16", "--modes", "full", "--baselines"]
)
try:
    from threeg_kernels.triton_kernels import tuning

    tuned = tuning.tuned()
except ImportError as exc:
    tuned = f"ImportError: {exc}"

# triton at B=256 against 'reference' and 'torch' of the pool_speed stage, and the share of the TF32
# tensor-core peak that the symmetry-minimal work (benchmarks/flops.py: 220.6 GFLOP) in the measured time is.
TF32_PEAK = 495e12  # NVIDIA H100 / H200 SXM, dense TF32 tensor-core peak (989 TFLOP/s is with sparsity)
others = json.loads(pool_json.read_text()) if pool_json.is_file() else []
ieee = {
    r["backend"]: r["ms_p50"]
    for r in others
    if (r["kind"], r["mode"], r["B"], r["dtype"], r["precision"], r["iterates"])
    == ("backend", "full", 256, "float32", "ieee", "default")
}
ref, tor = ieee.get("reference"), ieee.get("torch")
summary = []
for r in records:
    if r["B"] == 256:
        t = r["ms_p50"]
        summary.append(dict(precision=r["precision"], B=256, C=256, N=196, K=5, ms_p50=t,
                            x_vs_reference=ref / t if ref else None, x_vs_torch=tor / t if tor else None,
                            tf32_peak_fraction=r["tflops"] * 1e12 / TF32_PEAK))
        print("summary", json.dumps(summary[-1]), flush=True)
with open(out_path, "w") as f:
    json.dump(dict(summary=summary, records=records, tuned=tuned), f, indent=1)
EOF

stage keep_vs_recompute 180 "$OUT/timings.txt" "$PY" -m benchmarks.pool_speed "${SHAPE[@]}" --B 256 \
    --modes full --baselines --iterates keep recompute

echo "done: results in $OUT" >&2
cat "$STATUS" >&2
