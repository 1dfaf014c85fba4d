"""The public API around the backends (CovPool, backend='auto', missing backends) and reference.py, the one
statement of docs/math.md, against independent formulas. Every backend against reference.py:
tests/test_backends.py."""

from __future__ import annotations

import pytest
import torch

import threeg_kernels
from threeg_kernels import reference

from .helpers import make_case, rel_err


def test_torch_backend_present():
    # The pure-ATen backend must always be there; the others join when built.
    assert "torch" in threeg_kernels.available_backends("cpu")


def test_module_wraps_function():
    pool = threeg_kernels.CovPool(iters=3, order="mpncov", backend="torch")
    assert "iters=3" in repr(pool) and "order='mpncov'" in repr(pool) and "backend='torch'" in repr(pool)
    x, w, _ = make_case(2, 8, 9, weighted=True, dtype=torch.float64)
    assert torch.equal(pool(x, w), threeg_kernels.cov_pool(x, w, iters=3, order="mpncov", backend="torch"))
    assert threeg_kernels.CovPool.output_dim(256) == 32896
    # keep_iterates is shown when set (tests/test_backends.py checks that it reaches the op)
    assert "keep_iterates" not in repr(pool)
    assert "keep_iterates=False" in repr(threeg_kernels.CovPool(backend="torch", keep_iterates=False))


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
    assert reference.pack_triangle(S, "3g").tolist() == [[1.0, 2.0, 4.0, 3.0, 5.0, 6.0]]
    # 'mpncov': upper triangle row by row: S00, S01, S02, S11, S12, S22
    assert reference.pack_triangle(S, "mpncov").tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]


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
    assert rel_err(got, reference.pack_triangle(sqrt, "3g")) <= 1e-12
    # ...and the 5-step head is a genuine approximation of it, not the same thing.
    assert rel_err(reference.cov_pool(x, None, iters=5), reference.pack_triangle(sqrt, "3g")) > 1e-6


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
