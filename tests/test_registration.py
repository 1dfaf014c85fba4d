"""The registered ops: opcheck, torch.compile(fullgraph=True) forward+backward, keep vs recompute."""

from __future__ import annotations

import pytest
import torch

from threeg_kernels.backends import torch_impl

from .helpers import assert_compiled_matches_eager, make_case, opcheck_pool_ops, rel_err, run_pool


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("save_iterates", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_opcheck_torch_ops(weighted, save_iterates, iters):
    opcheck_pool_ops("cov_pool_torch", weighted=weighted, save_iterates=save_iterates, iters=iters)


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
    assert_compiled_matches_eager("torch")
