"""The vectorised triangle of S = sqrt(tr) Y_K, forward (pack) and backward (scatter): docs/math.md (6)-(9).

Forward: `store_packed` writes the entries of a tile of Y_K that lie in the order's triangle ('3g': i >= j,
'mpncov': i <= j), times sqrt(tr), to their places p(i, j) of (8). It is the epilogue of the last
Newton-Schulz product (newton_schulz.py), which computes only the tiles of that triangle: Y_K is never
written as a C x C matrix. The computed Y_K is not exactly symmetric, and its other triangle is not the
function's output, so which triangle is read follows the order, as in reference.py.

Backward: `scatter_triangle_kernel` writes dY_K = sqrt(tr) G_S, the incoming gradient at the places of the
order's triangle and 0 elsewhere, which is what autograd gives through the forward's gather; the reverse
sweep starts from it as it is (not from sym(G_S) of (9), equal only in exact arithmetic; docs/triton.md).
The same kernel reads out and leaves one partial sum of <dL/dout, out> per tile, for c of (13).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import LaunchConfig


@triton.jit
def packed_index(i, j, C, LOWER: tl.constexpr):
    """Place in the packed vector of the entry (i, j) of the order's triangle ('3g': i >= j, LOWER; 'mpncov':
    i <= j): docs/math.md (8)."""
    if LOWER:
        return (i * (i + 1)) // 2 + j
    else:
        return i * C - (i * (i - 1)) // 2 + (j - i)


@triton.jit
def in_triangle(i, j, C, LOWER: tl.constexpr):
    """Whether the entry (i, j) of a C x C matrix is in the order's triangle (and inside the matrix)."""
    if LOWER:
        return (j <= i) & (i < C)
    else:
        return (i <= j) & (j < C)


@triton.jit
def tile_in_triangle(ti, tj, LOWER: tl.constexpr):
    """Whether the tile (ti, tj) holds entries of the order's triangle (programs of other tiles return)."""
    if LOWER:
        return tj <= ti
    else:
        return ti <= tj


@triton.jit
def store_packed(out_ptr, b, s_ob, s_op, rows, cols, val, C, LOWER: tl.constexpr):
    """Stores the entries of the tile (rows, cols) that lie in the order's triangle into the packed vector."""
    i = rows[:, None]
    j = cols[None, :]
    tl.store(out_ptr + b * s_ob + packed_index(i, j, C, LOWER) * s_op, val, mask=in_triangle(i, j, C, LOWER))


@triton.jit
def scatter_triangle_kernel(
    grad_ptr,  # (B, C(C+1)/2) float32/float64, any strides: dL/dout
    out_ptr,  # (B, C(C+1)/2) same dtype, any strides: the forward's output
    tr_ptr,  # (B,) trace of Sigma
    dY_ptr,  # (B, C, C) same dtype, written (every tile): dY_K = sqrt(tr) G_S
    parts_ptr,  # (B, T*T) contiguous, written: per tile, the partial sum of <dL/dout, out>
    C, T,  # channels, tiles per side
    s_gb, s_gp, s_ob, s_op,  # strides of grad and out
    s_yb, s_yr, s_yc,  # strides of dY
    LOWER: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    i = rows[:, None]
    j = cols[None, :]
    inside = in_triangle(i, j, C, LOWER)
    p = packed_index(i, j, C, LOWER)
    g = tl.load(grad_ptr + b * s_gb + p * s_gp, mask=inside, other=0.0)
    o = tl.load(out_ptr + b * s_ob + p * s_op, mask=inside, other=0.0)
    tl.store(dY_ptr + b * s_yb + i * s_yr + j * s_yc, g * tl.sqrt(tl.load(tr_ptr + b)), mask=(i < C) & (j < C))
    tl.store(parts_ptr + b * T * T + ti * T + tj, tl.sum(tl.sum(g * o, 1), 0))


def scatter_triangle(
    grad: torch.Tensor, out: torch.Tensor, tr: torch.Tensor, c: int, lower: bool, cfg: LaunchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY_K (B, C, C), partial sums of <grad, out> (B, T*T)) from dL/dout (B, C(C+1)/2)."""
    b = grad.shape[0]
    t = cfg.tiles(c)
    dY = grad.new_empty(b, c, c)
    parts = grad.new_empty(b, t * t)
    scatter_triangle_kernel[(b, t, t)](
        grad, out, tr, dY, parts, c, t, *grad.stride(), *out.stride(), *dY.stride(),
        LOWER=lower, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return dY, parts
