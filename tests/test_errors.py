"""Users' mistakes raise ValueError/TypeError naming the argument and what was received."""

from __future__ import annotations

import pytest
import torch

import threeg_kernels
from threeg_kernels import cov_pool

X = torch.randn(2, 4, 3, 3)


@pytest.mark.parametrize(
    "x, weight, kwargs, exc, match",
    [
        (torch.randn(4, 9), None, {}, ValueError, r"x must have shape .*got 2-d .*\(4, 9\)"),
        (torch.randn(1, 2, 4, 3, 3), None, {}, ValueError, r"x must have shape .*5-d"),
        ([[1.0]], None, {}, TypeError, r"x must be a torch.Tensor .*got list"),
        (torch.randn(2, 4, 1), None, {}, ValueError, r"N = H\*W >= 2 .*\(2, 4, 1\)"),
        (torch.randn(2, 4, 1, 1), None, {}, ValueError, r"N = H\*W >= 2 .*\(2, 4, 1, 1\)"),
        (torch.randn(2, 0, 9), None, {}, ValueError, r"C >= 1 .*\(2, 0, 9\)"),
        (torch.ones(2, 4, 9, dtype=torch.int64), None, {}, TypeError, r"x must be float.*torch.int64"),
        (torch.ones(2, 4, 9, dtype=torch.bool), None, {}, TypeError, r"x must be float.*torch.bool"),
        (torch.ones(2, 4, 9, dtype=torch.complex64), None, {}, TypeError, r"x must be float.*complex64"),
        (X, torch.rand(2, 1, 3, 4), {}, ValueError, r"weight must have shape .*\(2, 1, 3, 3\).*got \(2, 1, 3, 4\)"),
        (X, torch.rand(3, 3, 3), {}, ValueError, r"weight must have shape .*got \(3, 3, 3\)"),
        (X, torch.rand(2, 4, 3, 3), {}, ValueError, r"weight must have shape .*got \(2, 4, 3, 3\)"),
        (X, torch.rand(2, 8), {}, ValueError, r"weight must have shape .*\(2, 9\).*got \(2, 8\)"),
        (
            X,
            torch.rand(2, 3, 3, dtype=torch.float64),
            {},
            TypeError,
            r"weight must have the dtype of x \(torch.float32\).*float64",
        ),
        (X, torch.rand(2, 3, 3, device="meta"), {}, ValueError, r"weight must be on the device of x \(cpu\).*meta"),
        (X, "w", {}, TypeError, r"weight must be a torch.Tensor or None; got str"),
        (X, None, {"order": "lower"}, ValueError, r"order must be one of .*'lower'"),
        (X, None, {"backend": "cudnn"}, ValueError, r"backend must be 'auto' or one of .*'cudnn'"),
        (X, None, {"backend": 3}, TypeError, r"backend must be a str"),
        (X, None, {"iters": 0}, ValueError, r"iters must be in \[1, 20\].*; got 0"),
        (X, None, {"iters": 21}, ValueError, r"iters must be in \[1, 20\].*; got 21"),
        (X, None, {"iters": 2.0}, TypeError, r"iters must be an int in \[1, 20\]; got 2.0"),
        (X, None, {"iters": True}, TypeError, r"iters must be an int"),
        (X, None, {"eps": -1e-3}, ValueError, r"eps must be finite and >= 0; got -0.001"),
        (X, None, {"eps": float("nan")}, ValueError, r"eps must be finite"),
        (X, None, {"eps": "1e-7"}, TypeError, r"eps must be a real number"),
        (X, None, {"keep_iterates": 1}, TypeError, r"keep_iterates must be True, False or None.*got 1 \(int\)"),
        (X, None, {"keep_iterates": "no"}, TypeError, r"keep_iterates must be .*got 'no' \(str\)"),
    ],
)
def test_bad_inputs(x, weight, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cov_pool(x, weight, **kwargs)


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match=r"iters must be in \[1, 20\].*; got 0"):
        threeg_kernels.CovPool(iters=0)
    with pytest.raises(ValueError, match=r"backend must be .*'fast'"):
        threeg_kernels.CovPool(backend="fast")
    with pytest.raises(TypeError, match=r"keep_iterates must be True, False or None.*got 0 \(int\)"):
        threeg_kernels.CovPool(keep_iterates=0)


def test_eps_zero_is_allowed():
    out = cov_pool(torch.randn(2, 4, 9), eps=0.0)
    assert torch.isfinite(out).all()


def test_available_backends_rejects_nothing_it_knows():
    assert "reference" in threeg_kernels.available_backends()
    assert "reference" in threeg_kernels.available_backends("cpu")
    with pytest.raises(ValueError, match=r"backend must be .*'nope'"):
        threeg_kernels.dispatch.unavailable_reason("nope", "cpu")
