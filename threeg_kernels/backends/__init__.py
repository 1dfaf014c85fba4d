"""Backends of the pooling head, one module each (`<name>_impl.py`), each exposing `LOADED`.

`threeg_kernels.dispatch` imports them once, at package import, each inside its own try: a backend
whose module or toolchain is missing is recorded with the reason and the package still imports.
(Loading at call time would put an import into what torch.compile traces.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Loaded:
    """What a backend module exposes: its pool function and a per-device status."""

    # (x (B,C,N), weight (B,N)|None, iters, eps, order, precision, keep_iterates) -> (B, C(C+1)/2), compute dtype
    pool: Callable
    unavailable_on: Callable[[torch.device], Optional[str]]  # why it cannot run there, or None
    # The matmul precisions `pool` supports; cov_pool checks the request against it before calling.
    precisions: tuple[str, ...] = ("ieee",)
    # What keep_iterates=None means for this backend (each backend's module says why).
    keep_iterates: bool = True
