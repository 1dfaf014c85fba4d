"""The 'ext' backend (threeg_kernels._C, csrc/): its registered ops, their C++ errors, and the cases the
spectral CPU route must get right (rank-deficient covariances, K = 1). The shared matrix of
tests/test_cov_pool.py runs on it too. CUDA tests run natively when a GPU is present, else skip.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import threeg_kernels
from threeg_kernels import dispatch

from .helpers import (
    assert_close_to_reference,
    assert_compiled_matches_eager,
    assert_keep_equals_recompute,
    make_case,
    opcheck_pool_ops,
    rel_err,
    run_pool,
)

_MISSING = dispatch.unavailable_reason("ext", "cpu")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"extension threeg_kernels._C not built: {_MISSING}")

_NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="needs a CUDA device")])]


def _ops():
    return torch.ops.threeg.cov_pool_ext_forward, torch.ops.threeg.cov_pool_ext_backward


def test_cuda_kernels_compiled_where_the_toolchain_is():
    """On machines with nvcc (CI included) the CUDA sources must have compiled, even without a GPU."""
    from threeg_kernels import _C

    if os.environ.get("THREEG_BUILD_CUDA") == "0" or not torch.version.cuda or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolchain here, or THREEG_BUILD_CUDA=0")
    assert _C.cuda_built()
    assert dispatch.unavailable_reason("ext", "cuda") is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("save_iterates", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_opcheck(device, weighted, save_iterates, iters):
    opcheck_pool_ops("cov_pool_ext", weighted=weighted, save_iterates=save_iterates, iters=iters, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    assert_compiled_matches_eager("ext", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("iters", [1, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(device, iters, weighted):
    x, w, _ = make_case(2, 5, 7, weighted=weighted, dtype=torch.float64, seed=iters, device=device)
    inputs = (x.requires_grad_(),) if w is None else (x.requires_grad_(), w.requires_grad_())
    fn = lambda *t: threeg_kernels.cov_pool(*t, iters=iters, backend="ext")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 64, 20), (2, 256, 196), (2, 48, 2)])
@pytest.mark.parametrize("iters", [1, 5])
def test_rank_deficient_matches_reference(device, dtype, shape, iters):
    """N < C: Sigma has rank N - 1 plus eps I, so most eigenvalues of A crowd at eps / tr."""
    x, w, g = make_case(*shape, weighted=True, dtype=dtype, seed=iters, device=device)
    assert_close_to_reference("ext", x, w, g, iters=iters)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_eigenvalues_match_reference(device, dtype):
    """Exactly repeated channels: equal eigenvalues, where the divided differences become derivatives."""
    x, w, g = make_case(2, 6, 30, weighted=True, dtype=dtype, device=device)
    x = torch.cat([x, x, x], dim=1)  # C = 18, every direction three times
    g = torch.randn(2, 18 * 19 // 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(x)
    assert_close_to_reference("ext", x, w, g, iters=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_keep_and_recompute_give_the_same_gradients(device, iters, monkeypatch):
    from threeg_kernels.backends import ext_impl

    assert_keep_equals_recompute("ext", ext_impl, monkeypatch, iters=iters, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch_runs_every_sample(device):
    """More samples than threads / blocks: every sample's result is its own (no chunking slip)."""
    x, w, g = make_case(9, 12, 15, weighted=True, dtype=torch.float64, device=device)
    whole = run_pool("ext", x, w, g, iters=4)
    for b in (0, 4, 8):
        alone = run_pool("ext", x[b : b + 1], w[b : b + 1], g[b : b + 1], iters=4)
        for a, s in zip(whole, alone):
            assert rel_err(a[b : b + 1], s) <= 1e-13


# --- the CUDA kernels on a GPU: the shared comparison matrix, natively ---------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 64, 49), (2, 100, 49), (2, 256, 196)])
@pytest.mark.parametrize("iters", [1, 2, 5])
@pytest.mark.parametrize("order", ["3g", "mpncov"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_matches_reference(dtype, shape, iters, order, weighted):
    x, w, g = make_case(*shape, weighted=weighted, dtype=dtype, seed=iters, device="cuda")
    assert_close_to_reference("ext", x, w, g, iters=iters, order=order)


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_non_contiguous(weighted):
    x, w, g = make_case(2, 12, 10, weighted=weighted, dtype=torch.float32, non_contiguous=True, device="cuda")
    if weighted:
        w = torch.cat([w, w], dim=1)[:, ::2]
    assert_close_to_reference("ext", x, w, g, iters=3)


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="needs a CUDA device")
def test_cuda_non_finite_input_stays_in_its_sample():
    x, w, _ = make_case(2, 6, 8, weighted=True, dtype=torch.float32, device="cuda")
    x[1, 2, 3] = float("nan")
    out = threeg_kernels.cov_pool(x, w, backend="ext")
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


# --- errors raised by the C++ checks when the ops are called directly --------------------------------


def _good_forward_args(**change):
    x, w, _ = make_case(2, 4, 5, weighted=True, dtype=torch.float32)
    args = dict(x=x, weight=w, iters=3, eps=1e-7, lower=True, save_iterates=True)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(4, 5)), r"x must have shape \(B, C, N\); got 2-d shape \[4, 5\]"),
        (dict(x=torch.randn(2, 4, 5, dtype=torch.float16)), r"x must be float32 or float64.*Half"),
        (dict(x=torch.randn(2, 4, 1)), r"x must have C >= 1 and N >= 2; got shape \[2, 4, 1\]"),
        (dict(weight=torch.rand(2, 6)), r"weight must have shape \(B, N\) = \(2, 5\).*got shape \[2, 6\]"),
        (dict(weight=torch.rand(2, 5, dtype=torch.float64)), r"weight must have the dtype and device of x.*Double"),
        (dict(iters=0), r"iters must be >= 1; got 0"),
        (dict(eps=-1.0), r"eps must be >= 0; got -1"),
    ],
)
def test_forward_errors_name_the_argument(change, match):
    fwd, _ = _ops()
    with pytest.raises(RuntimeError, match=match):
        fwd(**_good_forward_args(**change))


def test_backward_errors_name_the_argument():
    fwd, bwd = _ops()
    a = _good_forward_args()
    out, A, tr, iterates = fwd(**a)
    good = dict(grad=torch.randn_like(out), x=a["x"], weight=a["weight"], out=out, A=A, tr=tr, iterates=iterates,
                iters=3, lower=True)
    bwd(**good)  # the good call passes
    cases = [
        (dict(grad=torch.randn(2, 9)), r"grad must have shape \[2, 10\]; got shape \[2, 9\]"),
        (dict(A=A[:, :3]), r"A must have shape \[2, 4, 4\]"),
        (dict(tr=tr.double()), r"tr must have the dtype and device of x"),
        (dict(iterates=torch.randn(2, 7)), r"iterates must have shape \[2, 20\]; got shape \[2, 7\]"),
        (dict(iters=0), r"iters must be >= 1"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match):
            bwd(**{**good, **change})
