"""What every benchmark script shares: inputs, the timer, memory, the error measure, tables, the machine's name.

Timing: a warm-up, then percentiles over repeats. CUDA: events around each call (after a synchronize);
CPU: time.perf_counter. Memory: CUDA's allocator peak on a GPU; on CPU, where no allocator peak is kept,
the bytes autograd saves for backward (what a training step holds between forward and backward).
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import threeg_kernels

# ------------------------------------------------------------------------------------------ timing


def percentiles(samples: list[float], qs=(20, 50, 80)) -> list[float]:
    """Nearest-rank percentiles of the samples: the ceil(q/100 * n)-th smallest (ceil, not round:
    Python rounds halves to even, which made p20 of 5 samples the 2nd smallest instead of the 1st)."""
    ordered = sorted(samples)
    return [ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) / 100) - 1))] for q in qs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    setup: Optional[Callable[[], object]] = None,
) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, after `warmup` untimed calls.

    With `setup`, every call (warm-up and timed) first runs setup() untimed and passes its result:
    fn(setup()). That times a backward alone, with a fresh forward as its setup.
    """
    device = torch.device(device)

    def call() -> float:
        arg = setup() if setup is not None else None
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        call()
    return [call() for _ in range(repeats)]


def interleaved_ms(
    fns: dict, device, rounds: int, warmup: int = 1, setups: Optional[dict] = None, shuffle: bool = False
) -> dict:
    """{name: [ms per round]}: `warmup` untimed calls of each fn, then `rounds` rounds that time every fn once,
    in turn, so that the drifts of a shared machine fall on all of them alike. setups[name], where given, runs
    untimed before each call of that fn and passes its result, as time_ms's `setup`. shuffle: each timed round in
    its own order (seeded by the round's index: the same in every run), so that no fn always follows the same one
    (a call runs slower after one that filled the caches with its own data: 15-16% slower, measured for cov_pool at
    C = 64, N = 196 (1.5 ms) right after the original fast-MPN-COV code (6 ms)); in a fixed order, or any rotation
    of one, each fn has the same predecessor in every round."""
    setups = setups or {}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            time_ms(fns[name], device, warmup=0, repeats=1, setup=setups.get(name))
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = list(names)
        if shuffle:
            random.Random(r).shuffle(order)
        for name in order:
            samples[name] += time_ms(fns[name], device, warmup=0, repeats=1, setup=setups.get(name))
    return samples


# ------------------------------------------------------------------------------------------ memory


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd saves for backward while fn() runs, each storage counted once (views share it).

    Measured with torch.autograd.graph.saved_tensors_hooks; tensors saved by autograd.Functions,
    registered custom ops and compiled graphs all pass through the pack hook. Inputs saved for the
    backward are counted too: a method that keeps them costs what one that copies them would not.
    """
    storages: dict[tuple[str, int], int] = {}
    keep = []  # holds the saved tensors until counted, so no freed address is reused and miscounted

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. wrapper subclasses)
            return t
        keep.append(t)
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_mb(fn: Callable, device: torch.device, setup: Optional[Callable[[], object]] = None) -> float:
    """Memory of one call of fn (or fn(setup()), setup excluded), in MiB.

    CUDA: torch.cuda.max_memory_allocated during the call, less what was allocated before it (so the
    inputs every row shares are not counted). CPU: saved_tensor_bytes of the call.
    """
    if device.type == "cuda":
        arg = setup() if setup is not None else None
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn(arg) if setup is not None else fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result, arg
        return peak / 2**20
    if setup is not None:
        return saved_tensor_bytes(lambda: fn(setup())) / 2**20
    return saved_tensor_bytes(fn) / 2**20


# ------------------------------------------------------------------------------- errors and tables


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its rule, one line per row of cells (already formatted)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_quantiles(samples: list[float], digits: int = 1) -> str:
    """'p20 / p50 / p80' of the samples, `digits` decimals each."""
    return " / ".join(f"{q:.{digits}f}" for q in percentiles(samples))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------ inputs


def add_shape_args(parser) -> None:
    """--B --C --N --iters with the real head's defaults (B=32, C=256, N=14*14, K=5)."""
    parser.add_argument("--B", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--C", type=int, default=256, help="channels (default 256)")
    parser.add_argument("--N", type=int, default=196, help="spatial positions H*W (default 196)")
    parser.add_argument("--iters", type=int, default=5, help="Newton-Schulz steps K (default 5)")


def make_inputs(b, c, n, dtype, device, seed=0):
    """x (B, C, N), weight (B, N) in (0.1, 1.1), and one upstream gradient, drawn in float64 then cast."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    weight = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1
    grad = torch.randn(b, c * (c + 1) // 2, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, grad))


def fwd_bwd(backend, x, weight, grad, iters, **options):
    """(out, dL/dx, dL/dweight) of cov_pool on fresh leaves: one training step of the head.
    `options` go to cov_pool (precision=, keep_iterates=)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = threeg_kernels.cov_pool(x, weight, iters=iters, backend=backend, **options)
    dx, dw = torch.autograd.grad(out, (x, weight), grad)
    return out, dx, dw
