"""The FLOP model of the benchmark: the symmetry-minimal work of the 3G pooling head (the products of docs/math.md).

Every row of `python -m benchmarks.pool_speed` reports TFLOP/s against this one count, whatever the
row actually computes: a method that does more work (an N x N centring matrix, products it could have
skipped, both triangles of a symmetric result) shows a lower TFLOP/s, not a higher count.
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "full")


def cov_pool_flops(B: int, C: int, N: int, K: int, mode: str) -> int:
    """Minimal floating-point operations of cov_pool for `mode` ('fwd', 'bwd' or 'full' = fwd + bwd).

    Only the matrix products are counted (2 FLOP per multiply-add); the elementwise work (centring,
    weighting, trace, scaling, triangle gather/scatter) is O(B C^2 + B C N) and left out.
    Write F = 2 B C^3 for one batched C x C x C product with a general result, and
    H = B C^2 (C + 1) for one whose result is symmetric (only the C(C+1)/2 entries of one triangle,
    2C FLOP each: Y_k, Z_k, T_k are polynomials in A, so all their products are symmetric).

    Forward:
      covariance Xc Xc^T / N, symmetric:                          B C (C + 1) N
      Newton-Schulz, step 1 (T_1 = 1.5 I - 0.5 A needs no
      product, Y_1 = A T_1 one), steps 2..K (Z Y, Y T, and T Z
      except at k = K, whose Z is never used):                    (1 + 3 (K - 1) - [K >= 2]) H
                                                                  (12 H for K = 5)
    Backward (the symmetric reverse sweep of the 'torch' backend, threeg_kernels/backends/torch_impl.py):
      reverse of step K (dZ_K = 0): Y dY, dY T general; Y dY Y symmetric:        2 F + 1 H
      reverse of steps K-1..2: Y dY, dY T, Z dZ, T dZ general;
                               Z dZ Z, Y dY Y symmetric:                         (K - 2) (4 F + 2 H)
      reverse of step 1: dY T_1 general:                                         1 F
      dL/dX_w = 2 dSigma Xc / N, a general C x C x N product:                    2 B C^2 N
    (For K = 1 the backward is the step-1 product and dL/dX_w only.)

    At B=256, C=256, N=196, K=5: forward 55.0, backward 165.6, full 220.6 GFLOP.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if min(B, C, N, K) < 1:
        raise ValueError(f"B, C, N and K must be >= 1; got B={B} C={C} N={N} K={K}")
    F = 2 * B * C**3
    H = B * C * C * (C + 1)
    fwd = B * C * (C + 1) * N + (1 + 3 * (K - 1) - (K >= 2)) * H
    bwd = 1 * F + 2 * B * C * C * N
    if K >= 2:
        bwd += 2 * F + 1 * H + (K - 2) * (4 * F + 2 * H)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]
