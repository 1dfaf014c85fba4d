"""The "triton" backend: what only it has. Multi-tile launches, features far from zero mean, the matmul
precision modes, where it may run, the GPU compiler's verdict on every kernel, and the full head on a GPU.
The cases every backend shares (reference, gradcheck, opcheck, compile, keep or recompute) are in
tests/test_backends.py.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it), on tiny shapes:
every (program x reduction step) costs ~4 ms there. With a GPU the same tests run natively ("cuda"
cases), plus the full head (B=64, C=256, N=196).

Measured on CPU under the interpreter (2026-11-26), max |a - b| / max |b| against reference.py in the
input's dtype, over the cases of test_matches_reference (now in tests/test_backends.py) and test_multi_tile:
    float32: out 4.0e-7, dx 7.8e-7, dweight 6.1e-7 (RTOL 1e-5);
    float64: out 1.1e-14, dx 1.2e-14, dweight 1.5e-14 (RTOL 1e-12).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import threeg_kernels
from threeg_kernels import dispatch
from threeg_kernels._validate import PRECISION_BOUNDS

from .helpers import assert_close_to_reference, devices_for, make_case, opcheck_pool_ops, rel_err, run_pool

triton_impl = pytest.importorskip("threeg_kernels.backends.triton_impl")
from threeg_kernels.triton_kernels import _tiles  # noqa: E402 - needs Triton, which the line above checks


@pytest.fixture(params=devices_for("triton"))
def device(request):
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles, so that C = 33 spans 3 x 3 tiles (mirrored stores, masked edges, several k-steps)."""

    def config(x, weight, iters, precision="ieee"):
        return _tiles.LaunchConfig(
            16, 16, 16, 4, 1, "ieee" if x.dtype == torch.float64 else precision, _tiles.INTERPRET
        )

    monkeypatch.setattr(triton_impl, "config_for", config)


@pytest.mark.parametrize(
    "dtype, iters, keep_iterates",
    [
        (torch.float32, 1, True),
        (torch.float32, 3, True),
        pytest.param(torch.float32, 3, False, marks=pytest.mark.slow),  # 5-11 s under the interpreter
        (torch.float64, 2, True),
    ],
)
def test_multi_tile(device, small_tiles, dtype, iters, keep_iterates):
    """Several tiles per side, strided x and weight, kept or recomputed iterates."""
    x, w, g = make_case(1, 33, 50, weighted=True, dtype=dtype, seed=iters, non_contiguous=True, device=device)
    w = torch.cat([w, w], dim=1)[:, ::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    for order in ("3g", "mpncov"):
        assert_close_to_reference("triton", x, w, g, iters=iters, order=order, keep_iterates=keep_iterates)


def test_large_mean_does_not_cancel(device, small_tiles):
    """Features far from zero mean (x ~ 1e4 + N(0, 1)): the covariance is merged over N chunks (4 of 16
    columns here) without the cancellation of X X^T / N - mu mu^T, which would lose every digit."""
    x, w, g = make_case(1, 20, 50, weighted=True, dtype=torch.float32, seed=2, device=device)
    x = (x + 1e4).detach()
    got = run_pool("triton", x, w, g, iters=5)
    want = run_pool("reference", x.double(), w.double(), g.double(), iters=5)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    # Measured (interpreter, 2026-11-29): out 4.0e-6, dx 1.1e-6, dweight 6.6e-6; the float32 reference itself
    # is 5.5e-6 / 6.9e-7 / 1.6e-5 off here, as dweight sums dX_w X over c with X ~ 1e4 (a cancellation of
    # the gradient, not of the kernel). Hence 1e-4 rather than 1e-5; the cancelling form would be O(1) off.
    assert max(errs) <= 1e-4, errs


@pytest.mark.parametrize("precision", [p for p in _tiles.PRECISIONS if p != "ieee"])
def test_opcheck_precision_modes(device, precision):
    """The one op pair takes every mode as its `precision` argument (float64 runs them as ieee)."""
    opcheck_pool_ops("triton", weighted=True, keep_iterates=True, iters=2, device=device, precision=precision)


# --- precision modes ---------------------------------------------------------------------------------

# Max rel. error against the float64 reference, (2, 32, 49), K = 5, weighted, measured under the
# interpreter, which rounds the matmul inputs as the tensor cores do (_tiles.round_mantissa):
#   ieee 6.4e-7, tf32x3 7.4e-7, tf32 1.5e-3, bf16 1.1e-2 (out / dx / dweight alike; docs/triton.md).
# tf32x3 is held to the fp32 bound: that is what it is for.
PRECISION_BOUND = PRECISION_BOUNDS


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
def test_precision_modes_error_bound(device, precision):
    x, w, g = make_case(2, 32, 49, weighted=True, dtype=torch.float32, seed=5, device=device)
    got = run_pool("triton", x, w, g, iters=5, precision=precision)
    want = run_pool("reference", x.double(), w.double(), g.double(), iters=5)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errs) <= PRECISION_BOUND[precision], errs
    if precision in ("tf32", "bf16"):
        # The mode must really round the inputs (an fp32 product would be ~1e-6 off).
        assert max(errs) > 1e-4, errs
    if precision == "tf32x3":
        # ... and tf32x3 must not silently be the fp32 FMA path (which gives other roundings).
        ieee = run_pool("triton", x, w, g, iters=5, precision="ieee")
        assert not all(torch.equal(a, b) for a, b in zip(got, ieee))


def test_precision_float64_stays_ieee(device):
    x, w, _ = make_case(2, 6, 7, weighted=True, dtype=torch.float64, device=device)
    want = threeg_kernels.cov_pool(x, w, backend="triton")
    assert torch.equal(threeg_kernels.cov_pool(x, w, backend="triton", precision="bf16"), want)


def test_precision_errors():
    x = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'fp8'"):
        threeg_kernels.cov_pool(x, backend="torch", precision="fp8")
    with pytest.raises(ValueError, match=r"precision must be one of"):
        threeg_kernels.CovPool(precision=None)
    with pytest.raises(ValueError, match=r"precision='tf32' needs a backend that supports it .*backend='torch'"):
        threeg_kernels.cov_pool(x, backend="torch", precision="tf32")
    pool = threeg_kernels.CovPool(precision="bf16", backend="triton")
    assert "precision='bf16'" in repr(pool)


# --- availability ------------------------------------------------------------------------------------


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(triton_impl, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in triton_impl.unavailable_on(torch.device("cpu"))
    assert "'meta'" in triton_impl.unavailable_on(torch.device("meta"))
    monkeypatch.setattr(triton_impl, "INTERPRET", True)
    assert triton_impl.unavailable_on(torch.device("cpu")) is None


def test_never_auto_on_cpu():
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    assert "triton" not in dispatch.AUTO_ORDER["cpu"]
    assert dispatch.resolve("auto", x.device) is not dispatch.resolve("triton", x.device)


# --- the GPU compiler, without a GPU -------------------------------------------------------------------


# Triton 3.6 beside the pinned one (`make test` installs it there and sets THREEG_TRITON_36): the version
# GPU machines may come with, whose compiler accepts less (docs/triton.md).
TRITON_36 = Path(os.environ.get("THREEG_TRITON_36", Path(sys.prefix) / "triton-3.6"))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["pinned", "3.6"])
def test_kernels_compile_for_sm90(version):
    """Every kernel variant of a forward+backward (float32 in each precision mode and float64; weighted or
    not; K = 1 and 3; keep and recompute; both orders), specialised as a launch specialises it (integers
    equal to 1 as constants, divisibility by 16), compiles to an sm_90 cubin within the shared-memory budget,
    and those of the default launch configs spill no registers: with the pinned Triton and with Triton 3.6
    (the interpreter checks none of the GPU compiler's rules). tests/triton_compile_check.py; 1-2 min each."""
    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = Path(__file__).resolve().parents[1]
    expected = triton.__version__
    if version == "3.6":
        if not (TRITON_36 / "triton" / "__init__.py").exists():
            message = (
                f"Triton 3.6 is not installed at {TRITON_36} (`make test` installs it: pip install --no-deps "
                f"--target {TRITON_36} triton==3.6.0)"
            )
            if "THREEG_TRITON_36" in os.environ:
                pytest.fail(message)
            pytest.skip(message)
        env["PYTHONPATH"] = os.pathsep.join([str(TRITON_36), str(repo), env.get("PYTHONPATH", "")])
        expected = "3.6.0"
    run = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile_check", "--arch", "90"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    summary = re.search(
        r"^Triton (\S+), sm_90: (\d+) variants, (\d+) failed, .*spills of defaults: (\d+) variants", out, re.M
    )
    assert summary, out
    assert summary.group(1) == expected, summary.group(0)
    assert int(summary.group(2)) >= 100 and summary.group(3) == "0" and summary.group(4) == "0", summary.group(0)
    # specialised as a launch: unit strides are constants, aligned pointers and sizes carry divisibility
    specialised = r"^ok .*covariance_forward_kernel \*fp32 \{'s_xn': 1, .*divisible_by_16=\['x_ptr', .*'C'"
    assert re.search(specialised, out, re.M)
    assert re.search(r"^ok .*ns_step_kernel \*fp64 ", out, re.M), "no float64 variant"


# --- CUDA only: the real head --------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices_for("triton", ["cuda"]))
@pytest.mark.parametrize("weighted", [False, True])
def test_full_shape_cuda(device, weighted):
    x, w, g = make_case(64, 256, 196, weighted=weighted, dtype=torch.float32, device=device)
    assert_close_to_reference("triton", x, w, g, iters=5)


@pytest.mark.parametrize("device", devices_for("triton", ["cuda"]))
@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
def test_full_shape_cuda_fast_modes(device, precision):
    # Emulated under the interpreter at (1, 256, 196): tf32x3 9.2e-7, tf32 1.2e-3, bf16 9.9e-3 (docs/triton.md).
    x, w, g = make_case(8, 256, 196, weighted=True, dtype=torch.float32, device=device)
    got = run_pool("triton", x, w, g, iters=5, precision=precision)
    want = run_pool("reference", x.double(), w.double(), g.double(), iters=5)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errs) <= PRECISION_BOUND[precision], errs
