"""Shared pieces of the backend tests: one upstream gradient per case, every gradient compared."""

from __future__ import annotations

import torch

import threeg_kernels

# Tolerances are max |a - b| / max |b| against reference.py, per compute dtype.
# Measured (CPU, 2026-11-26, torch backend, shapes up to (2, 256, 196), iters <= 5, weight on/off):
#   float32: <= 8.4e-7 (the float32 reference itself is 1.5e-6 from float64), float64: <= 3.8e-15.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


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


def opcheck_pool_ops(name, *, weighted, save_iterates, iters, device="cpu", lower=True):
    """torch.library.opcheck on a backend's op pair `threeg::<name>_forward` / `_backward` (float64)."""
    fwd = getattr(torch.ops.threeg, f"{name}_forward")
    bwd = getattr(torch.ops.threeg, f"{name}_backward")
    x, w, g = make_case(2, 6, 7, weighted=weighted, dtype=torch.float64, device=device)
    args = (x.requires_grad_(), None if w is None else w.requires_grad_(), iters, 1e-7, lower, save_iterates)
    torch.library.opcheck(fwd.default, args)
    out, A, tr, iterates = fwd(*args)
    bwd_args = (g, x.detach(), None if w is None else w.detach(), out.detach(), A, tr, iterates, iters, lower)
    torch.library.opcheck(bwd.default, bwd_args)


def assert_compiled_matches_eager(backend, device="cpu"):
    """torch.compile(fullgraph=True) of cov_pool, forward and backward, equals eager."""
    x, w, _ = make_case(2, 8, 10, weighted=True, dtype=torch.float32, device=device)
    fn = lambda a, b: threeg_kernels.cov_pool(a, b, iters=3, backend=backend).sum(-1) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    outs = []
    for f in (fn, compiled):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = f(xl, wl)
        y.backward(torch.ones_like(y))
        outs.append((y, xl.grad, wl.grad))
    for a, b in zip(*outs):
        # The same kernels run either way; measured <= 5.6e-8 (out), 0 (grads).
        assert rel_err(a, b) <= RTOL[torch.float32]


def assert_keep_equals_recompute(backend, module, monkeypatch, *, iters, device="cpu"):
    """Keeping the iterates for the backward and recomputing them give the same results (float64).

    `module` is the backend's module with the SAVE_ITERATES switch. Recomputing rounds step 1 from A
    instead of from Sigma / tr: measured <= 6.6e-16.
    """
    x, w, g = make_case(2, 9, 11, weighted=True, dtype=torch.float64, seed=iters, device=device)
    results = []
    for keep in (True, False):
        monkeypatch.setattr(module, "SAVE_ITERATES", keep)
        results.append(run_pool(backend, x, w, g, iters=iters))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-13
