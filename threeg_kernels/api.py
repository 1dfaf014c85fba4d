"""The public functional API and module of the 3G pooling head."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.autograd import forward_ad

from . import autoselect, dispatch
from ._precision import no_autocast
from ._validate import (
    canonicalise,
    check_eps_representable,
    check_keep_iterates,
    check_options,
    check_precision,
)
from .reference import compute_dtype


def cov_pool(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    iters: int = 5,
    eps: float = 1e-7,
    order: str = "3g",
    backend: str = "auto",
    precision: str = "ieee",
    keep_iterates: Optional[bool] = None,
) -> torch.Tensor:
    """Global (weighted) covariance pooling with a Newton-Schulz matrix square root (3G-Net / iSQRT-COV).

    Computes, per sample, the weighted covariance Sigma of x (docs/math.md (1)), A = Sigma / trace(Sigma)
    (2), `iters` coupled Newton-Schulz steps Y_K ~ A^{1/2} (3)-(5), S = sqrt(trace) Y_K (6), and returns
    the C(C+1)/2 entries of one triangle of S in `order` (7)-(8).

    Args:
        x: features, (B, C, H, W) or (B, C, N); float16, bfloat16, float32 or float64. N = H*W >= 2.
        weight: optional spatial weights broadcast over channels: (B, 1, H, W), (B, H, W) or (B, N)
            for 4-d x; (B, 1, N) or (B, N) for 3-d x. Same dtype and device as x.
        iters: Newton-Schulz steps K in [1, 20] (3G-Net uses 5, iSQRT-COV 3; docs/math.md, "How many steps").
        eps: >= 0, added to the diagonal of Sigma. eps > 0 makes trace(Sigma) >= C * eps > 0.
        order: '3g' (default; lower triangle row by row, the order the released ResNet-3G classifiers
            were trained on) or 'mpncov' (upper triangle row by row). Part of the interface: changing
            it silently breaks a trained classifier.
        backend: 'auto' (CPU: the fastest backend present, by a measured order; CUDA: measured per shape
            on the user's GPU at first use, docs/autoselect.md; the THREEG_BACKEND environment variable
            overrides it), or one of 'reference', 'torch', 'triton', 'ext'.
            `threeg_kernels.available_backends(device)` lists those present.
        precision: matmul inputs: 'ieee' (default; fp32-accurate), or the opt-in tensor-core modes
            'tf32x3' (three TF32 products per product: within the fp32 bound of 1e-5), 'tf32' or
            'bf16' (fp32 accumulation; faster, less accurate: docs/triton.md has the measured error).
            Only the 'triton' backend accepts the opt-in modes; float64 is always ieee. 'ieee' holds whatever
            faster float32 matmul mode the calling script allows (torch.backends.cuda.matmul.allow_tf32,
            torch.set_float32_matmul_precision): the 'torch' and 'ext' backends force IEEE float32 for their own
            products and restore the setting after each op.
        keep_iterates: what the backward of the 'torch', 'ext' and 'triton' backends starts from: True keeps
            the Newton-Schulz iterates (or, for 'ext' on CPU, the eigendecomposition) from the forward, False
            recomputes them in the backward (less memory, more work), None (default) uses the backend's
            default (keep: docs/benchmark.md has the measurements). The result is the same either way; the
            'reference' backend differentiates with autograd and ignores it.

    Returns:
        (B, C(C+1)/2) tensor of x's dtype. float16/bfloat16 inputs are computed in float32 (autocast
        is disabled inside) and the result cast back; float64 is computed in float64 throughout. The backward
        also computes in float32 when loss.backward() runs inside an autocast region (backend 'reference'
        excepted: its backward is autograd's, whose products autocast casts). B = 0 gives a (0, C(C+1)/2) result.

    Autograd: the gradient of every backend equals autograd of the reference math (docs/math.md). Under
    torch.func transforms (grad, jacrev, jacfwd, jvp, vmap, hessian) and forward-mode AD, cov_pool evaluates
    the reference math on any backend; a gradient that is itself differentiated (create_graph=True: gradient
    penalties, double backward) is taken through the reference math too.

    Non-finite inputs are not checked (that would cost a device sync): a NaN or Inf in a sample gives
    NaN/Inf in that sample's output and gradients, and in no other sample. With eps=0, a sample whose
    covariance is exactly zero (constant features) has trace 0 and its output is NaN; keep eps > 0.

    Raises:
        TypeError / ValueError naming the argument for malformed inputs;
        dispatch.BackendUnavailableError when a named backend cannot run here (the message says why).
    """
    if _FAST_POOL is not None and not torch.compiler.is_compiling():
        # backend='ext''s common eager case on CPU (plain float32/float64 tensors, valid options, no transform, mode
        # or autocast) in one C++ call that takes the steps below; None for anything else. 'auto' is 'ext' there
        # unless THREEG_BACKEND names another backend (read at each call, as dispatch.resolve does; fast_pool declines
        # every tensor not on the CPU, whose 'auto' the steps below decide; a backend that is not a str is left to
        # their checks, as fast_pool leaves it).
        fast = backend
        if type(backend) is str and backend == "auto" and _auto_cpu_is_ext():
            fast = "ext" if dispatch.forced_backend() in (None, "ext") else backend
        out = _FAST_POOL(x, weight, iters, eps, order, fast, precision, keep_iterates)
        if out is not None:
            return out
    x3, w2 = canonicalise(x, weight)
    check_options(iters, eps, order)
    check_precision(precision)
    check_keep_iterates(keep_iterates)
    chosen = dispatch.resolve(backend, x3.device)
    if _transformed(x, weight):
        # torch.func transforms and forward-mode AD need a derivative rule the registered ops do not have:
        # evaluate the reference math, whose plain torch ops support them all.
        chosen = dispatch.resolve("reference", x3.device)
    if precision not in chosen.precisions:
        raise ValueError(
            f"precision={precision!r} needs a backend that supports it (the 'triton' backend); "
            f"backend={backend!r} on {x3.device} runs one that supports only {chosen.precisions}"
        )
    dtype = compute_dtype(x3.dtype)
    check_eps_representable(eps, dtype)
    # Without a backward to come (no_grad, inference_mode, or no input that needs a gradient) keeping the
    # iterates would only hold memory.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    keep = needs_grad and (chosen.keep_iterates if keep_iterates is None else keep_iterates)
    # (casts only where the dtype changes: each .to() is a call, and a call's fixed cost is what small shapes pay)
    with no_autocast(x3.device.type):
        xc = x3 if x3.dtype == dtype else x3.to(dtype)
        wc = None if w2 is None else (w2 if w2.dtype == dtype else w2.to(dtype))
        out = chosen.pool(xc, wc, int(iters), float(eps), order, precision, keep)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _fast_entry():
    """threeg_kernels._C.fast_pool where the ext backend runs on CPU, else None. fast_pool (csrc/autograd.cpp) runs
    cov_pool(backend='ext')'s common eager CPU case in one call: after a call's kernels have filled the core's
    caches, the Python frames and checks below cost ~8-10% of a call at C = 64, N = 196 (docs/ext.md, "Per-call
    cost"). cov_pool passes it 'auto' as 'ext' where that is what 'auto' resolves to (_auto_cpu_is_ext)."""
    if dispatch.unavailable_reason("ext", torch.device("cpu")) is not None:
        return None
    from . import _C

    return _C.fast_pool


_FAST_POOL = _fast_entry()
_CPU = torch.device("cpu")


def _auto_cpu_is_ext() -> bool:
    """Whether backend='auto' on a CPU tensor runs 'ext' when THREEG_BACKEND is unset (called where _FAST_POOL exists,
    so 'ext' is present): 'ext' heads dispatch.AUTO_ORDER['cpu'] and autoselect does not measure on the CPU (the test
    dispatch._resolve_auto makes). Read at each call, as dispatch.resolve reads them (tests give autoselect a CPU
    row)."""
    return dispatch.AUTO_ORDER.get("cpu", ())[:1] == ("ext",) and not autoselect.measures(_CPU)


def _transformed(x: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """True inside a torch.func transform (grad, jacrev, jvp, vmap, ...) or when an input carries a
    forward-mode tangent (torch.autograd.forward_ad)."""
    if torch.compiler.is_compiling():
        return False  # what torch.compile traces is differentiated by AOTAutograd, through the ops' formulas
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in (x, weight))


class CovPool(nn.Module):
    """Module form of :func:`cov_pool`: forward(x, weight=None) -> (B, C(C+1)/2)."""

    def __init__(
        self,
        iters: int = 5,
        eps: float = 1e-7,
        order: str = "3g",
        backend: str = "auto",
        precision: str = "ieee",
        keep_iterates: Optional[bool] = None,
    ):
        super().__init__()
        check_options(iters, eps, order)
        check_precision(precision)
        check_keep_iterates(keep_iterates)
        dispatch.check_backend(backend)
        self.iters, self.eps, self.order, self.backend = iters, eps, order, backend
        self.precision, self.keep_iterates = precision, keep_iterates

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return cov_pool(
            x,
            weight,
            iters=self.iters,
            eps=self.eps,
            order=self.order,
            backend=self.backend,
            precision=self.precision,
            keep_iterates=self.keep_iterates,
        )

    def extra_repr(self) -> str:
        extra = "" if self.precision == "ieee" else f", precision={self.precision!r}"
        if self.keep_iterates is not None:
            extra += f", keep_iterates={self.keep_iterates}"
        return f"iters={self.iters}, eps={self.eps}, order={self.order!r}, backend={self.backend!r}{extra}"

    @staticmethod
    def output_dim(channels: int) -> int:
        return channels * (channels + 1) // 2
