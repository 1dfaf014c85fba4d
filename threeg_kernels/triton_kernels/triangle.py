"""The vectorised triangle of S = sqrt(tr) Y_K, forward (pack) and backward (scatter): docs/math.md (6)-(9).

Forward: `store_packed` writes the entries r <= c of a tile of the symmetric Y_K, times sqrt(tr), to
their places p of (8) ('3g': p(c, r); 'mpncov': p(r, c)). It is the epilogue of the last Newton-Schulz
product (newton_schulz.py): Y_K is never written as a C x C matrix.

Backward: `triangle_backward_kernel` writes dY_K = sqrt(tr) sym(G_S) of (9), tile and mirror: the
diagonal gets sqrt(tr) g_p, an off-diagonal pair sqrt(tr) g_p / 2 each. The same kernel reads out and
leaves one partial sum of <dL/dout, out> per tile, for c of (13).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import LaunchConfig, store_symmetric_tile


@triton.jit
def packed_index(r, c, C, LOWER: tl.constexpr):
    """Place in the packed vector of the entry (r, c), r <= c, of a symmetric C x C matrix: docs/math.md (8)."""
    if LOWER:
        return (c * (c + 1)) // 2 + r
    else:
        return r * C - (r * (r - 1)) // 2 + (c - r)


@triton.jit
def store_packed(out_ptr, b, s_ob, s_op, rows, cols, val, C, LOWER: tl.constexpr):
    """Stores the entries r <= c of the tile (rows, cols) of a symmetric matrix into its packed triangle."""
    r = rows[:, None]
    c = cols[None, :]
    keep = (r <= c) & (c < C)
    tl.store(out_ptr + b * s_ob + packed_index(r, c, C, LOWER) * s_op, val, mask=keep)


@triton.jit
def triangle_backward_kernel(
    grad_ptr,  # (B, C(C+1)/2) float32/float64, any strides: dL/dout
    out_ptr,  # (B, C(C+1)/2) same dtype, any strides: the forward's output
    tr_ptr,  # (B,) trace of Sigma
    dY_ptr,  # (B, C, C) same dtype, written: dY_K = sqrt(tr) sym(G_S)
    parts_ptr,  # (B, T*T) contiguous zeros, written at tiles i <= j: partial sums of <dL/dout, out>
    C, T,  # channels, tiles per side
    s_gb, s_gp, s_ob, s_op,  # strides of grad and out
    s_yb, s_yr, s_yc,  # strides of dY
    LOWER: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if ti > tj:
        return
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    r = tl.minimum(rows[:, None], cols[None, :])
    c = tl.maximum(rows[:, None], cols[None, :])
    inside = c < C
    p = packed_index(r, c, C, LOWER)
    g = tl.load(grad_ptr + b * s_gb + p * s_gp, mask=inside, other=0.0)
    o = tl.load(out_ptr + b * s_ob + p * s_op, mask=inside, other=0.0)
    root = tl.sqrt(tl.load(tr_ptr + b))
    dY = g * tl.where(r == c, root, 0.5 * root)
    store_symmetric_tile(dY_ptr, b, rows, cols, dY, C, s_yb, s_yr, s_yc, ti != tj)
    upper = rows[:, None] <= cols[None, :]
    tl.store(parts_ptr + b * T * T + ti * T + tj, tl.sum(tl.sum(tl.where(upper, g * o, 0.0), 1), 0))


def triangle_backward(
    grad: torch.Tensor, out: torch.Tensor, tr: torch.Tensor, c: int, lower: bool, cfg: LaunchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY_K (B, C, C), partial sums of <grad, out> (B, T*T)) from dL/dout (B, C(C+1)/2)."""
    b = grad.shape[0]
    t = cfg.tiles(c)
    dY = grad.new_empty(b, c, c)
    parts = grad.new_zeros(b, t * t)
    triangle_backward_kernel[(b, t, t)](
        grad, out, tr, dY, parts, c, t, *grad.stride(), *out.stride(), *dY.stride(),
        LOWER=lower, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return dY, parts
