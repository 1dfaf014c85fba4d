"""The baselines the benchmark puts next to the backends: what users would otherwise run.

Each is written here from the published method (docs/math.md; the iSQRT-COV paper, Li et al.,
CVPR 2018; the 3G-Net paper, Wang et al., CVPR 2019), as a re-statement: no upstream code is copied.
All take x (B, C, N), weight (B, N) and K, apply the weight first (3G-Net does it in its last
re-weighting block) and return the (B, C(C+1)/2) triangle in the order they were made with.

- isqrt-style: the iSQRT-COV layer as its paper describes it: covariance through the explicit N x N
  centring matrix, the coupled Newton-Schulz iteration from Z_0 = I keeping every Y_k and Z_k
  (3K products forward: 15 for K = 5), and a hand-written backward (an autograd.Function) that runs
  the plain, non-symmetric reverse sweep of the chain rule.
- autograd-style: the same formulas left to autograd, with the triangle gathered by a per-sample
  Python loop, as the 3G-Net release did.
- eigh: the exact square root Sigma^{1/2} = U diag(sqrt(l)) U^T through torch.linalg.eigh, with
  autograd. A different function from the K-step iteration: its error is against the exact square
  root, and its gradient is ill-conditioned when Sigma has repeated eigenvalues (C > N).
- compile-ref: torch.compile of threeg_kernels.reference.cov_pool with dynamic shapes: B and N stay
  symbolic, C is specialised (the identity and triangle indices need it), so one compile per C and dtype.
- upstream-3g / upstream-mpncov (only with --upstream-3g / --upstream-mpncov): not a re-statement but the
  original projects' code, imported at run time from a checkout the user points to (the published 3G-Net
  repository as it is: its head is in models/ResNet_3G.py). Nothing of it is shipped here; the tables mark
  these rows with † instead of the re-statements' *.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

from threeg_kernels import reference


@dataclass(frozen=True)
class Method:
    """One row kind of the benchmark: a backend or a baseline."""

    name: str
    kind: str  # 'backend' or 'baseline'
    fn: Callable  # (x (B, C, N), weight (B, N), iters) -> (B, C(C+1)/2)
    eps: float  # the eps it adds to Sigma's diagonal, and
    order: str  # the triangle order it returns: the reference it is checked against uses the same
    exact: bool = False  # True: computes the exact square root, not the K-step iteration
    description: str = ""
    precision: Optional[str] = None  # backends: cov_pool's precision; None for baselines
    iterates: Optional[str] = None  # backends: 'default', 'keep' or 'recompute' (cov_pool's keep_iterates)

    @property
    def label(self) -> str:
        return label(self.name, self.precision, self.iterates)


def label(name: str, precision: Optional[str], iterates: Optional[str]) -> str:
    """'triton tf32 recompute': the name, then the precision and iterates setting when not the defaults."""
    return " ".join([name] + [s for s in (precision, iterates) if s not in (None, "ieee", "default")])


EPS = 1e-7  # cov_pool's default eps, used by every backend and every baseline written here


def _weighted(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    return x if weight is None else x * weight.unsqueeze(1)


def _centring_matrix(b: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """(1/N)(I_N - 1 1^T / N), one materialised copy per sample (the batched formulation's memory cost)."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return ((eye - 1.0 / n) / n).repeat(b, 1, 1)


def _eye_batch(b: int, c: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(c, dtype=like.dtype, device=like.device).repeat(b, 1, 1)


# ---------------------------------------------------------------------------------------- isqrt-style


class _IsqrtStyle(torch.autograd.Function):
    """Forward: Sigma = X Ibar X^T + eps I, A = Sigma / tr, K Newton-Schulz steps from Z_0 = I, S = sqrt(tr) Y_K.

    Backward, the plain chain rule in reverse, step k = K..1 with T_k = (3I - Z_{k-1} Y_{k-1}) / 2:
        dT = Y_{k-1}^T dY_k + dZ_k Z_{k-1}^T
        dY_{k-1} = dY_k T^T - 0.5 Z_{k-1}^T dT,   dZ_{k-1} = T^T dZ_k - 0.5 dT Y_{k-1}^T
    from dY_K = sqrt(tr) dS and dZ_K = 0; then dA = dY_0,
        dSigma = dA / tr + (<dS, Y_K> / (2 sqrt(tr)) - <dA, A> / tr) I,   dX = (dSigma + dSigma^T) X Ibar.
    """

    @staticmethod
    def forward(ctx, xw, iters, eps, order):
        b, c, n = xw.shape
        ibar = _centring_matrix(b, n, xw)
        eye = _eye_batch(b, c, xw)
        sigma = xw.bmm(ibar).bmm(xw.transpose(1, 2)) + eps * eye
        tr = (sigma * eye).sum((1, 2))
        A = sigma / tr[:, None, None]
        Ys, Zs = [A], [eye]
        for _ in range(iters):
            T = 0.5 * (3.0 * eye - Zs[-1].bmm(Ys[-1]))
            Ys.append(Ys[-1].bmm(T))
            Zs.append(T.bmm(Zs[-1]))
        S = Ys[-1] * tr.sqrt()[:, None, None]
        index = reference.triangle_indices(c, order, xw.device)
        ctx.save_for_backward(xw, ibar, A, tr, torch.stack(Ys), torch.stack(Zs), index)
        ctx.iters = iters
        return S.reshape(b, c * c)[:, index]

    @staticmethod
    def backward(ctx, grad):
        xw, ibar, A, tr, Ys, Zs, index = ctx.saved_tensors
        b, c, _ = xw.shape
        eye = _eye_batch(b, c, xw)
        dS = grad.new_zeros(b, c * c)
        dS[:, index] = grad
        dS = dS.view(b, c, c)
        sqrt_tr = tr.sqrt()[:, None, None]
        dY, dZ = dS * sqrt_tr, torch.zeros_like(dS)
        for k in range(ctx.iters, 0, -1):
            Y, Z = Ys[k - 1], Zs[k - 1]
            T = 0.5 * (3.0 * eye - Z.bmm(Y))
            dT = Y.transpose(1, 2).bmm(dY) + dZ.bmm(Z.transpose(1, 2))
            dY, dZ = (
                dY.bmm(T.transpose(1, 2)) - 0.5 * Z.transpose(1, 2).bmm(dT),
                T.transpose(1, 2).bmm(dZ) - 0.5 * dT.bmm(Y.transpose(1, 2)),
            )
        dA = dY
        dtr = (dS * Ys[-1]).sum((1, 2)) / (2.0 * sqrt_tr[:, 0, 0]) - (dA * A).sum((1, 2)) / tr
        dsigma = dA / tr[:, None, None] + dtr[:, None, None] * eye
        dxw = (dsigma + dsigma.transpose(1, 2)).bmm(xw).bmm(ibar)
        return dxw, None, None, None


def isqrt_style(x, weight, iters, eps=EPS, order="3g"):
    return _IsqrtStyle.apply(_weighted(x, weight), iters, eps, order)


# ------------------------------------------------------------------------------------- autograd-style


def autograd_style(x, weight, iters, eps=EPS, order="3g"):
    """The formulas as they read, differentiated by autograd; the triangle gathered sample by sample."""
    xw = _weighted(x, weight)
    b, c, n = xw.shape
    eye = _eye_batch(b, c, xw)
    sigma = xw.bmm(_centring_matrix(b, n, xw)).bmm(xw.transpose(1, 2)) + eps * eye
    tr = (sigma * eye).sum((1, 2))
    Y, Z = sigma / tr[:, None, None], eye
    for _ in range(iters):
        T = 0.5 * (3.0 * eye - Z.bmm(Y))
        Y, Z = Y.bmm(T), T.bmm(Z)
    S = (Y * tr.sqrt()[:, None, None]).reshape(b, c * c)
    index = reference.triangle_indices(c, order, xw.device)
    out = S.new_zeros(b, index.numel())
    for i in range(b):
        out[i] = S[i, index]
    return out


# ----------------------------------------------------------------------------------------------- eigh


def eigh_sqrt(x, weight, iters, eps=EPS, order="3g"):
    """Exact Sigma^{1/2} by eigendecomposition (iters is ignored). Computed in float32 at least:
    torch.linalg.eigh has no half-precision kernels, so autocast is disabled inside."""
    dtype = reference.compute_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        sigma = reference.weighted_covariance(x.to(dtype), None if weight is None else weight.to(dtype), eps)
        L, U = torch.linalg.eigh(sigma)
        S = (U * L.clamp_min(0).sqrt().unsqueeze(-2)) @ U.transpose(-1, -2)
    return reference.pack_triangle(S, order).to(x.dtype)


def exact_sqrt_triangle(x, weight, eps=EPS, order="3g"):
    """The exact square root in float64: what the eigh baseline is checked against."""
    return eigh_sqrt(x.double(), None if weight is None else weight.double(), 0, eps, order)


# ---------------------------------------------------------------------------------------- compile-ref


@lru_cache(maxsize=1)
def _compiled_reference():
    return torch.compile(reference.cov_pool, dynamic=True)


def compile_ref(x, weight, iters, eps=EPS, order="3g"):
    return _compiled_reference()(x, weight, iters, eps, order)


BASELINES = {
    "isqrt-style": Method(
        "isqrt-style",
        "baseline",
        isqrt_style,
        EPS,
        "3g",
        description="N x N centring, all Y_k/Z_k kept, hand-written plain reverse sweep",
    ),
    "autograd-style": Method(
        "autograd-style",
        "baseline",
        autograd_style,
        EPS,
        "3g",
        description="plain formulas + autograd, per-sample triangle loop",
    ),
    "eigh": Method(
        "eigh",
        "baseline",
        eigh_sqrt,
        EPS,
        "3g",
        exact=True,
        description="exact sqrt via torch.linalg.eigh (a different function)",
    ),
    "compile-ref": Method(
        "compile-ref", "baseline", compile_ref, EPS, "3g", description="torch.compile(reference.cov_pool, dynamic=True)"
    ),
}


# ------------------------------------------------------------------------------ upstream, at run time


class UpstreamImportError(RuntimeError):
    """An --upstream-* path does not hold the expected file or symbols; the message says what is missing."""


# Where each upstream project keeps its pooling code (the first of these files that exists), and the names
# it is called by there.
UPSTREAM_LAYOUT = {
    # github.com/csqlwang/3G-Net: module-level functions of the ResNet-3G model file (models/ResNet_3G.py in
    # the published repository; models/resnet.py in copies that renamed it)
    "upstream-3g": (("models/ResNet_3G.py", "models/resnet.py"), ("cov_forward", "sqrt_forward", "triu_forward")),
    # github.com/jiangtaoxie/fast-MPN-COV: the iSQRT-COV layer, MPNCOV(iterNum, is_sqrt, is_vec, input_dim, ...)
    "upstream-mpncov": (("src/representation/MPNCOV.py",), ("MPNCOV",)),
}


def _import_upstream(name: str, path) -> object:
    candidates, symbols = UPSTREAM_LAYOUT[name]
    flag = f"--{name}"
    root = Path(path).expanduser()
    files = [root] if root.is_file() else [root / relative for relative in candidates]
    file = next((f for f in files if f.is_file()), None)
    if file is None:
        raise UpstreamImportError(
            f"{flag} {path}: expected a checkout holding {' or '.join(candidates)} (or that file itself); "
            f"none of {', '.join(map(str, files))} exists"
        )
    spec = importlib.util.spec_from_file_location(f"_threeg_bench_{name.replace('-', '_')}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UpstreamImportError(f"{flag}: importing {file} failed: {type(exc).__name__}: {exc}") from exc
    missing = [s for s in symbols if not callable(getattr(module, s, None))]
    if missing:
        raise UpstreamImportError(f"{flag}: {file} defines no {', '.join(missing)} (expected {', '.join(symbols)})")
    return module


def upstream_3g(path) -> Method:
    """3G-Net's cov_forward -> sqrt_forward(., K) -> triu_forward on X_w viewed as (B, C, N, 1)."""
    mod = _import_upstream("upstream-3g", path)

    def fn(x, weight, iters):
        b, c, n = x.shape
        xw = _weighted(x, weight).reshape(b, c, n, 1)
        return mod.triu_forward(mod.sqrt_forward(mod.cov_forward(xw), iters)).reshape(b, -1)

    # 3G-Net adds 1e-7 I to Sigma and gathers the lower triangle row by row (order '3g').
    return Method("upstream-3g", "baseline", fn, 1e-7, "3g", description=f"3G-Net code from {path}")


def upstream_mpncov(path) -> Method:
    """fast-MPN-COV's MPNCOV layer (no dimension reduction) on X_w viewed as (B, C, N, 1)."""
    mod = _import_upstream("upstream-mpncov", path)
    params = inspect.signature(mod.MPNCOV).parameters
    wanted = ("iterNum", "is_sqrt", "is_vec", "input_dim", "dimension_reduction")
    if not all(p in params for p in wanted):
        raise UpstreamImportError(f"--upstream-mpncov: MPNCOV{inspect.signature(mod.MPNCOV)} lacks some of {wanted}")
    layers = {}

    def fn(x, weight, iters):
        b, c, n = x.shape
        key = (iters, c, x.device, x.dtype)
        if key not in layers:
            layer = mod.MPNCOV(iterNum=iters, is_sqrt=True, is_vec=True, input_dim=c, dimension_reduction=None)
            layers[key] = layer.to(device=x.device, dtype=x.dtype)
        return layers[key](_weighted(x, weight).reshape(b, c, n, 1)).reshape(b, -1)

    # iSQRT-COV adds no eps and returns the upper triangle row by row (order 'mpncov').
    return Method("upstream-mpncov", "baseline", fn, 0.0, "mpncov", description=f"fast-MPN-COV code from {path}")
