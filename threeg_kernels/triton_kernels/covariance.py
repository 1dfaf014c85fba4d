"""Weighted covariance of the pooling head, forward and backward: docs/math.md (1), (13)-(14).

Forward: Sigma of (1). The weights, the centring and eps are applied to the tiles as they are loaded
and stored: no X_w, Xc or N x N matrix is written. x and w are read once per output tile: each chunk of
BLOCK_N columns is centred on its own means, and the chunks are merged with Chan's pairwise update
    M <- M + M_chunk + n_prev n_c / (n_prev + n_c) d_i d_j^T,   d = chunk mean - running mean,
which does not cancel when |mu| >> std (measured under the interpreter, Sigma against float64:
2.6e-7 relative at x ~ 1e4 + N(0, 1), 1.8e-7 at N(0, 1)). Sigma is symmetric: only the tiles i <= j are
computed, each stored with its mirror. The trace is taken by the first Newton-Schulz step
(newton_schulz.py).

Backward: dX_w of (14) with the trace term of (13) folded in, then dX and dw. The coefficient c of (13)
arrives as two rows of partial sums (from newton_schulz.py and triangle.py) that are summed here. One
program owns a panel of columns n for all C rows, so the sum over c of dw is done in registers.
The centring's own backward, dX_w = dXc - (dXc 1 / N) 1^T of (14), is applied through Xc: with dXc = D Xc
(D = (dSigma + dSigma^T) / N), the row means of dXc are D r for r = Xc 1 / N, so dX_w = D (Xc - r 1^T).
`row_mean_kernel` leaves mu and r, and the backward centres twice, (X_w - mu) - r: r is what the float mean
mu misses (|r| ~ eps_mach |mu|, which matters when the features' mean is large against their spread:
at x ~ 1e4 + N(0, 1) in float32, K = 5, dX is 5.9e-4 off float64 without it and 1.5e-6 with it, docs/triton.md
"Accuracy"), and it cannot be folded into mu, whose own rounding is of that size.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._tiles import LaunchConfig, mm, store_tile


@triton.jit
def _weighted_tile(x_ptr, w_ptr, b, rows, cols, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W: tl.constexpr):
    """X_w[b, rows, cols] (0 outside C x N)."""
    mask = (rows[:, None] < C) & (cols[None, :] < N)
    xt = tl.load(x_ptr + b * s_xb + rows[:, None] * s_xc + cols[None, :] * s_xn, mask=mask, other=0.0)
    if HAS_W:
        wt = tl.load(w_ptr + b * s_wb + cols * s_wn, mask=cols < N, other=0.0)
        xt = xt * wt[None, :]
    return xt


@triton.jit
def _row_mean(x_ptr, w_ptr, b, rows, C, N, s_xb, s_xc, s_xn, s_wb, s_wn,
              HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """mu[rows] = X_w[b, rows, :] 1 / N."""
    total = tl.zeros((BLOCK_M,), dtype=x_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        total += tl.sum(_weighted_tile(x_ptr, w_ptr, b, rows, cols, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W), 1)
    return total / N


@triton.jit
def _centre(xt, mu, rows, cols, C, N):
    """The tile xt (rows, cols) minus mu per row, exactly 0 outside C x N (padding must not enter a product)."""
    inside = (rows[:, None] < C) & (cols[None, :] < N)
    return tl.where(inside, xt - mu[:, None], 0.0)


@triton.jit
def _centred_tile(x_ptr, w_ptr, mu, res, b, rows, cols, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W: tl.constexpr):
    """(X_w - mu 1^T) - res 1^T at [b, rows, cols], exactly 0 outside C x N."""
    xt = _weighted_tile(x_ptr, w_ptr, b, rows, cols, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W)
    inside = (rows[:, None] < C) & (cols[None, :] < N)
    return tl.where(inside, (xt - mu[:, None]) - res[:, None], 0.0)


@triton.jit
def covariance_forward_kernel(
    x_ptr,  # (B, C, N) float32/float64, any strides
    w_ptr,  # (B, N) same dtype, any strides; unused when not HAS_W
    sigma_ptr,  # (B, C, C) same dtype, written: Sigma
    C, N,  # channels, spatial positions
    s_xb, s_xc, s_xn,  # strides of x
    s_wb, s_wn,  # strides of w
    s_sb, s_sr, s_sc,  # strides of sigma
    eps,  # float, added to the diagonal
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if ti > tj:
        return
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    dt = x_ptr.dtype.element_ty
    # One pass over N: chunks centred on their own means, merged by Chan's update (module docstring).
    mean_i = tl.zeros((BLOCK,), dtype=dt)
    mean_j = tl.zeros((BLOCK,), dtype=dt)
    seen = tl.sum(tl.zeros((BLOCK_N,), dtype=dt), 0)  # columns merged so far (a scalar)
    acc = tl.zeros((BLOCK, BLOCK), dtype=dt)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_c = tl.sum((ns < N).to(dt), 0)
        xi = _weighted_tile(x_ptr, w_ptr, b, rows, ns, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W)
        xj = _weighted_tile(x_ptr, w_ptr, b, cols, ns, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W)
        ci = tl.sum(xi, 1) / n_c
        cj = tl.sum(xj, 1) / n_c
        xi = _centre(xi, ci, rows, ns, C, N)
        xj = _centre(xj, cj, cols, ns, C, N)
        acc = mm(xi, tl.trans(xj), acc, PRECISION, EMULATE)
        di = ci - mean_i
        dj = cj - mean_j
        total = seen + n_c
        acc += (seen * n_c / total) * (di[:, None] * dj[None, :])
        mean_i += di * (n_c / total)
        mean_j += dj * (n_c / total)
        seen = total
    sigma = acc / N + tl.where(rows[:, None] == cols[None, :], eps, 0.0)
    store_tile(sigma_ptr, b, rows, cols, sigma, C, s_sb, s_sr, s_sc, ti != tj)


@triton.jit
def row_mean_kernel(
    x_ptr,  # (B, C, N) float32/float64, any strides
    w_ptr,  # (B, N) same dtype; unused when not HAS_W
    mu_ptr,  # (B, C) same dtype, contiguous, written: mu = X_w 1 / N
    res_ptr,  # (B, C) same dtype, contiguous, written: r = (X_w - mu 1^T) 1 / N, what mu misses
    C, N,
    s_xb, s_xc, s_xn,
    s_wb, s_wn,
    HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mu = _row_mean(x_ptr, w_ptr, b, rows, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W, BLOCK, BLOCK_N)
    res = tl.zeros((BLOCK,), dtype=x_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        xt = _weighted_tile(x_ptr, w_ptr, b, rows, cols, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W)
        res += tl.sum(_centre(xt, mu, rows, cols, C, N), 1)
    tl.store(mu_ptr + b * C + rows, mu, mask=rows < C)
    tl.store(res_ptr + b * C + rows, res / N, mask=rows < C)


@triton.jit
def _sum_row(ptr, b, length, BLOCK: tl.constexpr):
    """sum(ptr[b, :length]) of a contiguous (B, length) buffer."""
    total = tl.zeros((BLOCK,), dtype=ptr.dtype.element_ty)
    for k0 in range(0, length, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        total += tl.load(ptr + b * length + ks, mask=ks < length, other=0.0)
    return tl.sum(total, 0)


@triton.jit
def covariance_backward_kernel(
    dA_ptr,  # (B, C, C) float32/float64, symmetric: sym(dL/dA)
    tr_ptr,  # (B,) trace of Sigma
    a_parts_ptr,  # (B, LA) contiguous: partial sums of <dA, A>
    g_parts_ptr,  # (B, LG) contiguous: partial sums of <dL/dout, out>
    x_ptr,  # (B, C, N) any strides
    w_ptr,  # (B, N) any strides; unused when not HAS_W
    mu_ptr,  # (B, C) contiguous: row means of X_w
    res_ptr,  # (B, C) contiguous: row means of X_w - mu 1^T
    dx_ptr,  # (B, C, N) contiguous, written: dL/dx
    dw_ptr,  # (B, N) contiguous, written: dL/dw; unused when not HAS_W
    C, N, LA, LG,
    s_ab, s_ar, s_ac,  # strides of dA
    s_xb, s_xc, s_xn,
    s_wb, s_wn,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tr = tl.load(tr_ptr + b)
    c = _sum_row(a_parts_ptr, b, LA, 256) - 0.5 * _sum_row(g_parts_ptr, b, LG, 256)
    scale = 2.0 / (N * tr)
    dw = tl.zeros((BLOCK_N,), dtype=x_ptr.dtype.element_ty)
    for r0 in range(0, C, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK_N), dtype=x_ptr.dtype.element_ty)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask = (rows[:, None] < C) & (ks[None, :] < C)
            da = tl.load(dA_ptr + b * s_ab + rows[:, None] * s_ar + ks[None, :] * s_ac, mask=mask, other=0.0)
            mu_k = tl.load(mu_ptr + b * C + ks, mask=ks < C, other=0.0)
            res_k = tl.load(res_ptr + b * C + ks, mask=ks < C, other=0.0)
            xk = _centred_tile(x_ptr, w_ptr, mu_k, res_k, b, ks, ns, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W)
            acc = mm(da, xk, acc, PRECISION, EMULATE)
        mu_r = tl.load(mu_ptr + b * C + rows, mask=rows < C, other=0.0)
        res_r = tl.load(res_ptr + b * C + rows, mask=rows < C, other=0.0)
        xc = _centred_tile(x_ptr, w_ptr, mu_r, res_r, b, rows, ns, C, N, s_xb, s_xc, s_xn, s_wb, s_wn, HAS_W)
        dxw = (acc - c * xc) * scale
        inside = (rows[:, None] < C) & (ns[None, :] < N)
        dx_at = dx_ptr + b * C * N + rows[:, None] * N + ns[None, :]
        if HAS_W:
            wt = tl.load(w_ptr + b * s_wb + ns * s_wn, mask=ns < N, other=0.0)
            tl.store(dx_at, dxw * wt[None, :], mask=inside)
            xt = tl.load(x_ptr + b * s_xb + rows[:, None] * s_xc + ns[None, :] * s_xn, mask=inside, other=0.0)
            dw += tl.sum(dxw * xt, 0)
        else:
            tl.store(dx_at, dxw, mask=inside)
    if HAS_W:
        tl.store(dw_ptr + b * N + ns, dw, mask=ns < N)


# --- launchers ---------------------------------------------------------------------------------------


def _weight_args(x: torch.Tensor, weight: Optional[torch.Tensor]):
    """(pointer tensor, stride_b, stride_n) of weight; x stands in (never read) when there is none."""
    if weight is None:
        return x, 0, 0
    return weight, weight.stride(0), weight.stride(1)


def covariance_forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, cfg: LaunchConfig) -> torch.Tensor:
    """Sigma (B, C, C) of x (B, C, N) weighted by weight (B, N) or None."""
    b, c, n = x.shape
    sigma = x.new_empty(b, c, c)
    w, s_wb, s_wn = _weight_args(x, weight)
    t = cfg.tiles(c)
    covariance_forward_kernel[(b, t, t)](
        x, w, sigma, c, n, *x.stride(), s_wb, s_wn, *sigma.stride(), eps,
        HAS_W=weight is not None, BLOCK=cfg.block, BLOCK_N=cfg.block_n,
        PRECISION=cfg.precision, EMULATE=cfg.emulate, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return sigma


def covariance_backward(
    dA: torch.Tensor,
    tr: torch.Tensor,
    a_parts: torch.Tensor,
    g_parts: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    cfg: LaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx (B, C, N), dL/dweight (B, N) or an empty tensor) from sym(dL/dA) and the trace terms' partial sums."""
    b, c, n = x.shape
    w, s_wb, s_wn = _weight_args(x, weight)
    has_w = weight is not None
    mu, res = x.new_empty(2, b, c).unbind(0)
    row_mean_kernel[(b, cfg.tiles(c))](
        x, w, mu, res, c, n, *x.stride(), s_wb, s_wn, HAS_W=has_w, BLOCK=cfg.block, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    dx = x.new_empty(b, c, n)
    dw = x.new_empty(b, n) if has_w else x.new_empty(0)
    covariance_backward_kernel[(b, triton.cdiv(n, cfg.block_n))](
        dA, tr, a_parts, g_parts, x, w, mu, res, dx, dw if has_w else dx,
        c, n, a_parts.shape[1], g_parts.shape[1], *dA.stride(), *x.stride(), s_wb, s_wn,
        HAS_W=has_w, BLOCK=cfg.block, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
        PRECISION=cfg.precision, EMULATE=cfg.emulate, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx, dw
