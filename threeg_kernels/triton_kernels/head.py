"""The whole pooling head as a sequence of kernel launches, forward and backward, for one LaunchConfig.

    head_forward(x, weight, iters, eps, lower, keep_iterates, cfg)  -> (out, A, tr, iterates)
    head_backward(grad, x, weight, out, A, tr, iterates, iters, lower, cfg) -> (dx, dweight)

Forward, docs/math.md (1)-(8): covariance (1 launch), Newton-Schulz with the trace folded into step 1
and the packed triangle into step K (2K - 1 launches). Backward, (10), (12)-(14): triangle scatter (1),
the iterates again from A when the forward did not keep them (`iterates` empty, (21)), the plain reverse
sweep (2 per step), step 1 with the trace partial sums (1), row means and the covariance backward (2).

Both are plain functions of tensors and a LaunchConfig: the registered ops of
threeg_kernels/backends/triton_impl.py call them with the tuned config (tuning.py), and tuning.py
times them per candidate config.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._tiles import LaunchConfig
from .covariance import covariance_backward, covariance_forward
from .newton_schulz import newton_schulz_backward, newton_schulz_forward, newton_schulz_iterates
from .triangle import scatter_triangle


def head_forward(x: torch.Tensor, weight: Optional[torch.Tensor], iters: int, eps: float, lower: bool,
                 keep_iterates: bool, cfg: LaunchConfig):
    sigma = covariance_forward(x, weight, eps, cfg)
    return newton_schulz_forward(sigma, iters, lower, keep_iterates, cfg)


def head_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], out: torch.Tensor,
                  A: torch.Tensor, tr: torch.Tensor, iterates: torch.Tensor, iters: int, lower: bool,
                  cfg: LaunchConfig):
    c = x.shape[1]
    A = A.contiguous()
    if iterates.numel() == 0:
        iterates = newton_schulz_iterates(A, iters, cfg)
    dY, g_parts = scatter_triangle(grad, out, tr, c, lower, cfg)
    dA, a_parts = newton_schulz_backward(dY, A, iterates.contiguous(), iters, cfg)
    return covariance_backward(dA, tr, a_parts, g_parts, x, weight, cfg)
