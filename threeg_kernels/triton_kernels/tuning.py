"""Launch settings per problem shape: timed on the GPU at first use, one fixed setting under the interpreter.

One LaunchConfig (_tiles.py: output tile side, reduction step, N tile, warps, pipeline stages) serves every
kernel of one cov_pool call; `config_for` picks it.

- Under TRITON_INTERPRET=1 (or with tuning off): `_tiles.launch_config`, the untuned default. Under the
  interpreter every (program x reduction step) costs the same whatever its size, so there is nothing to tune.
- On a GPU, the first call for a key (device, B, C, N, K, weighted, dtype, precision) runs the whole head,
  forward and backward (head.py, keeping the iterates), on random inputs of that shape for each config of
  `candidates`: one warm-up run (which compiles), then REPEATS runs timed with CUDA events. The config with
  the lowest median time is kept for the key, for the life of the process. A candidate that fails to
  compile or launch (for example out of shared memory on a smaller GPU) is skipped and its error recorded;
  if every candidate fails the error says so.
- Cost: Triton caches compiled kernels on disk and no kernel depends on B, so the first shape a machine sees
  pays the compilation of every candidate (about a dozen kernels each: seconds), later processes and new
  batch sizes only the timing runs (milliseconds).
- THREEG_TRITON_AUTOTUNE=0 in the environment turns tuning off.
- CUDA graphs: while a stream is being captured, a key that was never tuned uses the default and is not
  cached (tuning cannot run inside a capture). Make one eager call of the same shape before capturing to
  capture the tuned kernels.

The choice changes results only at the level of rounding (the order of summation of block_k-deep steps).
`tuned()` lists every choice made in this process with the time of each candidate (benchmarks/gpu_check.sh
records it). The candidate list is a guess: no GPU has timed it yet (docs/triton.md).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import triton

from ._tiles import INTERPRET, LaunchConfig, launch_config
from .head import head_backward, head_forward

ENV = "THREEG_TRITON_AUTOTUNE"
REPEATS = 5

# (block, block_k, block_n, num_warps, num_stages) tried after the default, capped to the problem's size:
# those that compile for sm_90 with at most a few tens of bytes of register spills in one kernel
# (tests/triton_compile_check.py --candidates, docs/triton.md); 128-wide tiles (1.5-29 KB over the kernels of a
# call) and 4-warp 64-wide tiles (0.3-1.4 KB, in the backward iteration) are left out. The default's deeper
# pipeline (3 stages in "ieee", 2 in float64) spills a few bytes and is tried here.
_SHAPES = {
    "ieee": [(64, 16, 32, 8, 3), (32, 16, 32, 4, 3), (64, 32, 32, 8, 2), (32, 32, 32, 4, 3)],  # fp32 FMA products
    "tensor": [(64, 32, 32, 8, 3), (32, 32, 32, 4, 3), (64, 32, 64, 8, 4)],  # tf32 / tf32x3 / bf16 inputs
    "float64": [(32, 16, 32, 4, 2), (16, 16, 16, 4, 2), (64, 16, 32, 8, 2)],
}


class Key(NamedTuple):
    """What a tuning decision is kept for."""

    device: torch.device
    B: int
    C: int
    N: int
    iters: int
    weighted: bool
    dtype: torch.dtype
    precision: str


@dataclass
class TuneRecord:
    """One tuning decision: the key, the config kept, and what each candidate did."""

    key: tuple
    chosen: LaunchConfig
    times_ms: dict = field(default_factory=dict)  # LaunchConfig -> median ms of forward + backward
    errors: dict = field(default_factory=dict)  # LaunchConfig -> "ExceptionType: first line"

    def as_dict(self) -> dict:
        return dict(
            zip(Key._fields, (str(k) for k in self.key)),
            chosen=dataclasses.asdict(self.chosen),
            candidates=[dict(dataclasses.asdict(cfg), ms=ms) for cfg, ms in self.times_ms.items()]
            + [dict(dataclasses.asdict(cfg), error=err) for cfg, err in self.errors.items()],
        )


_TUNED: dict[tuple, TuneRecord] = {}
_LOCK = threading.Lock()


def enabled() -> bool:
    """False when THREEG_TRITON_AUTOTUNE=0."""
    return os.environ.get(ENV, "1").strip() != "0"


def candidates(c: int, n: int, dtype: torch.dtype, precision: str) -> list[LaunchConfig]:
    """The configs tried for C channels and N positions: the default first, then larger and smaller tiles,
    each tile side capped at the (power-of-two) size of the problem, duplicates dropped."""
    default = launch_config(c, n, dtype, precision)
    if INTERPRET:
        return [default]
    cap_c = max(16, triton.next_power_of_2(c))
    cap_n = max(16, triton.next_power_of_2(n))
    if dtype == torch.float64:
        shapes = _SHAPES["float64"]
    else:
        shapes = _SHAPES["ieee" if default.precision == "ieee" else "tensor"]
    out = [default]
    for block, block_k, block_n, warps, stages in shapes:
        cfg = LaunchConfig(min(block, cap_c), min(block_k, cap_c), min(block_n, cap_n), warps, stages,
                           default.precision, default.emulate)
        if cfg not in out:
            out.append(cfg)
    return out


def choose(key: tuple, configs: list[LaunchConfig], measure: Callable[[LaunchConfig], float]) -> TuneRecord:
    """Times each config with measure(cfg) -> ms and returns the fastest (ties: the earlier, so the default)."""
    record = TuneRecord(key, configs[0])
    for cfg in configs:
        try:
            record.times_ms[cfg] = float(measure(cfg))
        except Exception as exc:  # noqa: BLE001 - a config this GPU cannot run is skipped, with its reason
            lines = str(exc).strip().splitlines()
            record.errors[cfg] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if not record.times_ms:
        detail = "; ".join(f"{cfg}: {err}" for cfg, err in record.errors.items())
        raise RuntimeError(f"threeg_kernels: every Triton launch config failed for {key}: {detail}")
    record.chosen = min(record.times_ms, key=record.times_ms.get)
    return record


def _gpu_measure(b: int, c: int, n: int, iters: int, weighted: bool, dtype: torch.dtype,
                 device: torch.device) -> Callable[[LaunchConfig], float]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, n, device=device, dtype=dtype, generator=gen)
    w = torch.rand(b, n, device=device, dtype=dtype, generator=gen) + 0.5 if weighted else None
    grad = torch.randn(b, c * (c + 1) // 2, device=device, dtype=dtype, generator=gen)

    def run(cfg: LaunchConfig) -> None:
        out, A, tr, iterates = head_forward(x, w, iters, 1e-7, True, True, cfg)
        head_backward(grad, x, w, out, A, tr, iterates, iters, True, cfg)

    def measure(cfg: LaunchConfig) -> float:
        run(cfg)  # compiles
        torch.cuda.synchronize(device)
        times = []
        for _ in range(REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(cfg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return measure


def config_for(x: torch.Tensor, weight: Optional[torch.Tensor], iters: int, precision: str) -> LaunchConfig:
    """The launch config for this call (see the module docstring); tunes on the first call of a key on a GPU."""
    b, c, n = x.shape
    if INTERPRET or x.device.type != "cuda" or not enabled():
        return launch_config(c, n, x.dtype, precision)
    key = Key(x.device, b, c, n, iters, weight is not None, x.dtype, precision)
    record = _TUNED.get(key)
    if record is not None:
        return record.chosen
    if torch.cuda.is_current_stream_capturing():
        return launch_config(c, n, x.dtype, precision)
    with _LOCK:
        if key not in _TUNED:
            measure = _gpu_measure(b, c, n, iters, weight is not None, x.dtype, x.device)
            _TUNED[key] = choose(key, candidates(c, n, x.dtype, precision), measure)
        return _TUNED[key].chosen


def tuned() -> list[dict]:
    """Every tuning decision of this process, as plain dicts (device, shape, chosen config, candidate times)."""
    return [record.as_dict() for record in _TUNED.values()]


def clear() -> None:
    """Forgets every decision (the next call of each key tunes again)."""
    _TUNED.clear()
