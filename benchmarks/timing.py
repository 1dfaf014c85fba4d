"""Timing shared by the benchmarks: warm-up, then percentiles over repeats.

CUDA: events around each repeat (after a synchronize); CPU: time.perf_counter.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def percentiles(samples: list[float], qs=(20, 50, 80)) -> list[float]:
    """Nearest-rank percentiles of the samples."""
    ordered = sorted(samples)
    return [ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] for q in qs]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples
