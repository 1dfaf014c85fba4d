"""The registered ops: opcheck, torch.compile(fullgraph=True) forward+backward, keep vs recompute."""

from __future__ import annotations

import pytest

from threeg_kernels.backends import torch_impl

from .helpers import assert_compiled_matches_eager, assert_keep_equals_recompute, opcheck_pool_ops


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("save_iterates", [False, True])
@pytest.mark.parametrize("iters", [1, 3])
def test_opcheck_torch_ops(weighted, save_iterates, iters):
    opcheck_pool_ops("cov_pool_torch", weighted=weighted, save_iterates=save_iterates, iters=iters)


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_keep_and_recompute_give_the_same_gradients(iters, monkeypatch):
    assert_keep_equals_recompute("torch", torch_impl, monkeypatch, iters=iters)


def test_compile_fullgraph_matches_eager():
    assert_compiled_matches_eager("torch")
