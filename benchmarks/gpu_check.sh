#!/usr/bin/env bash
# GPU validation on a Linux machine with one NVIDIA GPU, in two commands, each within 8 minutes on an H200
# with a cold Triton cache (a budget of 450 s of its own; stages that would start with too little time left
# are skipped and say so):
#   bash benchmarks/gpu_check.sh correctness OUT_DIR [--dry] [--budget SECONDS]
#   bash benchmarks/gpu_check.sh speed OUT_DIR [--dry] [--budget SECONDS]
#
# correctness, budgets per stage on an H200:
#   env 30 s          env.txt: date, git, nvidia-smi, versions, `python -m threeg_kernels`
#   build 180 s       the extension for this GPU's architecture only, in the background (build.log); reused
#                     when the sources have not changed; if it fails, backend 'ext' is missing and the
#                     results say so
#   backends 240 s    correctness.jsonl: every backend and precision mode against the float64 reference
#                     at (B, C, N) = (64, 256, 196), (2, 7, 5), (3, 100, 49), (2, 33, 50), K = 5, weighted,
#                     plus recompute, unweighted, 'mpncov', K = 1 and 2, float64; one process per backend
#                     (per precision mode for triton), all at once, tuning off (THREEG_TRITON_AUTOTUNE=0)
#   tests_cuda rest   tests_cuda.log: `pytest -m cuda` (-n 8 with pytest-xdist), tuning off, from the end
#                     of the build on
# speed:
#   env 30 s, hbm 20 s (hbm.jsonl: copy bandwidth), build 180 s (in the background until the timings start)
#   warm 150 s        warm.jsonl: each triton precision mode's first fwd+bwd, one process each, at once
#   pool_speed 240 s  speed.jsonl, timings.txt: `python -m benchmarks.pool_speed` fwd/bwd/fwd+bwd at B=32
#                     and 256, C=256, N=196, K=5, every backend and triton precision mode, keep and
#                     recompute, tuning off; one process per (backend, mode)
#   profile 60 s      profile.jsonl: torch.profiler per triton kernel at B=256, with the FLOPs and bytes of
#                     benchmarks/flops.py (achieved TFLOP/s and GB/s)
#   cold_start 120 s  cold_start.jsonl: tuning on, first call vs the calls after (empty, then filled cache)
#   baselines 30 s    speed.jsonl: isqrt-style, autograd-style, eigh at B=32 and 256
# Every result is appended as it is made (JSON lines), so a run cut short keeps what it did; status.jsonl
# has one line per stage (status, seconds, budget), summary.md the tables. benchmarks/gpu_check.py is the
# driver; docs/benchmark.md describes the files.
#
# --dry (or THREEG_GPU_CHECK_DRY=1): the same stages on CPU with tiny shapes (triton under
# TRITON_INTERPRET=1, no build), two processes at a time: a test of the plumbing, a few minutes.
#
# Python: $PYTHON if set, else python3 when it imports torch (a GPU machine with a preinstalled stack and
# no network), else .venv/bin/python. Nothing is installed or fetched; the package runs from this checkout.
set -uo pipefail

if [[ $# -lt 2 || ( $1 != correctness && $1 != speed ) ]]; then
    echo "usage: bash benchmarks/gpu_check.sh {correctness|speed} OUT_DIR [--dry] [--budget SECONDS]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "$2" && cd "$2" && pwd) || exit 1
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif python3 -c "import torch" 2>/dev/null; then
    PY=$(command -v python3)
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY=$ROOT/.venv/bin/python
else
    echo "no Python with torch: set PYTHON" >&2
    exit 1
fi
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$1" "$OUT" "${@:3}"
