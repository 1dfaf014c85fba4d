"""The 'ext' backend (threeg_kernels._C, csrc/): what only it has. Its CUDA kernels compiled where nvcc is, the
cases the spectral CPU route must get right (rank-deficient covariances, repeated eigenvalues), and the
errors of its C++ checks. The cases every backend shares (reference, gradcheck, opcheck, compile, keep or
recompute, CUDA) are in tests/test_backends.py.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from threeg_kernels import dispatch

from .helpers import assert_close_to_reference, devices_for, make_case, pool_ops

_MISSING = dispatch.unavailable_reason("ext", "cpu")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"extension threeg_kernels._C not built: {_MISSING}")


def test_cuda_kernels_compiled_where_the_toolchain_is():
    """On machines with nvcc (CI included) the CUDA sources must have compiled, even without a GPU."""
    from threeg_kernels import _C

    if os.environ.get("THREEG_BUILD_CUDA") == "0" or not torch.version.cuda or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolchain here, or THREEG_BUILD_CUDA=0")
    from threeg_kernels.backends import ext_impl

    assert _C.cuda_built()
    # the backend's own verdict (dispatch says first whether a CUDA device exists in this process)
    assert ext_impl.LOADED.unavailable_on(torch.device("cuda")) is None


@pytest.mark.parametrize("device", devices_for("ext"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(2, 64, 20), pytest.param((2, 256, 196), marks=pytest.mark.slow, id="2x256x196"), (2, 48, 2)]
)
@pytest.mark.parametrize("iters", [1, 5])
def test_rank_deficient_matches_reference(device, dtype, shape, iters):
    """N < C: Sigma has rank N - 1 plus eps I, so most eigenvalues of A crowd at eps / tr."""
    x, w, g = make_case(*shape, weighted=True, dtype=dtype, seed=iters, device=device)
    assert_close_to_reference("ext", x, w, g, iters=iters)


@pytest.mark.parametrize("device", devices_for("ext"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_eigenvalues_match_reference(device, dtype):
    """Exactly repeated channels: equal eigenvalues, where the divided differences become derivatives."""
    x, w, g = make_case(2, 6, 30, weighted=True, dtype=dtype, device=device)
    x = torch.cat([x, x, x], dim=1)  # C = 18, every direction three times
    g = torch.randn(2, 18 * 19 // 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(x)
    assert_close_to_reference("ext", x, w, g, iters=5)


# --- errors raised by the C++ checks when the ops are called directly --------------------------------


def _good_forward_args(**change):
    x, w, _ = make_case(2, 4, 5, weighted=True, dtype=torch.float32)
    args = dict(x=x, weight=w, iters=3, eps=1e-7, order="3g", keep_iterates=True, precision="ieee")
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
        (dict(iters=0), r"iters must be in \[1, 20\]; got 0"),
        (dict(iters=21), r"iters must be in \[1, 20\]; got 21"),
        (dict(eps=-1.0), r"eps must be >= 0; got -1"),
        (dict(order="lower"), r"order must be '3g' or 'mpncov'; got 'lower'"),
        (dict(precision="tf32"), r"precision must be 'ieee' .*got 'tf32'"),
    ],
)
def test_forward_errors_name_the_argument(change, match):
    fwd, _ = pool_ops("ext")
    with pytest.raises(RuntimeError, match=match):
        fwd(**_good_forward_args(**change))


def test_backward_errors_name_the_argument():
    fwd, bwd = pool_ops("ext")
    a = _good_forward_args()
    out, A, tr, iterates = fwd(**a)
    good = dict(
        grad=torch.randn_like(out),
        x=a["x"],
        weight=a["weight"],
        out=out,
        A=A,
        tr=tr,
        iterates=iterates,
        iters=3,
        order="3g",
        precision="ieee",
    )
    bwd(**good)  # the good call passes
    cases = [
        (dict(grad=torch.randn(2, 9)), r"grad must have shape \[2, 10\]; got shape \[2, 9\]"),
        (dict(A=A[:, :3]), r"A must have shape \[2, 4, 4\]"),
        (dict(tr=tr.double()), r"tr must have the dtype and device of x"),
        (dict(iterates=torch.randn(2, 7)), r"iterates must have shape \[2, 20\]; got shape \[2, 7\]"),
        (dict(iters=0), r"iters must be in \[1, 20\]; got 0"),
        (dict(order="upper"), r"order must be '3g' or 'mpncov'; got 'upper'"),
        (dict(precision="bf16"), r"precision must be 'ieee' .*got 'bf16'"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match):
            bwd(**{**good, **change})
