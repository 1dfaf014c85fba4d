"""float32 accuracy of every CPU backend against float64 truth, where float32 is hard: every supported step
count, rank-deficient and ill-conditioned covariances, and features whose mean is large against their spread.

The yardstick is the float32 reference itself (autograd through the plain math): a backend passes when its
error against float64 is within 10x of the reference's own, or within the fp32 bound 1e-5 where the
reference is better than that. (The triton backend's cases are in tests/test_triton_accuracy.py.)
"""

from __future__ import annotations

import pytest
import torch

import threeg_kernels
from tests.helpers import rel_err

BACKENDS = [b for b in threeg_kernels.available_backends("cpu") if b not in ("reference", "triton")]
FP32_BOUND = 1e-5


def _inputs(kind: str, b: int, c: int, n: int, seed: int = 0):
    """float64 copies of float32 data (so float64 is the exact truth for the float32 inputs)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "rank_deficient":  # rank 3 < C: most eigenvalues of A are eps / tr
        x = torch.randn(b, c, 3, generator=gen, dtype=torch.float64) @ torch.randn(
            b, 3, n, generator=gen, dtype=torch.float64
        )
    elif kind == "ill_conditioned":  # channel scales over three decades
        x = torch.logspace(0, -3, c, dtype=torch.float64)[:, None] * torch.randn(b, c, n, generator=gen)
    elif kind == "large_mean":  # 1e4 + N(0, 1): the centring cancels four digits
        x = 1e4 + torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    w = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1
    g = torch.randn(b, c * (c + 1) // 2, generator=gen, dtype=torch.float64)
    as_f32 = lambda t: t.float().double()  # noqa: E731
    return as_f32(x), as_f32(w), as_f32(g)


def _run(backend, x, w, g, dtype, iters):
    x = x.to(dtype).requires_grad_()
    w = None if w is None else w.to(dtype).requires_grad_()
    out = threeg_kernels.cov_pool(x, w, iters=iters, backend=backend)
    grads = torch.autograd.grad(out, [x] if w is None else [x, w], g.to(dtype))
    return (out, *grads)


def _errors(backend, x, w, g, iters):
    truth = _run("reference", x, w, g, torch.float64, iters)
    return [rel_err(a, t) for a, t in zip(_run(backend, x, w, g, torch.float32, iters), truth)]


def _check(backend, kind, shape, iters, weighted=True):
    x, w, g = _inputs(kind, *shape)
    w = w if weighted else None
    ref = _errors("reference", x, w, g, iters)
    got = _errors(backend, x, w, g, iters)
    for name, e, r in zip(("out", "dx", "dweight"), got, ref):
        assert e <= max(10 * r, FP32_BOUND), f"{backend} {kind} K={iters} {name}: {e:.1e} (reference {r:.1e})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rank_deficient", "ill_conditioned", "gaussian"])
@pytest.mark.parametrize("iters", [1, 5, 10, 15, 20])
def test_every_supported_step_count_small(backend, kind, iters):
    _check(backend, kind, (2, 32, 8 if kind == "rank_deficient" else 40), iters)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iters", [5, 10, 20])
def test_every_supported_step_count_real_shape(backend, iters):
    # Measured (CPU, 2026-11-29, (2, 256, 196), K = 20, out / dx / dweight): reference 6.2e-5 / 1.5e-4 / 1.8e-4,
    # torch 5.9e-5 / 1.4e-4 / 1.5e-4 (2.3e-1 / 7.7e-3 in dx / dweight with the symmetric reverse sweep),
    # ext 2.0e-6 / 1.6e-4 / 9.8e-5.
    _check(backend, "gaussian", (2, 256, 196), iters)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_large_mean_backward(backend, weighted):
    # Measured (CPU, 2026-11-29, (2, 64, 49), unweighted dx): reference 1.5e-6; torch 1.4e-6 and ext 1.1e-6,
    # 5.2e-4 and 2.8e-4 when the backward dropped the centring's own term.
    x, w, g = _inputs("large_mean", 2, 64, 49)
    got = _errors(backend, x, w if weighted else None, g, 5)
    for name, e in zip(("out", "dx", "dweight"), got):
        assert e <= FP32_BOUND, f"{backend} large mean {name}: {e:.1e}"


def test_large_step_counts_rejected_on_every_backend():
    x = torch.randn(2, 4, 6)
    for backend in threeg_kernels.available_backends("cpu"):
        with pytest.raises(ValueError, match=r"iters must be in \[1, 20\]"):
            threeg_kernels.cov_pool(x, iters=21, backend=backend)
    for iters in (0, 2**63, -1):
        with pytest.raises(ValueError, match="iters must be in"):
            threeg_kernels.cov_pool(x, iters=iters)
    for name in ("torch", "ext"):
        if name in threeg_kernels.available_backends("cpu"):
            forward = getattr(torch.ops.threeg, f"cov_pool_{name}_forward")
            with pytest.raises((ValueError, RuntimeError), match="iters must be in"):
                forward(x, None, 21, 1e-7, "3g", False, "ieee")


@pytest.mark.skipif("ext" not in BACKENDS, reason="needs the compiled extension")
def test_ext_spectral_route_limited_to_accurate_step_counts():
    x = torch.randn(2, 6, 9)
    forward = torch.ops.threeg.cov_pool_ext_forward
    assert forward(x, None, 5, 1e-7, "3g", False, "ieee")[0].shape == (2, 21)
    with pytest.raises(RuntimeError, match=r"float32 on CPU is supported for iters <= 5"):
        forward(x, None, 6, 1e-7, "3g", False, "ieee")
    assert forward(x.double(), None, 20, 1e-7, "3g", False, "ieee")[0].shape == (2, 21)  # float64: any K
    # cov_pool(backend='ext') takes the iteration there, and equals the torch backend
    want = threeg_kernels.cov_pool(x, iters=12, backend="torch")
    assert torch.equal(threeg_kernels.cov_pool(x, iters=12, backend="ext"), want)
