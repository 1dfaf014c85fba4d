"""The registered ops: opcheck, torch.compile(fullgraph=True) forward+backward, keep vs recompute."""

from __future__ import annotations

import pytest
import torch

import threeg_kernels
from threeg_kernels.backends import torch_impl

from .helpers import RTOL, make_case, rel_err, run_pool


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("save_iterates", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_opcheck_torch_ops(weighted, save_iterates, iters):
    x, w, g = make_case(2, 6, 7, weighted=weighted, dtype=torch.float64)
    args = (x.requires_grad_(), None if w is None else w.requires_grad_(), iters, 1e-7, True, save_iterates)
    torch.library.opcheck(torch.ops.threeg.cov_pool_torch_forward.default, args)
    out, A, tr, iterates = torch.ops.threeg.cov_pool_torch_forward(*args)
    bwd_args = (g, x.detach(), None if w is None else w.detach(), out.detach(), A, tr, iterates, iters, True)
    torch.library.opcheck(torch.ops.threeg.cov_pool_torch_backward.default, bwd_args)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_keep_and_recompute_give_the_same_gradients(iters, monkeypatch):
    x, w, g = make_case(2, 9, 11, weighted=True, dtype=torch.float64, seed=iters)
    monkeypatch.setattr(torch_impl, "SAVE_ITERATES", True)
    kept = run_pool("torch", x, w, g, iters=iters)
    monkeypatch.setattr(torch_impl, "SAVE_ITERATES", False)
    recomputed = run_pool("torch", x, w, g, iters=iters)
    for a, b in zip(kept, recomputed):
        assert rel_err(a, b) <= 1e-13


def test_compile_fullgraph_matches_eager():
    x, w, g = make_case(2, 8, 10, weighted=True, dtype=torch.float32)
    fn = lambda a, b: threeg_kernels.cov_pool(a, b, iters=3, backend="torch").sum(-1) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    outs = []
    for f in (fn, compiled):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = f(xl, wl)
        y.backward(torch.ones_like(y))
        outs.append((y, xl.grad, wl.grad))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= RTOL[torch.float32]
