"""Shared pieces of the backend tests: the backend x device parametrisation, one upstream gradient per case,
every gradient compared against reference.py."""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Optional, Sequence

import pytest
import torch

import threeg_kernels
from threeg_kernels import dispatch
from threeg_kernels._precision import LEGACY_SETTING, MATMUL_SETTINGS

# Tolerances are max |a - b| / max |b| against reference.py, per compute dtype.
# Measured (CPU, 2026-11-26, torch backend, shapes up to (2, 256, 196), iters <= 5, weight on/off):
#   float32: <= 8.4e-7 (the float32 reference itself is 1.5e-6 from float64), float64: <= 3.8e-15.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}

DEVICES = ("cpu", "cuda")
# The backends with a registered op pair threeg::cov_pool_<name>_forward / _backward ('reference' is plain
# PyTorch differentiated by autograd).
OP_BACKENDS = tuple(b for b in dispatch.BACKENDS if b != "reference")

_NO_CUDA = not torch.cuda.is_available()


# --- the backend x device matrix ------------------------------------------------------------------------


def interpreted(backend: str, device: str) -> bool:
    """Triton on CPU runs under its interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), where every
    (program x reduction step) costs milliseconds: such a target gets tiny shapes (C <= 32, B <= 2)."""
    return backend == "triton" and device == "cpu"


def _marks(backend: str, device: str) -> list:
    """`cuda` on CUDA targets (so that `pytest -m cuda` selects them) and a skip naming why a target cannot run:
    no CUDA device, or the reason dispatch gives for the backend on that device."""
    marks = []
    if device == "cuda":
        marks += [pytest.mark.cuda, pytest.mark.skipif(_NO_CUDA, reason="needs a CUDA device")]
        if _NO_CUDA:
            return marks
    reason = dispatch.unavailable_reason(backend, device)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"backend {backend!r} unavailable on {device}: {reason}"))
    return marks


def param_id(value) -> str:
    """A readable test id: 2x20x33 for a shape, float32 for a dtype."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).replace("torch.", "")


def backends_and_devices(
    backends: Sequence[str] = dispatch.BACKENDS,
    cases: Optional[Callable[[str, str], Iterable[tuple]]] = None,
) -> list:
    """pytest.param(backend, device, *case) for every backend x device, as torchvision's cpu_and_cuda():
    CUDA targets carry the `cuda` mark and skip without a CUDA device; a backend unavailable on a device is
    skipped with dispatch's reason. `cases(backend, device)` gives the per-target cases, tuples or
    pytest.param with marks of their own (e.g. a shape set that is smaller under the Triton interpreter);
    a target with no cases gets no parameter."""
    params = []
    for device in DEVICES:
        for backend in backends:
            for case in cases(backend, device) if cases else [()]:
                values, marks = (case.values, list(case.marks)) if hasattr(case, "marks") else (tuple(case), [])
                ident = "-".join([backend, device, *map(param_id, values)])
                params.append(pytest.param(backend, device, *values, marks=_marks(backend, device) + marks, id=ident))
    return params


def devices_for(backend: str, devices: Sequence[str] = DEVICES) -> list:
    """pytest.param(device) for one backend's own tests, marked as in backends_and_devices."""
    return [pytest.param(device, marks=_marks(backend, device), id=device) for device in devices]


def product(*axes: Iterable) -> list[tuple]:
    """The cases of every combination of the axes, for `cases` of backends_and_devices."""
    return list(itertools.product(*axes))


# --- one case, every gradient compared ------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_case(b, c, n, *, weighted, dtype, seed=0, non_contiguous=False, device="cpu"):
    """x (B, C, N), weight (B, N) or None, and the one upstream gradient of the case."""
    gen = torch.Generator().manual_seed(seed)
    if non_contiguous:
        x = torch.randn(b, n, c, generator=gen, dtype=torch.float64).transpose(1, 2)
    else:
        x = torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    weight = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    grad = torch.randn(b, c * (c + 1) // 2, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731 - keeps strides
    return cast(x), cast(weight), cast(grad)


def run_pool(backend, x, weight, grad, **kw):
    """(out, dL/dx, dL/dweight or None) of cov_pool on fresh leaves."""
    x = x.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    out = threeg_kernels.cov_pool(x, weight, backend=backend, **kw)
    leaves = [x] if weight is None else [x, weight]
    grads = torch.autograd.grad(out, leaves, grad)
    return (out, *grads, *([None] if weight is None else []))


def eager_and_compiled(fn: Callable, compiled: Callable, x: torch.Tensor, weight: torch.Tensor) -> list[tuple]:
    """(y, dx, dweight) of fn and of its compiled form, each on fresh leaf copies, y.backward(ones)."""
    outs = []
    for f in (fn, compiled):
        xl, wl = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = f(xl, wl)
        y.backward(torch.ones_like(y))
        outs.append((y, xl.grad, wl.grad))
    return outs


def assert_close_to_reference(backend, x, weight, grad, rtol=None, **kw):
    got = run_pool(backend, x, weight, grad, **kw)
    want = run_pool("reference", x, weight, grad, **kw)
    rtol = RTOL[x.dtype] if rtol is None else rtol
    for name, g, w in zip(("out", "dx", "dweight"), got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        err = rel_err(g, w)
        assert err <= rtol, f"{backend} {name}: rel err {err:.2e} > {rtol:.0e}"


# --- the registered op pair -----------------------------------------------------------------------------


def pool_ops(backend: str):
    """The op pair threeg::cov_pool_<backend>_forward / _backward."""
    return (
        getattr(torch.ops.threeg, f"cov_pool_{backend}_forward"),
        getattr(torch.ops.threeg, f"cov_pool_{backend}_backward"),
    )


def opcheck_pool_ops(backend, *, weighted, keep_iterates, iters, device="cpu", order="3g", precision="ieee"):
    """torch.library.opcheck on a backend's op pair (float64, so every precision mode runs as ieee)."""
    fwd, bwd = pool_ops(backend)
    x, w, g = make_case(2, 6, 7, weighted=weighted, dtype=torch.float64, device=device)
    w = None if w is None else w.requires_grad_()
    args = (x.requires_grad_(), w, iters, 1e-7, order, keep_iterates, precision)
    torch.library.opcheck(fwd.default, args)
    out, A, tr, iterates = fwd(*args)
    w = None if w is None else w.detach()
    bwd_args = (g, x.detach(), w, out.detach(), A, tr, iterates, iters, order, precision)
    torch.library.opcheck(bwd.default, bwd_args)


# --- the caller's float32 matmul settings -----------------------------------------------------------------

# The value of a device's matmul setting (threeg_kernels._precision.MATMUL_SETTINGS) that allows its faster float32
# products: TF32 on CUDA, oneDNN's bf16 pieces on CPU (with torch < 2.9's one setting: 'high' / 'medium').
FAST_MATMUL = (
    {"cuda": "high", "cpu": "medium"} if MATMUL_SETTINGS["cuda"] is LEGACY_SETTING else {"cuda": "tf32", "cpu": "bf16"}
)


def reset_matmul_settings() -> None:
    """The float32 matmul settings of a fresh process: legacy 'highest', every fp32_precision 'none'."""
    torch.set_float32_matmul_precision("highest")
    if MATMUL_SETTINGS["cuda"] is not LEGACY_SETTING:
        for setting in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul, torch.backends):
            setting.fp32_precision = "none"


@contextlib.contextmanager
def fast_matmul(device: str):
    """Faster float32 products allowed on `device` as a user's script allows them (on CUDA with the common
    `torch.backends.cuda.matmul.allow_tf32 = True`); yields (setting, fast value); the fresh-process settings
    afterwards."""
    setting, fast = MATMUL_SETTINGS[device], FAST_MATMUL[device]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        setting.write(fast)
    try:
        yield setting, fast
    finally:
        reset_matmul_settings()
