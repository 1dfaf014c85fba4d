"""What cov_pool does at the edges of its contract: devices that are not there, meta tensors, eps outside the
compute dtype, a bad THREEG_BACKEND, symbolic shapes, and not keeping iterates when no backward can follow."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import threeg_kernels
from threeg_kernels import dispatch

# every backend present, triton included (under the interpreter on CPU: the shapes here are tiny)
CPU_BACKENDS = threeg_kernels.available_backends("cpu")
COMPILED = [b for b in CPU_BACKENDS if b != "reference"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_no_backend_for_a_missing_device():
    assert threeg_kernels.available_backends("cuda") == []
    with pytest.raises(dispatch.BackendUnavailableError, match="is_available"):
        dispatch.resolve("torch", torch.device("cuda"))


def test_no_backend_for_a_device_index_past_the_last(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert threeg_kernels.available_backends("cuda:1") == []
    assert "device_count() is 1" in dispatch.unavailable_reason("torch", "cuda:1")
    assert threeg_kernels.available_backends("cuda:0")  # present (as far as torch is told): backends listed


@pytest.mark.parametrize("weighted", [False, True])
def test_meta_tensors_give_meta_outputs(weighted):
    x = torch.randn(3, 6, 4, 5, device="meta")
    w = torch.rand(3, 1, 4, 5, device="meta") if weighted else None
    out = threeg_kernels.cov_pool(x, w)
    assert out.device.type == "meta" and out.shape == (3, 21) and out.dtype == x.dtype
    for backend in threeg_kernels.available_backends("meta"):
        assert threeg_kernels.cov_pool(x, w, backend=backend).shape == (3, 21)


@pytest.mark.parametrize(
    "eps, dtype", [(1e-50, torch.float32), (1e39, torch.float32), (1e-320, torch.float64), (1e-40, torch.float16)]
)
def test_eps_not_representable_in_the_compute_dtype(eps, dtype):
    x = torch.randn(2, 4, 5, dtype=dtype)
    with pytest.raises(ValueError, match=r"eps must be 0 or between .* compute dtype torch\.float"):
        threeg_kernels.cov_pool(x, eps=eps, backend="reference")


def test_eps_zero_and_normal_values_still_accepted():
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    for eps in (0.0, 1e-300, 1e-7, 1.0):
        assert torch.isfinite(threeg_kernels.cov_pool(x, eps=eps, backend="reference")).all()


def test_invalid_threeg_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("THREEG_BACKEND", "fastest")
    with pytest.raises(ValueError, match="THREEG_BACKEND.*'fastest'"):
        threeg_kernels.cov_pool(torch.randn(2, 4, 5))


def test_threeg_backend_auto_leaves_auto_to_decide(monkeypatch):
    """THREEG_BACKEND=auto is 'auto' itself (as unset or empty), on the Python layer's path too (float16 input)."""
    x = torch.randn(2, 4, 5).half()
    monkeypatch.delenv("THREEG_BACKEND", raising=False)
    want = threeg_kernels.cov_pool(x)
    monkeypatch.setenv("THREEG_BACKEND", "auto")
    assert torch.equal(threeg_kernels.cov_pool(x), want)


class _RecordPoolOps(TorchDispatchMode):
    """Records the keep_iterates argument of every threeg::*_forward op call."""

    def __init__(self):
        super().__init__()
        self.keep = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "threeg" and "forward" in func.name():
            self.keep.append(args[5])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", COMPILED)
def test_no_iterates_kept_without_a_backward(backend):
    x = torch.randn(2, 6, 9)
    cases = [
        (torch.no_grad, True, False),
        (torch.inference_mode, True, False),
        (torch.enable_grad, False, False),  # nothing requires a gradient
        (torch.enable_grad, True, True),
    ]
    for context, requires_grad, kept in cases:
        with _RecordPoolOps() as rec, context():
            threeg_kernels.cov_pool(x.clone().requires_grad_(requires_grad), backend=backend, keep_iterates=True)
        assert rec.keep == [kept], (context.__name__, requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_dynamic_shapes_fullgraph(backend):
    torch._dynamo.reset()
    fn = lambda a, w: threeg_kernels.cov_pool(a, w, iters=3, backend=backend)  # noqa: E731
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for b, c, n in ((2, 4, 5), (3, 6, 7)):
        x, w = torch.randn(b, c, n, dtype=torch.float64), torch.rand(b, n, dtype=torch.float64) + 0.1
        got, want = compiled(x, w), fn(x, w)
        assert got.shape == (b, c * (c + 1) // 2)
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
