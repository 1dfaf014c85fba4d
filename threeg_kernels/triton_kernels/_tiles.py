"""Tile helpers shared by the kernels of the pooling head, and the launch settings.

Conventions of every kernel here:
- program ids: axis 0 is the sample b, axes 1 and 2 the row and column tile of a C x C matrix;
- a result that is symmetric as computed (Sigma, A A, sym(dA) of step 1's backward) is computed on the
  tiles i <= j only and stored twice (tile and mirror), so it costs T(T+1)/2 of the T^2 tile products
  (T = cdiv(C, BLOCK)); the Newton-Schulz iterates from step 2 on are not (docs/triton.md, "Symmetry");
- a transposed operand M^T is the tile of M read with its row and column strides swapped;
- loads are masked (other=0, so masked entries add nothing to a product) and kept in the dtype of the
  buffers, which is float32 or float64: the launchers cast nothing, `cov_pool` did;
- the matmul precision is a compile-time string: "ieee" (fp32 products, the default and the only mode
  for float64), "tf32x3" (each fp32 operand split into a TF32 high part and a TF32 remainder, three
  tensor-core products hi*hi + hi*lo + lo*hi: close to fp32 accuracy), "tf32" (tensor-core TF32
  inputs, fp32 accumulation) or "bf16" (bf16 inputs, fp32 accumulation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._validate import PRECISIONS  # noqa: F401 - the one list of modes, re-exported for the backend

# Read once: the kernels below are decorated at import, and the interpreter is chosen at decoration.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def round_mantissa(v, PRECISION: tl.constexpr):
    """fp32 v rounded to the inputs the tensor cores see: TF32 (10-bit mantissa, rounded to nearest,
    ties away, as cvt.rna.tf32.f32) or bf16 (7-bit mantissa, to nearest even). Bit arithmetic, because
    the interpreter's own bf16 cast truncates and its bf16 tl.dot returns garbage (measured, Triton 3.8)."""
    bits = v.to(tl.uint32, bitcast=True)
    if PRECISION == "tf32":
        bits = (bits + 0x1000) & 0xFFFFE000
    else:
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b in the accumulator's dtype, with the matmul inputs in PRECISION.

    EMULATE (interpreter only): tf32/bf16 inputs are rounded in fp32 and multiplied exactly, which is
    what the tensor cores compute (exact products of the rounded inputs, fp32 sums); tf32x3 is emulated
    as Triton's F32DotTC pass lowers it: lo*hi + hi*lo from zero, added to acc, then + hi*hi.
    """
    if PRECISION == "ieee":
        # out_dtype=acc.dtype: float64 accumulates in float64; Triton 3.6 rejects a float64 acc without it
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    elif PRECISION == "tf32x3":
        if EMULATE:
            a_hi = round_mantissa(a, "tf32")
            b_hi = round_mantissa(b, "tf32")
            a_lo = round_mantissa(a - a_hi, "tf32")
            b_lo = round_mantissa(b - b_hi, "tf32")
            small = tl.dot(a_lo, b_hi, tl.zeros_like(acc), input_precision="ieee")
            small = tl.dot(a_hi, b_lo, small, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc + small, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
    elif EMULATE:
        acc = tl.dot(round_mantissa(a, PRECISION), round_mantissa(b, PRECISION), acc, input_precision="ieee")
    elif PRECISION == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    return acc


@triton.jit
def load_tile(ptr, b, rows, cols, n_rows, n_cols, s_b, s_r, s_c):
    """ptr[b, rows, cols] with entries outside n_rows x n_cols read as 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + b * s_b + rows[:, None] * s_r + cols[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def load_operand(ptr, b, rows, cols, C, s_b, s_r, s_c, TRANS: tl.constexpr):
    """op(M)[b, rows, cols] of a C x C matrix M, op(M) = M^T if TRANS else M (0 outside C x C)."""
    if TRANS:
        return load_tile(ptr, b, rows, cols, C, C, s_b, s_c, s_r)
    return load_tile(ptr, b, rows, cols, C, C, s_b, s_r, s_c)


@triton.jit
def tile_product(acc, l_ptr, r_ptr, b, rows, cols, C, s_b, s_r, s_c, L_T: tl.constexpr, R_T: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + op(L)[b, rows, :] @ op(R)[b, :, cols] for two C x C matrices of the same strides, op(M) = M^T
    where its flag (L_T, R_T) is set."""
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        lt = load_operand(l_ptr, b, rows, ks, C, s_b, s_r, s_c, L_T)
        rt = load_operand(r_ptr, b, ks, cols, C, s_b, s_r, s_c, R_T)
        acc = mm(lt, rt, acc, PRECISION, EMULATE)
    return acc


@triton.jit
def store_tile(ptr, b, rows, cols, val, C, s_b, s_r, s_c, mirror):
    """Stores tile (rows, cols) of a C x C matrix and, if mirror, its transpose at (cols, rows) (the other
    half of a symmetric matrix computed on the tiles i <= j)."""
    mask = (rows[:, None] < C) & (cols[None, :] < C)
    base = ptr + b * s_b
    tl.store(base + rows[:, None] * s_r + cols[None, :] * s_c, val, mask=mask)
    if mirror:
        tl.store(base + rows[:, None] * s_c + cols[None, :] * s_r, val, mask=mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of one call, chosen from the shape, dtype and device (see `launch_config`)."""

    block: int  # side of the square output tiles of C x C matrices
    block_k: int  # reduction step over C
    block_n: int  # tile over the N spatial positions
    num_warps: int
    num_stages: int
    precision: str
    emulate: bool

    def tiles(self, c: int) -> int:
        return triton.cdiv(c, self.block)


def launch_config(c: int, n: int, dtype: torch.dtype, precision: str = "ieee") -> LaunchConfig:
    """The default launch settings for C channels and N positions (tuning.py times alternatives on a GPU).

    Under the interpreter every (program x reduction step) costs ~4 ms whatever its size, so the tiles
    cover the whole of a small problem. On a GPU: 64-wide output tiles (C = 256 gives 4 x 4 tiles, 10 of
    them computed for a symmetric result), 16-deep reduction steps, 8 warps, 3 stages (2 in "ieee");
    float64 uses 32-wide tiles, 8 warps and no pipelining. Chosen without a GPU by what the sm_90
    compiler reports for the specialised kernels a launch compiles (`python -m tests.triton_compile_check
    --candidates`, docs/triton.md): they spill no registers in any precision mode, with Triton 3.8 and
    3.6; 3 stages spill 8 B in "ieee" (3.8), 2 stages 20-36 B in float64, 4 warps 0.3-1.4 KB in the
    backward iteration and, in float64 with the 64-bit sample offsets, 16 B in ns_step_kernel (3.6).
    """
    if dtype == torch.float64:
        precision = "ieee"
    if INTERPRET:
        block = max(16, triton.next_power_of_2(min(c, 64)))
        return LaunchConfig(block, block, max(16, triton.next_power_of_2(min(n, 64))), 4, 1, precision, True)
    cap_c = max(16, triton.next_power_of_2(c))
    cap_n = max(16, triton.next_power_of_2(n))
    if dtype == torch.float64:
        return LaunchConfig(min(32, cap_c), 16, min(32, cap_n), 8, 1, precision, False)
    block = min(64, cap_c)
    stages = 2 if precision == "ieee" else 3
    return LaunchConfig(block, 16, min(32, cap_n), 8 if block >= 64 else 4, stages, precision, False)
