"""Every autograd path on every CPU backend: double backward (gradient penalties), forward-mode AD, and the
torch.func transforms, each against the reference math (and the tangent against finite differences)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacrev, jvp, vmap

import threeg_kernels
from tests.helpers import rel_err

# every backend present, triton included (under the interpreter on CPU: the shapes here are tiny)
BACKENDS = threeg_kernels.available_backends("cpu")


def _case(seed=0, b=2, c=4, n=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    w = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1
    return x, w


def _pool(backend):
    return lambda x, w: threeg_kernels.cov_pool(x, w, iters=3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_reference(backend):
    """A gradient penalty: d/dx of |d/dx L|^2 with create_graph=True, for x and the weight."""
    x, w = _case()
    results = []
    for name in (backend, "reference"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = _pool(name)(xl, wl)
        gx, gw = torch.autograd.grad((out * out.detach().cos()).sum(), [xl, wl], create_graph=True)
        penalty = gx.pow(2).sum() + gw.pow(2).sum()
        results.append(torch.autograd.grad(penalty, [xl, wl]))
    for got, want in zip(*results):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_tangent_matches_finite_differences(backend):
    x, w = _case(1)
    vx, vw = torch.randn_like(x), torch.randn_like(w)
    with fwAD.dual_level():
        out = _pool(backend)(fwAD.make_dual(x, vx), fwAD.make_dual(w, vw))
        tangent = fwAD.unpack_dual(out).tangent
    h = 1e-6
    f = _pool("reference")
    fd = (f(x + h * vx, w + h * vw) - f(x - h * vx, w - h * vw)) / (2 * h)
    assert tangent is not None and rel_err(tangent, fd) <= 1e-7
    _, tangent_func = jvp(_pool(backend), (x, w), (vx, vw))
    assert rel_err(tangent_func, fd) <= 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_match_reference(backend):
    x, w = _case(2)
    f, ref = _pool(backend), _pool("reference")
    loss = lambda fn: lambda a, b: (fn(a, b) * torch.arange(10.0, dtype=a.dtype)).sum()  # noqa: E731
    for got, want in zip(grad(loss(f), argnums=(0, 1))(x, w), grad(loss(ref), argnums=(0, 1))(x, w)):
        assert rel_err(got, want) <= 1e-12
    assert rel_err(jacrev(f)(x, w), jacrev(ref)(x, w)) <= 1e-12
    batched = vmap(f)(x[:, None], w[:, None])
    assert rel_err(batched[:, 0], f(x, w)) <= 1e-12
    one = (x[:1], w[:1])
    assert rel_err(hessian(loss(f))(*one), hessian(loss(ref))(*one)) <= 1e-10
