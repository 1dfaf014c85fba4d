"""cov_pool on every compiled CPU backend against reference.py: output, dL/dx and dL/dweight."""

from __future__ import annotations

import pytest
import torch

import threeg_kernels
from threeg_kernels import reference

from .helpers import RTOL, assert_close_to_reference, make_case, rel_err, run_pool

# Triton runs on CPU only under its interpreter, on tiny shapes: tests/test_triton.py covers it.
BACKENDS = [b for b in threeg_kernels.available_backends("cpu") if b not in ("reference", "triton")]


def test_torch_backend_present():
    # The pure-ATen backend must always be there; the others join BACKENDS when built.
    assert "torch" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 64, 49), (2, 100, 49)])
@pytest.mark.parametrize("iters", [1, 2, 3, 5])
@pytest.mark.parametrize("order", ["3g", "mpncov"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(backend, dtype, shape, iters, order, weighted):
    x, w, g = make_case(*shape, weighted=weighted, dtype=dtype, seed=iters)
    assert_close_to_reference(backend, x, w, g, iters=iters, order=order)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference_full_size(backend, dtype, weighted):
    """The real head: C = 256, N = 14 * 14, K = 5."""
    x, w, g = make_case(2, 256, 196, weighted=weighted, dtype=dtype)
    assert_close_to_reference(backend, x, w, g, iters=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_non_contiguous(backend, weighted):
    x, w, g = make_case(2, 12, 10, weighted=weighted, dtype=torch.float32, non_contiguous=True)
    assert not x.is_contiguous()
    if weighted:
        w = torch.cat([w, w], dim=1)[:, ::2]  # a strided weight too
        assert not w.is_contiguous()
    assert_close_to_reference(backend, x, w, g, iters=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_4d_input_and_weight_layouts(backend):
    """(B, C, H, W) with weight (B, 1, H, W), (B, H, W) and (B, N) all equal the (B, C, N) call."""
    x, w, g = make_case(2, 6, 12, weighted=True, dtype=torch.float64)
    want = threeg_kernels.cov_pool(x, w, backend=backend)
    x4 = x.reshape(2, 6, 3, 4)
    for weight in (w.reshape(2, 1, 3, 4), w.reshape(2, 3, 4), w):
        got = threeg_kernels.cov_pool(x4, weight, backend=backend)
        assert got.shape == (2, 21)
        assert rel_err(got, want) <= RTOL[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iters", [1, 2, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(backend, iters, weighted):
    """float64 finite differences against the hand-written backward."""
    x, w, _ = make_case(2, 5, 7, weighted=weighted, dtype=torch.float64, seed=iters)
    inputs = (x.requires_grad_(),) if w is None else (x.requires_grad_(), w.requires_grad_())
    fn = lambda *t: threeg_kernels.cov_pool(*t, iters=iters, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(backend, dtype):
    """fp16/bf16 in: computed in fp32, result cast back; equals the fp32 reference rounded."""
    x, w, g = make_case(2, 16, 20, weighted=True, dtype=dtype)
    out, dx, dw = run_pool(backend, x, w, g, iters=5)
    assert out.dtype == dx.dtype == dw.dtype == dtype
    want, want_dx, want_dw = run_pool("reference", x.float(), w.float(), g.float(), iters=5)
    # Only the final rounding to the half type differs: its unit roundoff is 2^-11 (fp16), 2^-8 (bf16).
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for got, ref in ((out, want), (dx, want_dx), (dw, want_dw)):
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16(backend):
    """Under autocast the head still runs in fp32 on fp32 inputs (autocast is disabled inside)."""
    x, w, _ = make_case(2, 16, 20, weighted=True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = threeg_kernels.cov_pool(x, w, backend=backend)
    assert got.dtype == torch.float32
    assert rel_err(got, threeg_kernels.cov_pool(x, w, backend="reference")) <= RTOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_stays_in_its_sample(backend):
    """As documented: NaN in one sample poisons that sample only."""
    x, w, _ = make_case(2, 6, 8, weighted=True, dtype=torch.float32)
    x[1, 2, 3] = float("nan")
    out = threeg_kernels.cov_pool(x, w, backend=backend)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).any()


def test_module_wraps_function():
    pool = threeg_kernels.CovPool(iters=3, order="mpncov", backend="torch")
    assert "iters=3" in repr(pool) and "order='mpncov'" in repr(pool) and "backend='torch'" in repr(pool)
    x, w, _ = make_case(2, 8, 9, weighted=True, dtype=torch.float64)
    assert torch.equal(pool(x, w), threeg_kernels.cov_pool(x, w, iters=3, order="mpncov", backend="torch"))
    assert threeg_kernels.CovPool.output_dim(256) == 32896


def test_auto_picks_first_available():
    x, _, _ = make_case(2, 8, 9, weighted=False, dtype=torch.float64)
    first = threeg_kernels.available_backends("cpu")[0]
    assert first != "reference"
    assert torch.equal(threeg_kernels.cov_pool(x), threeg_kernels.cov_pool(x, backend=first))


def test_missing_backend_says_why():
    missing = [b for b in threeg_kernels.BACKENDS if b not in threeg_kernels.available_backends("cpu")]
    x = torch.randn(1, 3, 4)
    for name in missing:
        with pytest.raises(threeg_kernels.BackendUnavailableError, match=name):
            threeg_kernels.cov_pool(x, backend=name)


# --- the triangle order is part of the interface --------------------------------------------------


def test_triangle_orders_pinned_3x3():
    S = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]]])
    # '3g': lower triangle row by row: S00, S10, S11, S20, S21, S22
    assert reference.triangle(S, "3g").tolist() == [[1.0, 2.0, 4.0, 3.0, 5.0, 6.0]]
    # 'mpncov': upper triangle row by row: S00, S01, S02, S11, S12, S22
    assert reference.triangle(S, "mpncov").tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_backend_orders_pinned_3x3(backend):
    """Every backend's output, read in each order, is the pinned entries of the full matrix S."""
    x, w, _ = make_case(1, 3, 6, weighted=True, dtype=torch.float64)
    A, tr = reference.trace_normalise(reference.weighted_covariance(x, w))
    S = (tr.sqrt() * reference.newton_schulz(A, 5))[0]
    lower = [S[0, 0], S[1, 0], S[1, 1], S[2, 0], S[2, 1], S[2, 2]]
    upper = [S[0, 0], S[0, 1], S[0, 2], S[1, 1], S[1, 2], S[2, 2]]
    for order, entries in (("3g", lower), ("mpncov", upper)):
        got = threeg_kernels.cov_pool(x, w, order=order, backend=backend)[0]
        assert rel_err(got, torch.stack(entries)) <= 1e-12


# --- reference.py against independent formulas, float64 --------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_reference_covariance_explicit_centring(weighted):
    x, w, _ = make_case(3, 7, 11, weighted=weighted, dtype=torch.float64)
    n = x.shape[-1]
    xw = x if w is None else x * w[:, None, :]
    centring = (torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n) / n
    want = xw @ centring @ xw.transpose(1, 2) + 1e-7 * torch.eye(7, dtype=torch.float64)
    # measured 2026-11-26: 1.1e-16
    assert rel_err(reference.weighted_covariance(x, w, eps=1e-7), want) <= 1e-13


def test_reference_converges_to_eigh_square_root():
    """Well-conditioned SPD covariance, many steps: S equals Sigma^{1/2} from the eigendecomposition."""
    gen = torch.Generator().manual_seed(3)
    c, n = 8, 200
    x = torch.randn(2, c, n, generator=gen, dtype=torch.float64)
    sigma = reference.weighted_covariance(x, None, eps=1e-7)
    evals, evecs = torch.linalg.eigh(sigma)
    assert (evals.max(-1).values / evals.min(-1).values).max() < 10  # well conditioned
    sqrt = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.transpose(1, 2)
    got = reference.cov_pool(x, None, iters=30)
    # measured 2026-11-26: 4e-16
    assert rel_err(got, reference.triangle(sqrt, "3g")) <= 1e-12
    # ...and the 5-step head is a genuine approximation of it, not the same thing.
    assert rel_err(reference.cov_pool(x, None, iters=5), reference.triangle(sqrt, "3g")) > 1e-6


def test_reference_newton_schulz_unrolled_by_hand():
    """Two steps written out in full, Z included, from Y0 = A, Z0 = I."""
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64)
    A = m @ m.transpose(1, 2)
    A = A / A.diagonal(dim1=1, dim2=2).sum()
    eye = torch.eye(4, dtype=torch.float64)
    T1 = (3 * eye - eye @ A) / 2
    Y1, Z1 = A @ T1, T1 @ eye
    T2 = (3 * eye - Z1 @ Y1) / 2
    assert rel_err(reference.newton_schulz(A, 2), Y1 @ T2) <= 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_keeps_dtype(dtype):
    x = torch.randn(2, 4, 5, dtype=dtype)
    assert reference.cov_pool(x, torch.rand(2, 5, dtype=dtype)).dtype == dtype


# --- CUDA: every backend present there, natively (skipped without a GPU) -------------------------

_CUDA_BACKENDS = threeg_kernels.available_backends("cuda") if torch.cuda.is_available() else []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in _CUDA_BACKENDS if b != "reference"] or ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, iters", [((3, 7, 5), 1), ((2, 100, 49), 3), ((2, 256, 196), 5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_matches_reference(backend, dtype, shape, iters, weighted):
    x, w, g = make_case(*shape, weighted=weighted, dtype=dtype, seed=iters, device="cuda")
    assert_close_to_reference(backend, x, w, g, iters=iters)
