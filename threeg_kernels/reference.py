"""The plain pure-PyTorch statement of the 3G pooling head: docs/math.md (1)-(8).

Every stage is written as the equation reads and autograd differentiates it. This module is the
yardstick that every backend is tested against; it is not meant to be fast.

Shapes: x is (B, C, N), weight is (B, N) or None; the public API (`threeg_kernels.cov_pool`)
canonicalises the user's shapes before calling :func:`cov_pool`.

Dtypes: float32 and float64 are computed in their own dtype; float16 / bfloat16 are computed in
float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

ORDERS = ("3g", "mpncov")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    """The C x C identity for a (..., C, C) or (..., C, N) tensor."""
    return torch.eye(m.shape[-2], dtype=m.dtype, device=m.device)


def weighted_covariance(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-7) -> torch.Tensor:
    """Sigma of docs/math.md (1), as Xc Xc^T / N + eps I: the N x N centring matrix is never built."""
    n = x.shape[-1]
    xw = x if weight is None else x * weight.unsqueeze(1)
    xc = xw - xw.mean(dim=-1, keepdim=True)
    return xc @ xc.transpose(-1, -2) / n + eps * _eye_like(xc)


def trace_normalise(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (A, tr) of docs/math.md (2), tr of shape (B,)."""
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    return sigma / tr[:, None, None], tr


def newton_schulz(A: torch.Tensor, iters: int) -> torch.Tensor:
    """Y_K of the coupled Newton-Schulz iteration, docs/math.md (3) as written (no first-step shortcut);
    the last Z is never used, so it is not computed."""
    eye = _eye_like(A)
    Y, Z = A, eye.expand_as(A)
    for k in range(iters):
        T = (3.0 * eye - Z @ Y) / 2.0
        Y = Y @ T
        if k + 1 < iters:
            Z = T @ Z
    return Y


def triangle_indices(c: int, order: str, device=None) -> torch.Tensor:
    """Flat indices (into a row-major C x C matrix) of the vectorised triangle in `order`: docs/math.md (7)-(8)."""
    if order == "3g":
        rows, cols = torch.tril_indices(c, c, device=device)
    elif order == "mpncov":
        rows, cols = torch.triu_indices(c, c, device=device)
    else:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    return rows * c + cols


def pack_triangle(S: torch.Tensor, order: str = "3g") -> torch.Tensor:
    """(B, C, C) -> (B, C(C+1)/2) in the given triangle order."""
    b, c, _ = S.shape
    return S.reshape(b, c * c)[:, triangle_indices(c, order, S.device)]


def cov_pool(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    iters: int = 5,
    eps: float = 1e-7,
    order: str = "3g",
) -> torch.Tensor:
    """Reference 3G pooling, docs/math.md (1)-(8): x (B, C, N), weight (B, N) or None -> (B, C(C+1)/2)."""
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    wf = None if weight is None else weight.to(dtype)
    sigma = weighted_covariance(xf, wf, eps)
    A, tr = trace_normalise(sigma)
    S = tr.sqrt()[:, None, None] * newton_schulz(A, iters)
    return pack_triangle(S, order).to(x.dtype)
