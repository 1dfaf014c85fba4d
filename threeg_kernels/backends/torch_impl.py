"""The "torch" backend: batched ATen ops with a hand-written backward, as registered torch ops.

Forward: the covariance and trace (docs/math.md (1)-(2)), the first step in its shortcut form (5) as one
baddbmm, the remaining steps (3) without the last Z, post-compensation and the packed triangle (6)-(8):
3K - 3 batched C x C products (12 for K = 5).

Backward: the triangle scatter, the plain reverse sweep (10) and step 1 exactly as autograd differentiates
the forward's products, then the trace and covariance steps (13)-(14) with the centring's backward kept:
6K - 6 products for K >= 2 (24 for K = 5) and one C x C x N product for dX_w. (The symmetric sweep (11)
saves two products but assumes the float32 iterates commute exactly: its error grows geometrically with K.)

Keep or recompute (21): with keep_iterates=True the forward keeps (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K,
3(K-1) C x C matrices a sample, laid out (K-1, 3, B, C, C) so that each is written in place; with False the
backward re-runs the 3K - 3 forward products from A.

The op bodies run with autocast off and, their promise being 'ieee', with float32 products in IEEE float32
whatever TF32 / bf16 matmul setting the caller made (threeg_kernels/_precision.py).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .. import reference
from .._precision import ieee_matmul, no_autocast
from .._registration import BACKWARD_SCHEMA, FORWARD_SCHEMA, check_op_args, register_pool_op
from . import Loaded


@lru_cache(maxsize=64)
def _triangle_indices(c: int, order: str, device: torch.device) -> torch.Tensor:
    return reference.triangle_indices(c, order, device)


def _centred(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    xw = x if weight is None else x * weight.unsqueeze(1)
    return xw - xw.mean(dim=2, keepdim=True)


def _eye(c: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(c, dtype=like.dtype, device=like.device)


def _iterates_shape(b: int, c: int, iters: int) -> tuple[int, ...]:
    return (iters - 1, 3, b, c, c)


def _newton_schulz(A: torch.Tensor, iters: int, keep_iterates: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns Y_K and, if keep_iterates, the (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K, each written in place."""
    b, c, _ = A.shape
    kept = A.new_empty(_iterates_shape(b, c, iters)) if keep_iterates else None

    def slot(k: int, j: int) -> Optional[torch.Tensor]:
        return kept[k, j] if keep_iterates and k < iters - 1 else None

    eye15 = 1.5 * _eye(c, A)
    Y = torch.baddbmm(A, A, A, beta=1.5, alpha=-0.5, out=slot(0, 0))
    Z = torch.add(eye15, A, alpha=-0.5, out=slot(0, 1))
    for k in range(1, iters):
        T = torch.baddbmm(eye15, Z, Y, alpha=-0.5, out=kept[k - 1, 2] if keep_iterates else None)
        if k + 1 < iters:
            Z = torch.bmm(T, Z, out=slot(k, 1))
        Y = torch.bmm(Y, T, out=slot(k, 0))
    return Y, kept


def _t(m: torch.Tensor) -> torch.Tensor:
    """M^T of each matrix of a batch (a view)."""
    return m.transpose(1, 2)


def _sym2(m: torch.Tensor) -> torch.Tensor:
    """M + M^T."""
    return m + _t(m)


@torch.library.custom_op("threeg::cov_pool_torch_forward", mutates_args=(), schema=FORWARD_SCHEMA)
def cov_pool_torch_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    iters: int,
    eps: float,
    order: str,
    keep_iterates: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_op_args("threeg::cov_pool_torch_forward", iters, order, precision)
    with no_autocast(x.device.type), ieee_matmul(x.device.type):
        return _forward(x, weight, iters, eps, order, keep_iterates)


def _forward(x, weight, iters, eps, order, keep_iterates):
    b, c, n = x.shape
    xc = _centred(x, weight)
    sigma = torch.baddbmm(eps * _eye(c, x), xc, xc.transpose(1, 2), alpha=1.0 / n)
    tr = sigma.diagonal(dim1=1, dim2=2).sum(-1)
    A = sigma / tr[:, None, None]
    Y, kept = _newton_schulz(A, iters, keep_iterates)
    out = (Y.reshape(b, c * c)[:, _triangle_indices(c, order, x.device)]) * tr.sqrt()[:, None]
    iterates = kept if keep_iterates else x.new_empty(0)
    return out, A, tr, iterates


@torch.library.custom_op("threeg::cov_pool_torch_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def cov_pool_torch_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    out: torch.Tensor,
    A: torch.Tensor,
    tr: torch.Tensor,
    iterates: torch.Tensor,
    iters: int,
    order: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_op_args("threeg::cov_pool_torch_backward", iters, order, precision)
    with no_autocast(x.device.type), ieee_matmul(x.device.type):
        return _backward(grad, x, weight, out, A, tr, iterates, iters, order)


def _backward(grad, x, weight, out, A, tr, iterates, iters, order):
    b, c, n = x.shape
    if iterates.numel() == 0:
        _, iterates = _newton_schulz(A, iters, keep_iterates=True)
    # The reverse sweep (10) exactly as autograd runs it through the forward's products (transposes and
    # all): the symmetric sweep (11) assumes the float iterates commute, and loses accuracy geometrically
    # with K where they do not.
    dY = grad.new_zeros(b, c * c)
    dY[:, _triangle_indices(c, order, x.device)] = grad * tr.sqrt()[:, None]
    dY = dY.view(b, c, c)
    dZ = None
    for k in range(iters - 1, 0, -1):
        Yp, Zp, T = iterates[k - 1].unbind(0)
        dT = torch.bmm(_t(Yp), dY)
        if dZ is not None:
            dT.baddbmm_(dZ, _t(Zp))
        dZ_next = torch.bmm(dT, _t(Yp)).mul_(-0.5)
        if dZ is not None:
            dZ_next.baddbmm_(_t(T), dZ)
        dY = torch.baddbmm(torch.bmm(dY, _t(T)), _t(Zp), dT, alpha=-0.5)
        dZ = dZ_next
    # step 1 (5): Y_1 = 1.5 A - 0.5 A A, Z_1 = 1.5 I - 0.5 A
    dA = torch.baddbmm(dY, dY, _t(A), beta=1.5, alpha=-0.5).baddbmm_(_t(A), dY, alpha=-0.5)
    if dZ is not None:
        dA.add_(dZ, alpha=-0.5)
    # trace normalisation and post-compensation (13)
    coef = (dA * A).sum((1, 2)) - 0.5 * (grad * out).sum(1)
    dA.diagonal(dim1=1, dim2=2).sub_(coef[:, None])
    # covariance (14): dXc = (dSigma + dSigma^T) Xc / N, then the centring's own backward (the row mean of
    # dXc, zero only in exact arithmetic: it matters when the features' mean is large against their spread)
    xc = _centred(x, weight)
    dxw = torch.bmm(_sym2(dA), xc).mul_((1.0 / n) / tr[:, None, None])
    dxw.sub_(dxw.mean(dim=2, keepdim=True))
    if weight is None:
        return dxw, x.new_empty(0)
    return dxw * weight.unsqueeze(1), (dxw * x).sum(1)


_pool_op = register_pool_op(
    cov_pool_torch_forward, cov_pool_torch_backward, lambda b, c, n, iters: _iterates_shape(b, c, iters)
)


def pool(x, weight, iters, eps, order, precision, keep_iterates):
    return _pool_op(x, weight, iters, eps, order, keep_iterates, precision)


# Keep the iterates by default: measured faster for 6x the saved memory (docs/benchmark.md, "keep vs recompute").
LOADED = Loaded(pool=pool, unavailable_on=lambda device: None, keep_iterates=True)
