"""cov_pool's one-call path on CPU (threeg_kernels._C.fast_pool, csrc/autograd.cpp): where it runs, its outputs and
gradients are the Python layer's bit for bit; everywhere else it declines (None) and the Python layer runs, errors
included."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import threeg_kernels
from tests.helpers import make_case
from threeg_kernels import api
from threeg_kernels._validate import MAX_ITERS
from threeg_kernels.backends.ext_impl import SPECTRAL_MAX_ITERS_FLOAT32 as SPECTRAL

FAST = api._FAST_POOL
pytestmark = pytest.mark.skipif(FAST is None, reason="the ext backend is not built")


def _fast(x, weight=None, iters=5, eps=1e-7, order="3g", backend="ext", precision="ieee", keep_iterates=None):
    return FAST(x, weight, iters, eps, order, backend, precision, keep_iterates)


def _run(x, w, g, slow, needs=(True, True), **options):
    """(out, gradients..., saved-tensor sizes) of cov_pool on fresh leaves (x and weight requiring a gradient as
    `needs` says; none: no backward); slow: with the one-call path switched off."""
    saved_fast = api._FAST_POOL
    if slow:
        api._FAST_POOL = None
    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    try:
        xl = x.detach().requires_grad_(needs[0])
        wl = None if w is None else w.detach().requires_grad_(needs[1])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = threeg_kernels.cov_pool(xl, wl, **options)
        leaves = [t for t in (xl, wl) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, leaves, g) if leaves else ()
        return (out, *grads), sizes
    finally:
        api._FAST_POOL = saved_fast


def _weight_shapes(b, h, w):
    """The weight shapes cov_pool accepts for x of shape (b, C, h, w) and for its view (b, C, h * w)."""
    return {4: [(b, 1, h, w), (b, h, w), (b, h * w)], 3: [(b, 1, h * w), (b, h * w)]}


def _assert_same(fast, slow, what):
    (fast_out, fast_sizes), (slow_out, slow_sizes) = fast, slow
    assert fast_sizes == slow_sizes, what  # what is saved for the backward: keep_iterates honoured
    assert len(fast_out) == len(slow_out), what
    for a, b in zip(fast_out, slow_out):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), what
        assert (a.grad_fn is None) == (b.grad_fn is None), what


@pytest.mark.parametrize(
    "dtype, dim, order, keep",
    list(itertools.product([torch.float32, torch.float64], [3, 4], ["3g", "mpncov"], [None, True, False])),
)
def test_same_bits_as_the_python_layer(dtype, dim, order, keep):
    """Every weight shape, both triangles, keep_iterates' three values, a gradient for x and the weight, for one of
    them, or none: the one-call path is taken and gives the Python layer's output, gradients and saved tensors."""
    x, _, g = make_case(2, 6, 12, weighted=False, dtype=dtype, seed=dim)
    x = x.reshape(2, 6, 3, 4) if dim == 4 else x
    for shape in [None] + _weight_shapes(2, 3, 4)[dim]:
        w = None if shape is None else torch.rand(shape, dtype=dtype) + 0.1
        options = dict(iters=5, eps=1e-6, order=order, backend="ext", keep_iterates=keep)
        assert _fast(x, w, 5, 1e-6, order, "ext", "ieee", keep) is not None, shape
        for needs in [(True, True), (True, False), (False, True), (False, False)]:
            if w is None and needs[1]:
                continue
            what = (shape, needs)
            _assert_same(_run(x, w, g, False, needs, **options), _run(x, w, g, True, needs, **options), what)


def test_takes_the_last_iters_of_each_route():
    """The C++ bounds are the Python layer's: MAX_ITERS in float64 and the spectral route's last K in float32 are
    taken (the first past each is declined below)."""
    x, w, _ = make_case(2, 4, 6, weighted=True, dtype=torch.float64)
    assert _fast(x, w, iters=MAX_ITERS) is not None
    assert _fast(x.float(), w.float(), iters=SPECTRAL) is not None


def test_without_gradient_and_empty_batch():
    """No gradient to come (no_grad, inference_mode, inputs that need none): the forward alone, as the Python layer
    runs it; B = 0 gives the empty result."""
    x, w, _ = make_case(3, 5, 9, weighted=True, dtype=torch.float64)
    want = threeg_kernels.cov_pool(x, w, backend="reference")
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = _fast(x.requires_grad_(), w)
        assert out is not None and out.grad_fn is None
        assert (out - want).abs().max() <= 1e-12 * want.abs().max()
    x.requires_grad_(False)
    out = _fast(x, w)
    assert out is not None and out.grad_fn is None
    empty = _fast(torch.randn(0, 5, 9, dtype=torch.float64))
    assert empty is not None and empty.shape == (0, 15)


def test_parameter_input_same_bits():
    """An nn.Parameter counts as a plain tensor (as in the Python layer, registration._plain): taken, same bits."""
    x, w, g = make_case(2, 5, 8, weighted=True, dtype=torch.float32, seed=4)
    got = []
    for slow in (False, True):
        saved = api._FAST_POOL
        api._FAST_POOL = None if slow else saved
        try:
            p = torch.nn.Parameter(x.clone())
            out = threeg_kernels.cov_pool(p, w, backend="ext")
            got.append((out, *torch.autograd.grad(out, [p], g)))
        finally:
            api._FAST_POOL = saved
    assert _fast(torch.nn.Parameter(x), w) is not None
    for a, b in zip(*got):
        assert torch.equal(a, b)


class _Subclass(torch.Tensor):
    pass


class _NoopFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _NoopDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _declined_cases():
    x, w, _ = make_case(2, 4, 6, weighted=True, dtype=torch.float32)
    x64, w64 = x.double(), w.double()
    yield "backend torch", lambda: _fast(x, w, backend="torch")
    yield "backend reference", lambda: _fast(x, w, backend="reference")
    yield "backend unknown", lambda: _fast(x, w, backend="fast")
    yield "backend auto by name (cov_pool passes what it resolves to)", lambda: _fast(x, w, backend="auto")
    yield "precision tf32", lambda: _fast(x, w, precision="tf32")
    yield "iters a bool", lambda: _fast(x, w, iters=True)
    yield "iters a float", lambda: _fast(x, w, iters=5.0)
    yield "iters 0", lambda: _fast(x, w, iters=0)
    yield "iters past MAX_ITERS", lambda: _fast(x64, w64, iters=MAX_ITERS + 1)
    yield "iters past the spectral route's in float32 (the iteration runs)", lambda: _fast(x, w, iters=SPECTRAL + 1)
    yield "iters a huge int", lambda: _fast(x, w, iters=1 << 70)
    yield "eps an int", lambda: _fast(x, w, eps=0)
    yield "eps negative", lambda: _fast(x, w, eps=-1e-7)
    yield "eps inf", lambda: _fast(x, w, eps=float("inf"))
    yield "eps nan", lambda: _fast(x, w, eps=float("nan"))
    yield "eps below float32's normal range", lambda: _fast(x, w, eps=1e-40)
    yield "order unknown", lambda: _fast(x, w, order="lower")
    yield "keep_iterates an int", lambda: _fast(x, w, keep_iterates=1)
    yield "x float16", lambda: _fast(x.half(), w.half())
    yield "x bfloat16", lambda: _fast(x.bfloat16(), w.bfloat16())
    yield "x 2-d", lambda: _fast(x[0], None)
    yield "x 5-d", lambda: _fast(x.reshape(2, 4, 1, 2, 3), None)
    yield "x with N = 1", lambda: _fast(x[..., :1], None)
    yield "x a subclass", lambda: _fast(x.as_subclass(_Subclass), w)
    yield "x not a tensor", lambda: _fast(x.tolist(), None)
    yield "x on the meta device", lambda: _fast(x.to("meta"), None)
    yield "x a nested tensor", lambda: _fast(_nested(x), None)
    yield "x a negative view", lambda: _fast(x._neg_view(), None)
    yield "weight of another dtype", lambda: _fast(x, w64)
    yield "weight of another shape", lambda: _fast(x, w[:, :5])
    yield "weight (B, 1, H, W) for 3-d x", lambda: _fast(x, w.reshape(2, 1, 2, 3))
    yield "weight not a tensor", lambda: _fast(x, w.tolist())
    yield "autocast on", lambda: _autocast(lambda: _fast(x, w))
    yield "a torch function mode", lambda: _in_mode(_NoopFunctionMode(), lambda: _fast(x, w))
    yield "a torch dispatch mode", lambda: _in_mode(_NoopDispatchMode(), lambda: _fast(x, w))
    yield "inside vmap", lambda: _declined_inside_vmap(x, w)
    yield "a forward-mode tangent", lambda: _with_tangent(x, w)


def _nested(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype-stage warning of strided nested tensors
        return torch.nested.nested_tensor([x[0], x[1]])


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def _in_mode(mode, fn):
    with mode:
        return fn()


def _declined_inside_vmap(x, w):
    seen = []
    torch.func.vmap(lambda xs, ws: seen.append(_fast(xs[None], ws[None])) or xs.sum())(x, w)
    return seen[0]


def _with_tangent(x, w):
    with fwAD.dual_level():
        return _fast(fwAD.make_dual(x, torch.ones_like(x)), w)


@pytest.mark.parametrize("case, call", list(_declined_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_declines_what_the_python_layer_decides(case, call):
    assert call() is None, case


def test_errors_still_come_from_the_python_layer():
    """The one-call path never raises for a user's mistake: cov_pool's own messages reach the caller."""
    x, w, _ = make_case(2, 4, 6, weighted=True, dtype=torch.float32)
    with pytest.raises(TypeError, match="iters must be an int"):
        threeg_kernels.cov_pool(x, w, iters=True, backend="ext")
    with pytest.raises(ValueError, match="weight must have shape"):
        threeg_kernels.cov_pool(x, w[:, :5], backend="ext")
    with pytest.raises(ValueError, match="eps must be finite"):
        threeg_kernels.cov_pool(x, w, eps=float("inf"), backend="ext")


def _recording(calls):
    """api._FAST_POOL wrapped so that each call appends (backend it was given, whether it took the call)."""
    inner = api._FAST_POOL

    def fast_pool(*args):
        out = inner(*args)
        calls.append((args[5], out is not None))
        return out

    return fast_pool


@pytest.mark.parametrize("forced", [None, "", "auto", "ext"])
def test_auto_on_cpu_takes_the_one_call_path(monkeypatch, forced):
    """backend='auto' on CPU tensors is 'ext' (THREEG_BACKEND unset, empty, 'auto' or 'ext'): cov_pool hands it to the
    one-call path as 'ext', which takes it, with the Python layer's output, gradients and saved tensors."""
    assert api._auto_cpu_is_ext(), "'auto' on CPU resolves to 'ext' where the extension is built"
    if forced is None:
        monkeypatch.delenv("THREEG_BACKEND", raising=False)
    else:
        monkeypatch.setenv("THREEG_BACKEND", forced)
    x, w, g = make_case(2, 6, 12, weighted=True, dtype=torch.float32, seed=7)
    calls = []
    monkeypatch.setattr(api, "_FAST_POOL", _recording(calls))
    fast = _run(x, w, g, False, backend="auto")
    assert calls == [("ext", True)]
    slow = _run(x, w, g, True, backend="auto")
    _assert_same(fast, slow, forced)
    assert fast[0][0].grad_fn.name() == "torch::autograd::CppNode<threeg::CovPoolExt>"


@pytest.mark.parametrize("forced", ["torch", "reference"])
def test_auto_follows_threeg_backend(monkeypatch, forced):
    """THREEG_BACKEND naming another backend: 'auto' reaches the Python layer, which runs that backend (the one-call
    path sees 'auto' and declines), read at each call."""
    x, w, g = make_case(2, 6, 12, weighted=True, dtype=torch.float64, seed=8)
    calls = []
    monkeypatch.setattr(api, "_FAST_POOL", _recording(calls))
    monkeypatch.setenv("THREEG_BACKEND", forced)
    got, _ = _run(x, w, g, False, backend="auto")
    assert calls == [("auto", False)]
    assert "CovPoolExt" not in got[0].grad_fn.name()
    want, _ = _run(x, w, g, True, backend=forced)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    monkeypatch.delenv("THREEG_BACKEND")
    calls.clear()
    _run(x, w, g, False, backend="auto")
    assert calls == [("ext", True)]


def test_auto_follows_the_cpu_order(monkeypatch):
    """'ext' not first in dispatch.AUTO_ORDER['cpu']: 'auto' is the Python layer's, which runs the first there."""
    x, w, g = make_case(2, 6, 12, weighted=True, dtype=torch.float64, seed=9)
    calls = []
    monkeypatch.setattr(api, "_FAST_POOL", _recording(calls))
    monkeypatch.delenv("THREEG_BACKEND", raising=False)
    monkeypatch.setitem(threeg_kernels.dispatch.AUTO_ORDER, "cpu", ("torch", "ext", "reference"))
    got, _ = _run(x, w, g, False, backend="auto")
    assert calls == [("auto", False)]
    want, _ = _run(x, w, g, True, backend="torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class _EqualsAuto:
    """Not a str, but == 'auto'."""

    def __eq__(self, other):
        return other == "auto"

    __hash__ = None


def test_a_backend_that_only_equals_auto_is_still_refused():
    x, w, _ = make_case(2, 4, 6, weighted=True, dtype=torch.float32)
    with pytest.raises(TypeError, match="backend must be a str"):
        threeg_kernels.cov_pool(x, w, backend=_EqualsAuto())
