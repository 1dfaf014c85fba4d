"""Trace normalisation and coupled Newton-Schulz iteration, forward and reverse sweep: docs/math.md (2)-(6),
(10), (12), (21).

Forward, from Sigma (B, C, C): (3) in the reference's order (Y_k = Y_{k-1} T_k, Z_k = T_k Z_{k-1}), 3K - 3
products. Step 1 is symmetric as computed (A A of the exactly symmetric A): tiles i <= j, stored with their
mirror. From step 2 on every product is computed whole: the float32 iterates are symmetric and commute
only to rounding, and forcing them symmetric (one triangle computed, mirrored) makes the iteration unstable
(docs/triton.md, "Symmetry").
    ns_first_step_kernel  (2) and step 1 of (5): reads the diagonal of Sigma for tr and scales in
                          registers; one product, A A. For K = 1 it writes the packed output.
    ns_t_kernel           T_k of (3), the affine map as the epilogue of the product Z_{k-1} Y_{k-1}.
    ns_step_kernel        Y_k = Y_{k-1} T_k and Z_k = T_k Z_{k-1} in one launch; the last step skips Z_K (5)
                          and computes only the tiles of the order's triangle of Y_K, which it writes packed
                          times sqrt(tr), (6)-(8) (triangle.py).
Kept iterates, (21): slot k-2 of a (K-1, 3, B, C, C) buffer holds (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K; the
forward writes them there directly, so keeping costs memory and no extra traffic. Otherwise the forward
ping-pongs between two slots and the backward recomputes the buffer from A (3K - 4 products).

Backward: the plain reverse step (10) exactly as autograd runs it through the forward's products, the
transposes of the (not exactly symmetric) iterates included, from dY_K = sqrt(tr) G_S (triangle.py):
    dT_k     = Y_{k-1}^T dY_k + dZ_k Z_{k-1}^T
    dY_{k-1} = dY_k T_k^T - 0.5 Z_{k-1}^T dT_k
    dZ_{k-1} = T_k^T dZ_k - 0.5 dT_k Y_{k-1}^T
(The symmetric sweep (11) has symmetric results, computable on one triangle of tiles, but assumes the
iterates commute exactly; its float32 error grows geometrically with K: docs/triton.md, "Accuracy".)
    ns_backward_dt_kernel          dT_k: 2 products (1 at k = K, where dZ_K = 0), every tile.
    ns_backward_step_kernel        dY_{k-1} and dZ_{k-1}: 4 products (3 at k = K), every tile.
    ns_backward_first_step_kernel  step 1, (12) in its second form, as autograd gives it for the general
                                   dY_1, dZ_1 (A is exactly symmetric): dA = 1.5 dY_1 - 0.5 (dY_1 A + A dY_1)
                                   - 0.5 dZ_1. Only sym(dA) reaches dX ((13)-(14) read dSigma + dSigma^T and
                                   <dA, A>), and sym(dA) = 1.5 D - 0.5 (D A + A D) - 0.5 sym(dZ_1) with D =
                                   sym(dY_1): a symmetric result, tiles i <= j, with D and sym(dZ_1)
                                   symmetrised as they are loaded. Also the row sums of sym(dA) o A for c of
                                   (13) (covariance.py).
Products: 6 per reverse step k < K, 4 at k = K (6K - 8 full for K >= 2), and 2 symmetric for step 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import LaunchConfig, load_tile, mm, store_tile, tile_product
from .triangle import store_packed, tile_in_triangle


@triton.jit
def _eye_tile(rows, cols):
    return rows[:, None] == cols[None, :]


@triton.jit
def _sym_tile(ptr, b, rows, cols, C, s_b, s_r, s_c):
    """sym(M)[b, rows, cols] = (M + M^T)[b, rows, cols] / 2 of a C x C matrix M, 0 outside C x C."""
    m = load_tile(ptr, b, rows, cols, C, C, s_b, s_r, s_c)
    return 0.5 * (m + load_tile(ptr, b, rows, cols, C, C, s_b, s_c, s_r))


@triton.jit
def ns_first_step_kernel(
    src_ptr,  # (B, C, C) float32/float64: Sigma (NORMALISE) or A (recompute)
    A_ptr,  # (B, C, C) written when NORMALISE: A = Sigma / tr
    Y_ptr,  # (B, C, C) written unless LAST: Y_1
    Z_ptr,  # (B, C, C) written unless LAST: Z_1 = T_1
    out_ptr,  # (B, C(C+1)/2) written when LAST: the packed triangle of sqrt(tr) Y_1
    tr_ptr,  # (B,) written when NORMALISE: trace(Sigma)
    C,
    s_b, s_r, s_c,  # strides shared by the C x C buffers
    s_ob, s_op,  # strides of out
    NORMALISE: tl.constexpr, LAST: tl.constexpr, LOWER: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    # Y_1 and Z_1 are symmetric as computed: tiles i <= j, mirrored; when LAST, the tiles of the packed triangle.
    if not tile_in_triangle(ti, tj, LAST and LOWER):
        return
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    if NORMALISE:
        diag = tl.zeros((BLOCK,), dtype=src_ptr.dtype.element_ty)
        for d0 in range(0, C, BLOCK):
            ds = d0 + tl.arange(0, BLOCK)
            diag += tl.load(src_ptr + b * s_b + ds * (s_r + s_c), mask=ds < C, other=0.0)
        tr = tl.sum(diag, 0)
    else:
        tr = 1.0
    acc = tl.zeros((BLOCK, BLOCK), dtype=src_ptr.dtype.element_ty)
    acc = tile_product(acc, src_ptr, src_ptr, b, rows, cols, C, s_b, s_r, s_c, False, False,
                       BLOCK_K, PRECISION, EMULATE)
    a = load_tile(src_ptr, b, rows, cols, C, C, s_b, s_r, s_c) / tr
    y = 1.5 * a - (0.5 / (tr * tr)) * acc
    mirror = ti != tj
    if NORMALISE:
        store_tile(A_ptr, b, rows, cols, a, C, s_b, s_r, s_c, mirror)
        if ti + tj == 0:
            tl.store(tr_ptr + b, tr)
    if LAST:
        store_packed(out_ptr, b, s_ob, s_op, rows, cols, y * tl.sqrt(tr), C, LOWER)
    else:
        store_tile(Y_ptr, b, rows, cols, y, C, s_b, s_r, s_c, mirror)
        store_tile(Z_ptr, b, rows, cols, tl.where(_eye_tile(rows, cols), 1.5, 0.0) - 0.5 * a, C, s_b, s_r, s_c, mirror)


@triton.jit
def ns_t_kernel(
    Z_ptr,  # (B, C, C) float32/float64: Z_{k-1}
    Y_ptr,  # (B, C, C): Y_{k-1}
    T_ptr,  # (B, C, C) written: T_k = 1.5 I - 0.5 Z_{k-1} Y_{k-1}
    C,
    s_b, s_r, s_c,  # strides shared by the C x C buffers
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=Y_ptr.dtype.element_ty)
    acc = tile_product(acc, Z_ptr, Y_ptr, b, rows, cols, C, s_b, s_r, s_c, False, False, BLOCK_K, PRECISION, EMULATE)
    t = tl.where(_eye_tile(rows, cols), 1.5, 0.0) - 0.5 * acc
    store_tile(T_ptr, b, rows, cols, t, C, s_b, s_r, s_c, False)


@triton.jit
def ns_step_kernel(
    T_ptr,  # (B, C, C) float32/float64: T_k
    Y_ptr,  # (B, C, C): Y_{k-1}
    Z_ptr,  # (B, C, C): Z_{k-1}; unused when LAST
    Ynew_ptr,  # (B, C, C) written unless LAST: Y_k = Y_{k-1} T_k
    Znew_ptr,  # (B, C, C) written unless LAST: Z_k = T_k Z_{k-1}
    out_ptr,  # (B, C(C+1)/2) written when LAST: the packed triangle of sqrt(tr) Y_K
    tr_ptr,  # (B,) trace of Sigma; read when LAST
    C,
    s_b, s_r, s_c,  # strides shared by the C x C buffers
    s_ob, s_op,  # strides of out
    LAST: tl.constexpr, LOWER: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if LAST:
        if not tile_in_triangle(ti, tj, LOWER):
            return
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    acc_y = tl.zeros((BLOCK, BLOCK), dtype=Y_ptr.dtype.element_ty)
    acc_z = tl.zeros((BLOCK, BLOCK), dtype=Y_ptr.dtype.element_ty)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc_y = mm(load_tile(Y_ptr, b, rows, ks, C, C, s_b, s_r, s_c),
                   load_tile(T_ptr, b, ks, cols, C, C, s_b, s_r, s_c), acc_y, PRECISION, EMULATE)
        if not LAST:
            acc_z = mm(load_tile(T_ptr, b, rows, ks, C, C, s_b, s_r, s_c),
                       load_tile(Z_ptr, b, ks, cols, C, C, s_b, s_r, s_c), acc_z, PRECISION, EMULATE)
    if LAST:
        store_packed(out_ptr, b, s_ob, s_op, rows, cols, acc_y * tl.sqrt(tl.load(tr_ptr + b)), C, LOWER)
    else:
        store_tile(Ynew_ptr, b, rows, cols, acc_y, C, s_b, s_r, s_c, False)
        store_tile(Znew_ptr, b, rows, cols, acc_z, C, s_b, s_r, s_c, False)


@triton.jit
def ns_backward_dt_kernel(
    Yp_ptr,  # (B, C, C) float32/float64: Y_{k-1}
    dY_ptr,  # (B, C, C): dL/dY_k
    Zp_ptr,  # (B, C, C): Z_{k-1}; unused when not HAS_DZ
    dZ_ptr,  # (B, C, C): dL/dZ_k; unused when not HAS_DZ (k = K)
    dT_ptr,  # (B, C, C) written: dL/dT_k = Y_{k-1}^T dY_k + dZ_k Z_{k-1}^T
    C,
    s_b, s_r, s_c,  # strides shared by the C x C buffers
    HAS_DZ: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=Yp_ptr.dtype.element_ty)
    acc = tile_product(acc, Yp_ptr, dY_ptr, b, rows, cols, C, s_b, s_r, s_c, True, False, BLOCK_K, PRECISION, EMULATE)
    if HAS_DZ:
        acc = tile_product(acc, dZ_ptr, Zp_ptr, b, rows, cols, C, s_b, s_r, s_c, False, True,
                           BLOCK_K, PRECISION, EMULATE)
    store_tile(dT_ptr, b, rows, cols, acc, C, s_b, s_r, s_c, False)


@triton.jit
def ns_backward_step_kernel(
    dY_ptr,  # (B, C, C) float32/float64: dL/dY_k
    dZ_ptr,  # (B, C, C): dL/dZ_k; unused when not HAS_DZ (k = K)
    dT_ptr,  # (B, C, C): dL/dT_k
    T_ptr,  # (B, C, C): T_k
    Zp_ptr,  # (B, C, C): Z_{k-1}
    Yp_ptr,  # (B, C, C): Y_{k-1}
    dYp_ptr,  # (B, C, C) written: dL/dY_{k-1} = dY_k T_k^T - 0.5 Z_{k-1}^T dT_k
    dZp_ptr,  # (B, C, C) written: dL/dZ_{k-1} = T_k^T dZ_k - 0.5 dT_k Y_{k-1}^T
    C,
    s_b, s_r, s_c,  # strides shared by the C x C buffers
    HAS_DZ: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    dtype = dY_ptr.dtype.element_ty
    # One accumulator live at a time: each output starts as -0.5 times its second product.
    acc = tl.zeros((BLOCK, BLOCK), dtype=dtype)
    acc = -0.5 * tile_product(acc, Zp_ptr, dT_ptr, b, rows, cols, C, s_b, s_r, s_c, True, False,
                              BLOCK_K, PRECISION, EMULATE)
    acc = tile_product(acc, dY_ptr, T_ptr, b, rows, cols, C, s_b, s_r, s_c, False, True, BLOCK_K, PRECISION, EMULATE)
    store_tile(dYp_ptr, b, rows, cols, acc, C, s_b, s_r, s_c, False)
    acc = tl.zeros((BLOCK, BLOCK), dtype=dtype)
    acc = -0.5 * tile_product(acc, dT_ptr, Yp_ptr, b, rows, cols, C, s_b, s_r, s_c, False, True,
                              BLOCK_K, PRECISION, EMULATE)
    if HAS_DZ:
        acc = tile_product(acc, T_ptr, dZ_ptr, b, rows, cols, C, s_b, s_r, s_c, True, False,
                           BLOCK_K, PRECISION, EMULATE)
    store_tile(dZp_ptr, b, rows, cols, acc, C, s_b, s_r, s_c, False)


@triton.jit
def ns_backward_first_step_kernel(
    dY_ptr,  # (B, C, C) float32/float64: dL/dY_1
    dZ_ptr,  # (B, C, C): dL/dZ_1; unused when not HAS_DZ (K = 1)
    A_ptr,  # (B, C, C), exactly symmetric: A
    dA_ptr,  # (B, C, C) written: sym(dL/dA), the Newton-Schulz part
    parts_ptr,  # (B, T, C) contiguous, written: parts[b, j, r] = sum over column tile j of (sym(dA) * A)[r, :]
    C, T,
    s_b, s_r, s_c,  # strides shared by the C x C buffers
    HAS_DZ: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * s_b passes 2^31 once B * C * C or B * C * N does
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if ti > tj:
        return
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=dY_ptr.dtype.element_ty)  # D A + A D, D = sym(dY_1)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = mm(_sym_tile(dY_ptr, b, rows, ks, C, s_b, s_r, s_c),
                 load_tile(A_ptr, b, ks, cols, C, C, s_b, s_r, s_c), acc, PRECISION, EMULATE)
        acc = mm(load_tile(A_ptr, b, rows, ks, C, C, s_b, s_r, s_c),
                 _sym_tile(dY_ptr, b, ks, cols, C, s_b, s_r, s_c), acc, PRECISION, EMULATE)
    dA = 1.5 * _sym_tile(dY_ptr, b, rows, cols, C, s_b, s_r, s_c) - 0.5 * acc
    if HAS_DZ:
        dA -= 0.5 * _sym_tile(dZ_ptr, b, rows, cols, C, s_b, s_r, s_c)
    store_tile(dA_ptr, b, rows, cols, dA, C, s_b, s_r, s_c, ti != tj)
    # Out-of-range entries of both tiles were loaded as 0, so they add nothing here.
    prod = dA * load_tile(A_ptr, b, rows, cols, C, C, s_b, s_r, s_c)
    tl.store(parts_ptr + (b * T + tj) * C + rows, tl.sum(prod, 1), mask=rows < C)
    if ti != tj:
        tl.store(parts_ptr + (b * T + ti) * C + cols, tl.sum(prod, 0), mask=cols < C)


# --- launchers ---------------------------------------------------------------------------------------


def _strides(*mats: torch.Tensor) -> tuple[int, int, int]:
    """The one stride triple of the C x C buffers of a launch (all allocated here, or made contiguous)."""
    strides = {m.stride() for m in mats}
    assert len(strides) == 1, f"C x C buffers of one launch must share strides; got {strides}"
    return mats[0].stride()


def _grids(b: int, c: int, cfg: LaunchConfig):
    t = cfg.tiles(c)
    return (b, t, t)


def _settings(cfg: LaunchConfig) -> dict:
    return dict(BLOCK=cfg.block, BLOCK_K=cfg.block_k, PRECISION=cfg.precision, EMULATE=cfg.emulate,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _run_steps(iterates, keep_iterates, iters, out, tr, lower, pack, cfg) -> None:
    """Steps k = 2..K on the slots of `iterates` (slot k-2, or alternating slots when not keep_iterates).

    pack: the last step writes the packed triangle; otherwise the sweep stops after T_K (what the
    backward needs).
    """
    if iters < 2:
        return
    _, _, b, c, _ = iterates.shape
    grid = _grids(b, c, cfg)
    s = _strides(*iterates.flatten(0, 1).unbind(0))
    slot = (lambda k: k - 2) if keep_iterates else (lambda k: (k - 2) % 2)
    for k in range(2, iters + 1):
        Yp, Zp, T = iterates[slot(k)].unbind(0)
        ns_t_kernel[grid](Zp, Yp, T, c, *s, **_settings(cfg))
        last = k == iters
        if last and not pack:
            return
        Yn, Zn = (Yp, Zp) if last else iterates[slot(k + 1)].unbind(0)[:2]
        ns_step_kernel[grid](
            T, Yp, Zp, Yn, Zn, out, tr, c, *s, *out.stride(), LAST=last, LOWER=lower, **_settings(cfg)
        )


def newton_schulz_forward(sigma: torch.Tensor, iters: int, lower: bool, keep_iterates: bool, cfg: LaunchConfig):
    """(out (B, C(C+1)/2), A, tr (B,), iterates) from Sigma (B, C, C); iterates is empty unless keep_iterates."""
    b, c, _ = sigma.shape
    A = torch.empty_like(sigma)
    tr = sigma.new_empty(b)
    out = sigma.new_empty(b, c * (c + 1) // 2)
    slots = iters - 1 if keep_iterates else min(iters - 1, 2)
    iterates = sigma.new_empty(slots, 3, b, c, c)
    Y1, Z1 = iterates[0].unbind(0)[:2] if iters > 1 else (sigma, sigma)
    ns_first_step_kernel[_grids(b, c, cfg)](
        sigma, A, Y1, Z1, out, tr, c, *_strides(sigma, A, Y1, Z1), *out.stride(),
        NORMALISE=True, LAST=iters == 1, LOWER=lower, **_settings(cfg),
    )
    _run_steps(iterates, keep_iterates, iters, out, tr, lower, True, cfg)
    return out, A, tr, iterates if keep_iterates else sigma.new_empty(0)


def newton_schulz_iterates(A: torch.Tensor, iters: int, cfg: LaunchConfig) -> torch.Tensor:
    """The kept iterates (K-1, 3, B, C, C) recomputed from A (for a forward that did not keep them)."""
    b, c, _ = A.shape
    iterates = A.new_empty(iters - 1, 3, b, c, c)
    if iters == 1:
        return iterates
    Y1, Z1 = iterates[0].unbind(0)[:2]
    ns_first_step_kernel[_grids(b, c, cfg)](
        A, A, Y1, Z1, A, A, c, *_strides(A, Y1, Z1), 0, 0,
        NORMALISE=False, LAST=False, LOWER=True, **_settings(cfg),
    )
    # out and tr are only touched by a last step, which pack=False stops before.
    _run_steps(iterates, True, iters, A.new_empty(0, 0), A, True, False, cfg)
    return iterates


def newton_schulz_backward(dY: torch.Tensor, A: torch.Tensor, iterates: torch.Tensor, iters: int, cfg: LaunchConfig):
    """(sym(dL/dA) (B, C, C), row partial sums of sym(dA) * A (B, T*C)) from dL/dY_K and the kept iterates."""
    b, c, _ = A.shape
    grid = _grids(b, c, cfg)
    s = _strides(A, dY)
    dZ = None
    for k in range(iters, 1, -1):
        Yp, Zp, T = iterates[k - 2].unbind(0)
        has_dz = dZ is not None
        dT = torch.empty_like(A)
        ns_backward_dt_kernel[grid](Yp, dY, Zp, dZ if has_dz else A, dT, c, *_strides(A, Yp, Zp, T),
                                    HAS_DZ=has_dz, **_settings(cfg))
        dYp, dZp = torch.empty_like(A), torch.empty_like(A)
        ns_backward_step_kernel[grid](dY, dZ if has_dz else A, dT, T, Zp, Yp, dYp, dZp, c, *s,
                                      HAS_DZ=has_dz, **_settings(cfg))
        dY, dZ = dYp, dZp
    t = cfg.tiles(c)
    dA = torch.empty_like(A)
    parts = A.new_empty(b, t * c)
    ns_backward_first_step_kernel[grid](dY, dZ if dZ is not None else A, A, dA, parts, c, t, *s,
                                        HAS_DZ=dZ is not None, **_settings(cfg))
    return dA, parts
