"""Checks of the user's arguments to `cov_pool`, with errors that name the argument and what came in."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .reference import ORDERS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Matmul input precisions of cov_pool, each with the max relative error against the float64 reference it
# promises (and the tests hold it to): "ieee" (fp32-accurate, the default) or the opt-in faster modes
# "tf32x3" (three TF32 tensor-core products per product: the fp32 bound), "tf32", "bf16" (docs/triton.md).
PRECISION_BOUNDS = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 5e-3, "bf16": 5e-2}
PRECISIONS = tuple(PRECISION_BOUNDS)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def canonicalise(x, weight) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Checks x / weight and returns views x (B, C, N) and weight (B, N) or None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W) or (B, C, N); got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {_describe(x)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape (B, C, H, W) or (B, C, N); got {x.dim()}-d {_describe(x)}")
    b, c = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    n = 1
    for size in spatial:  # not math.prod: the sizes may be symbolic under torch.compile(dynamic=True)
        n = n * size
    if c < 1:
        raise ValueError(f"x must have C >= 1 channels; got {_describe(x)}")
    if n < 2:
        raise ValueError(
            f"x must have N = H*W >= 2 spatial positions (a covariance of one sample is zero); got {_describe(x)}"
        )
    # (reshape is skipped where it would return x as it is: one of the costs of a call at small shapes)
    x3 = x if len(spatial) == 1 else x.reshape(b, c, n)
    if weight is None:
        return x3, None

    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None; got {type(weight).__name__}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on the device of x ({x.device}); got {_describe(weight)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}); got {_describe(weight)}")
    accepted = [(b, 1) + spatial, (b,) + spatial]
    if len(spatial) == 2:
        accepted.append((b, n))
    if tuple(weight.shape) not in accepted:
        shapes = " or ".join(str(s) for s in accepted)
        raise ValueError(
            f"weight must have shape {shapes} to match x of shape {tuple(x.shape)}; got {tuple(weight.shape)}"
        )
    return x3, (weight if weight.dim() == 2 else weight.reshape(b, n))


# The supported Newton-Schulz step counts, docs/math.md ("How many steps"): in float32 the coupled iteration
# loses accuracy geometrically beyond ~20 steps on rank-deficient covariances (NaN by ~26-30), on every
# backend that runs it; 3G-Net uses 5, iSQRT-COV 3-5.
MAX_ITERS = 20


def check_options(iters, eps, order) -> None:
    # The common case first, without the abstract-class checks below (isinstance of numbers.Integral: ~1 us a call).
    if type(iters) is int and type(eps) is float and 1 <= iters <= MAX_ITERS and 0 <= eps < math.inf:
        if order in ORDERS:
            return
    if isinstance(iters, bool) or not isinstance(iters, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"iters must be an int in [1, {MAX_ITERS}]; got {iters!r} ({type(iters).__name__})")
    if not 1 <= iters <= MAX_ITERS:
        raise ValueError(
            f"iters must be in [1, {MAX_ITERS}] (beyond that float32 Newton-Schulz loses accuracy on "
            f"rank-deficient covariances; docs/math.md); got {iters}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"eps must be a real number >= 0; got {eps!r} ({type(eps).__name__})")
    if not 0 <= eps < math.inf:  # comparisons, not math.isfinite: eps may be symbolic under torch.compile
        raise ValueError(f"eps must be finite and >= 0; got {eps!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")


def check_precision(precision) -> None:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


def check_keep_iterates(keep_iterates) -> None:
    if keep_iterates is not None and not isinstance(keep_iterates, bool):
        raise TypeError(
            f"keep_iterates must be True, False or None (the backend's default); got {keep_iterates!r} "
            f"({type(keep_iterates).__name__})"
        )


_NORMAL_RANGE = {dtype: (torch.finfo(dtype).tiny, torch.finfo(dtype).max) for dtype in FLOAT_DTYPES}


def check_eps_representable(eps, dtype: torch.dtype) -> None:
    """ValueError unless eps > 0 survives the cast to the compute dtype (neither 0 nor inf there)."""
    tiny, largest = _NORMAL_RANGE[dtype]
    if eps != 0 and not tiny <= eps <= largest:
        finfo = torch.finfo(dtype)
        raise ValueError(
            f"eps must be 0 or between {finfo.tiny:.3g} and {finfo.max:.3g} to be representable in the compute "
            f"dtype {dtype} (a normal number: smaller would vanish or lose precision on the diagonal); got {eps!r}"
        )
