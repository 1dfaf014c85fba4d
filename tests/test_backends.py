"""Every backend on every device against reference.py: one matrix of the cases all backends share.

Each test is parametrised by (backend, device) from tests/helpers.py: CUDA targets are marked `cuda` and
skip without a CUDA device; a backend unavailable on a device skips with the reason threeg_kernels.dispatch
gives. 'triton' on CPU runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there
is no GPU), where it is slow: the per-target case sets below give it tiny shapes (C <= 32, B <= 2).
What only one backend has is tested in tests/test_ext.py and tests/test_triton.py.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

import threeg_kernels
from threeg_kernels import dispatch, reference

from .helpers import (
    OP_BACKENDS,
    RTOL,
    assert_close_to_reference,
    backends_and_devices,
    eager_and_compiled,
    fast_matmul,
    interpreted,
    make_case,
    opcheck_pool_ops,
    param_id,
    pool_ops,
    product,
    rel_err,
    run_pool,
)

DTYPES = (torch.float32, torch.float64)
ORDERS = ("3g", "mpncov")
WEIGHTED = (False, True)


def _shapes(backend, device):
    """(B, C, N) of the comparison matrix. The real head (C = 256, N = 14 * 14) is in the CUDA set; on CPU it is
    test_matches_reference_full_size (slow)."""
    if interpreted(backend, device):
        return [(2, 7, 5), (2, 20, 33)]
    return [(3, 7, 5), (4, 64, 49), (2, 100, 49)] + ([(2, 256, 196)] if device == "cuda" else [])


def _iters(backend, device):
    return [1, 2, 5] if interpreted(backend, device) else [1, 2, 3, 5]


@pytest.mark.parametrize(
    "backend, device, shape, iters",
    backends_and_devices(OP_BACKENDS, lambda b, d: product(_shapes(b, d), _iters(b, d))),
)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("weighted", WEIGHTED, ids=["unweighted", "weighted"])
def test_matches_reference(backend, device, shape, iters, dtype, order, weighted):
    x, w, g = make_case(*shape, weighted=weighted, dtype=dtype, seed=iters, device=device)
    assert_close_to_reference(backend, x, w, g, iters=iters, order=order)


def _full_size(backend, device):
    """On CPU, natively: the CUDA targets have the full size in their comparison matrix, and the Triton
    interpreter is too slow for it."""
    return [()] if device == "cpu" and not interpreted(backend, device) else []


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS, _full_size))
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("weighted", WEIGHTED, ids=["unweighted", "weighted"])
def test_matches_reference_full_size(backend, device, dtype, weighted):
    """The real head: C = 256, N = 14 * 14, K = 5."""
    x, w, g = make_case(2, 256, 196, weighted=weighted, dtype=dtype, device=device)
    assert_close_to_reference(backend, x, w, g, iters=5)


@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
@pytest.mark.parametrize("weighted", WEIGHTED, ids=["unweighted", "weighted"])
def test_non_contiguous(backend, device, weighted):
    x, w, g = make_case(2, 12, 10, weighted=weighted, dtype=torch.float32, non_contiguous=True, device=device)
    assert not x.is_contiguous()
    if weighted:
        w = torch.cat([w, w], dim=1)[:, ::2]  # a strided weight too
        assert not w.is_contiguous()
    assert_close_to_reference(backend, x, w, g, iters=3)


@pytest.mark.parametrize("backend, device", backends_and_devices())
def test_4d_input_and_weight_layouts(backend, device):
    """(B, C, H, W) with weight (B, 1, H, W), (B, H, W) and (B, N) all equal the (B, C, N) call."""
    x, w, g = make_case(2, 6, 12, weighted=True, dtype=torch.float64, device=device)
    want = threeg_kernels.cov_pool(x, w, backend=backend)
    x4 = x.reshape(2, 6, 3, 4)
    for weight in (w.reshape(2, 1, 3, 4), w.reshape(2, 3, 4), w):
        got = threeg_kernels.cov_pool(x4, weight, backend=backend)
        assert got.shape == (2, 21)
        assert rel_err(got, want) <= RTOL[torch.float64]


def _gradcheck_cases(backend, device):
    """(shape, iters, weighted)."""
    if interpreted(backend, device):
        return [((1, 4, 6), 1, False), pytest.param((1, 4, 6), 3, True, marks=pytest.mark.slow)]  # 10-14 s
    return product([(2, 5, 7)], [1, 2, 5], WEIGHTED)


@pytest.mark.parametrize("backend, device, shape, iters, weighted", backends_and_devices(OP_BACKENDS, _gradcheck_cases))
def test_gradcheck(backend, device, shape, iters, weighted):
    """float64 finite differences against the hand-written backward."""
    x, w, _ = make_case(*shape, weighted=weighted, dtype=torch.float64, seed=iters, device=device)
    inputs = (x.requires_grad_(),) if w is None else (x.requires_grad_(), w.requires_grad_())
    fn = lambda *t: threeg_kernels.cov_pool(*t, iters=iters, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=param_id)
def test_half_inputs_computed_in_float32(backend, device, dtype):
    """fp16/bf16 in: computed in fp32, result cast back; equals the fp32 reference rounded."""
    x, w, g = make_case(2, 16, 20, weighted=True, dtype=dtype, device=device)
    out, dx, dw = run_pool(backend, x, w, g, iters=5)
    assert out.dtype == dx.dtype == dw.dtype == dtype
    want, want_dx, want_dw = run_pool("reference", x.float(), w.float(), g.float(), iters=5)
    # Only the final rounding to the half type differs: its unit roundoff is 2^-11 (fp16), 2^-8 (bf16).
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for got, ref in ((out, want), (dx, want_dx), (dw, want_dw)):
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("backend, device", backends_and_devices())
def test_autocast_bf16(backend, device):
    """Under autocast the head still runs in fp32 on fp32 inputs (autocast is disabled inside)."""
    x, w, _ = make_case(2, 16, 20, weighted=True, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = threeg_kernels.cov_pool(x, w, backend=backend)
    assert got.dtype == torch.float32
    assert rel_err(got, threeg_kernels.cov_pool(x, w, backend="reference")) <= RTOL[torch.float32]


@pytest.mark.parametrize("backend, device", backends_and_devices())
def test_non_finite_input_stays_in_its_sample(backend, device):
    """As documented: NaN in one sample poisons that sample only."""
    x, w, _ = make_case(2, 6, 8, weighted=True, dtype=torch.float32, device=device)
    x[1, 2, 3] = float("nan")
    out = threeg_kernels.cov_pool(x, w, backend=backend)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).any()


@pytest.mark.parametrize(
    "backend, device", backends_and_devices(OP_BACKENDS, lambda b, d: [] if interpreted(b, d) else [()])
)
def test_large_batch_runs_every_sample(backend, device):
    """More samples than threads / blocks: every sample's result is its own (no chunking slip). Not under the
    Triton interpreter (B = 9)."""
    x, w, g = make_case(9, 12, 15, weighted=True, dtype=torch.float64, device=device)
    whole = run_pool(backend, x, w, g, iters=4)
    for b in (0, 4, 8):
        alone = run_pool(backend, x[b : b + 1], w[b : b + 1], g[b : b + 1], iters=4)
        for a, s in zip(whole, alone):
            assert rel_err(a[b : b + 1], s) <= 1e-13


@pytest.mark.parametrize("backend, device", backends_and_devices())
def test_orders_pinned_3x3(backend, device):
    """Every backend's output, read in each order, is the pinned entries of the full matrix S (docs/math.md (8))."""
    x, w, _ = make_case(1, 3, 6, weighted=True, dtype=torch.float64, device=device)
    A, tr = reference.trace_normalise(reference.weighted_covariance(x, w))
    S = (tr.sqrt() * reference.newton_schulz(A, 5))[0]
    lower = [S[0, 0], S[1, 0], S[1, 1], S[2, 0], S[2, 1], S[2, 2]]
    upper = [S[0, 0], S[0, 1], S[0, 2], S[1, 1], S[1, 2], S[2, 2]]
    for order, entries in (("3g", lower), ("mpncov", upper)):
        got = threeg_kernels.cov_pool(x, w, order=order, backend=backend)[0]
        assert rel_err(got, torch.stack(entries)) <= 1e-12


# --- the registered op pair: opcheck, torch.compile, keep or recompute ----------------------------------


def _opcheck_cases(backend, device):
    """(weighted, keep_iterates, iters)."""
    if interpreted(backend, device):
        return [(False, False, 1), (True, True, 3), (True, False, 2)]
    return product(WEIGHTED, [False, True], [1, 3])


@pytest.mark.parametrize(
    "backend, device, weighted, keep_iterates, iters", backends_and_devices(OP_BACKENDS, _opcheck_cases)
)
def test_opcheck(backend, device, weighted, keep_iterates, iters):
    opcheck_pool_ops(backend, weighted=weighted, keep_iterates=keep_iterates, iters=iters, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
def test_compile_fullgraph_matches_eager(backend, device):
    """torch.compile(fullgraph=True) of cov_pool, forward and backward, equals eager."""
    x, w, _ = make_case(2, 8, 10, weighted=True, dtype=torch.float32, device=device)
    fn = lambda a, b: threeg_kernels.cov_pool(a, b, iters=3, backend=backend).sum(-1) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(*eager_and_compiled(fn, compiled, x, w)):
        # The same kernels run either way; measured <= 5.6e-8 (out), 0 (grads).
        assert rel_err(a, b) <= RTOL[torch.float32]


_FRESH_COMPILE = """
import torch, threeg_kernels
pool = threeg_kernels.CovPool()
x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
out = torch.compile(pool, backend="aot_eager")(x)
(dx,) = torch.autograd.grad(out.sum(), x)
want = threeg_kernels.cov_pool(x, backend="reference")
(want_dx,) = torch.autograd.grad(want.sum(), x)
print(float((out - want).abs().max() / want.abs().max()), float((dx - want_dx).abs().max() / want_dx.abs().max()))
"""


@pytest.mark.slow
def test_compile_as_the_first_call_of_a_process():
    """torch.compile of CovPool before any eager call (a fresh process; aot_eager: no C compiler needed): the
    Python layer must not fill a module-level cache while traced (the guards dynamo installs on it then fail on the
    frame that made them), which an eager call made earlier in the same process would hide."""
    run = subprocess.run([sys.executable, "-c", _FRESH_COMPILE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out_err, dx_err = (float(v) for v in run.stdout.split())
    assert out_err <= RTOL[torch.float64] and dx_err <= RTOL[torch.float64]


@pytest.mark.parametrize("backend, device", backends_and_devices())
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_keep_and_recompute_give_the_same_gradients(backend, device, iters):
    """keep_iterates=True and False give the same results (float64; 'reference' ignores it). Recomputing
    rounds step 1 from A instead of from Sigma / tr: measured <= 6.6e-16."""
    x, w, g = make_case(2, 9, 11, weighted=True, dtype=torch.float64, seed=iters, device=device)
    kept, recomputed = (run_pool(backend, x, w, g, iters=iters, keep_iterates=keep) for keep in (True, False))
    for a, b in zip(kept, recomputed):
        assert rel_err(a, b) <= 1e-13


def _saved_elements(fn, x, w) -> int:
    """How many tensor elements autograd keeps for the backward of fn(x, w)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_(), w.detach().requires_grad_())
    return sum(sizes)


@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
def test_keep_iterates_is_passed_on(backend, device):
    """keep_iterates reaches the op, from cov_pool and from CovPool: keeping saves more for the backward than
    recomputing, and None is the backend's default."""
    x, w, _ = make_case(2, 6, 7, weighted=True, dtype=torch.float64, device=device)
    saved = {}
    for keep in (None, True, False):
        saved[keep] = _saved_elements(
            functools.partial(threeg_kernels.cov_pool, backend=backend, keep_iterates=keep), x, w
        )
        pool = threeg_kernels.CovPool(backend=backend, keep_iterates=keep)
        assert _saved_elements(pool, x, w) == saved[keep], keep
    assert saved[True] > saved[False]
    assert saved[None] == saved[dispatch.resolve(backend, torch.device(device)).keep_iterates]


# --- what the caller's process settings must not change: autocast, TF32 / bf16 matmuls; empty batches ------


def _autocast_dtypes(backend, device):
    return [(torch.bfloat16,)] if interpreted(backend, device) else [(torch.bfloat16,), (torch.float16,)]


@pytest.mark.parametrize("backend, device, autocast_dtype", backends_and_devices(OP_BACKENDS, _autocast_dtypes))
def test_backward_under_autocast(backend, device, autocast_dtype):
    """loss.backward() inside the autocast region, as a training step may run it: the backward's products stay in
    float32 (autocast would cast them to float16/bfloat16: a 1e-2 error on CPU, or a dtype mismatch error), so the
    gradients equal the float32 reference's computed outside autocast. ('reference' is autograd through plain
    torch ops, whose backward nodes autocast does cast: not part of this promise.)"""
    x, w, g = make_case(2, 16, 20, weighted=True, dtype=torch.float32, device=device)
    want = run_pool("reference", x, w, g, iters=5)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(device, dtype=autocast_dtype):
        out = threeg_kernels.cov_pool(xl, wl, iters=5, backend=backend)
        (out * g).sum().backward()
    for name, got, ref in (("out", out, want[0]), ("dx", xl.grad, want[1]), ("dweight", wl.grad, want[2])):
        assert got.dtype == torch.float32, name
        assert rel_err(got, ref) <= RTOL[torch.float32], (name, rel_err(got, ref))


@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
def test_ops_called_in_an_autocast_region(backend, device):
    """The registered ops themselves (as torch.compile's graphs call them) compute in x's dtype in an autocast
    region: the same results as outside it."""
    fwd, bwd = pool_ops(backend)
    x, w, g = make_case(2, 16, 20, weighted=True, dtype=torch.float32, device=device)
    args = (x, w, 3, 1e-7, "3g", True, "ieee")
    want = fwd(*args)
    want_grads = bwd(g, x, w, *want[:4], 3, "3g", "ieee")
    with torch.autocast(device, dtype=torch.bfloat16):
        got = fwd(*args)
        got_grads = bwd(g, x, w, *got[:4], 3, "3g", "ieee")
    for a, b in zip((*got[:3], *got_grads), (*want[:3], *want_grads)):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= RTOL[torch.float32]


@pytest.mark.parametrize("backend, device", backends_and_devices())
@pytest.mark.parametrize("weighted", WEIGHTED, ids=["unweighted", "weighted"])
def test_empty_batch(backend, device, weighted):
    """B = 0: empty results of the right shapes and dtype, forward and backward (no kernel launch: a CUDA grid of
    zero blocks is an error)."""
    x, w, _ = make_case(0, 6, 8, weighted=weighted, dtype=torch.float32, device=device)
    x4 = x.reshape(0, 6, 2, 4).requires_grad_()
    w4 = None if w is None else w.reshape(0, 1, 2, 4).requires_grad_()
    out = threeg_kernels.cov_pool(x4, w4, iters=3, backend=backend)
    assert out.shape == (0, 21) and out.dtype == torch.float32 and out.device.type == device
    out.backward(torch.ones_like(out))
    assert x4.grad.shape == x4.shape
    if weighted:
        assert w4.grad.shape == w4.shape


@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
@pytest.mark.parametrize("keep_iterates", [False, True])
def test_empty_batch_ops(backend, device, keep_iterates):
    """B = 0 on the registered op pair, called directly: the contract's shapes (those of its fake kernels, which
    opcheck compares), for both iterates layouts."""
    fwd, bwd = pool_ops(backend)
    x, w, g = make_case(0, 5, 7, weighted=True, dtype=torch.float64, device=device)
    args = (x, w, 3, 1e-7, "mpncov", keep_iterates, "ieee")
    torch.library.opcheck(fwd.default, args)
    out, A, tr, iterates = fwd(*args)
    assert (out.shape, A.shape, tr.shape) == ((0, 15), (0, 5, 5), (0,))
    assert iterates.numel() == 0
    bwd_args = (g, x, w, out, A, tr, iterates, 3, "mpncov", "ieee")
    torch.library.opcheck(bwd.default, bwd_args)
    dx, dw = bwd(*bwd_args)
    assert dx.shape == x.shape and dw.shape == w.shape


def _tensor_core_case(backend, device):
    """(B, C, N) large enough that TF32 products (11-bit significands) miss float32 by far more than RTOL."""
    return [((2, 20, 33),)] if interpreted(backend, device) else [((2, 64, 49),)]


@pytest.mark.parametrize("backend, device, shape", backends_and_devices(OP_BACKENDS, _tensor_core_case))
def test_ieee_whatever_the_callers_matmul_setting(backend, device, shape):
    """precision='ieee' (the default) holds when the caller's script allows faster float32 products (TF32 on CUDA,
    bf16 pieces in oneDNN on CPU: helpers.fast_matmul): the same results as with the default setting, and the
    caller's setting unchanged afterwards. (On CPUs whose oneDNN ignores the bf16 setting the comparison holds
    trivially; the CUDA case fails by ~1e-3 when TF32 leaks into the products.)"""
    x, w, g = make_case(*shape, weighted=True, dtype=torch.float32, device=device)
    want = run_pool(backend, x, w, g, iters=5)
    with fast_matmul(device) as (setting, fast):
        got = run_pool(backend, x, w, g, iters=5)
        assert setting.read() == fast  # still the caller's
    for name, a, b in zip(("out", "dx", "dweight"), got, want):
        err = rel_err(a, b)
        assert err == 0 if device == "cpu" else err <= 1e-6, (name, err)
    if device == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 0):
        a = x.transpose(1, 2) @ x  # (B, N, N): TF32 is real on this GPU, so the comparison above can fail
        with fast_matmul(device):
            tf32 = x.transpose(1, 2) @ x
        assert rel_err(tf32, a) > 1e-5


@pytest.mark.parametrize(
    "backend, device", backends_and_devices(("torch", "ext"), lambda b, d: [()] if d == "cuda" else [])
)
def test_ieee_in_a_captured_cuda_graph(backend, device):
    """The products captured into a CUDA graph under the caller's TF32 setting are IEEE float32 too (the op bodies
    set the math mode while the products are issued, which is when capture records it)."""
    x, w, _ = make_case(2, 64, 49, weighted=True, dtype=torch.float32, device=device)
    want = threeg_kernels.cov_pool(x, w, backend=backend)
    with fast_matmul(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (caches, cuBLAS workspaces)
            threeg_kernels.cov_pool(x, w, backend=backend)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = threeg_kernels.cov_pool(x, w, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(got, want) <= 1e-6


def _past_int32(backend, device):
    """(B, C, N) whose last sample starts past 2^31 elements of the C x C batches (B*C*C) or of the features (B*C*N;
    B past the 65535 blocks of a grid's y and z dimensions too), on CUDA only."""
    if device != "cuda":
        return []
    return [pytest.param((32769, 256, 2), id="BCC"), pytest.param((684786, 16, 196), id="BCN")]


@pytest.mark.parametrize("backend, device, shape", backends_and_devices(("ext", "triton"), _past_int32))
def test_offsets_past_2_31(backend, device, shape):
    """Indices past 2^31 elements (int64 offsets in every kernel): the last sample of the batch, forward and
    backward, equals the same sample computed alone. (About 45 GB of GPU memory.)"""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if free < 50 * 2**30:
        pytest.skip(f"needs 50 GiB of free GPU memory; {free / 2**30:.1f} GiB free")
    b, c, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, c, n, device=device, generator=gen).requires_grad_()
    w = (torch.rand(b, n, device=device, generator=gen) + 0.1).requires_grad_()
    g = torch.randn(b, c * (c + 1) // 2, device=device, generator=gen)
    out = threeg_kernels.cov_pool(x, w, iters=1, backend=backend)
    out.backward(g)
    last = [t[-1:].detach() for t in (out, x.grad, w.grad)]
    del out
    x.grad = w.grad = None
    alone = run_pool(backend, x[-1:].detach(), w[-1:].detach(), g[-1:], iters=1)
    for name, a, s in zip(("out", "dx", "dweight"), last, alone):
        assert rel_err(a, s) <= RTOL[torch.float32], (name, rel_err(a, s))


@pytest.mark.parametrize("backend, device", backends_and_devices(OP_BACKENDS))
def test_double_backward_under_autocast(backend, device):
    """create_graph=True inside an autocast region (a gradient penalty in a mixed-precision step): the gradient,
    taken through the reference math, is the float32 one all the same."""
    x, w, g = make_case(2, 6, 8, weighted=True, dtype=torch.float32, device=device)
    want = run_pool("reference", x, w, g, iters=3)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = threeg_kernels.cov_pool(xl, wl, iters=3, backend=backend)
        dx, dw = torch.autograd.grad(out, (xl, wl), g, create_graph=True)
    assert dx.requires_grad
    for name, got, ref in (("dx", dx, want[1]), ("dweight", dw, want[2])):
        assert got.dtype == torch.float32
        assert rel_err(got, ref) <= RTOL[torch.float32], (name, rel_err(got, ref))


def test_python_m_threeg_kernels_reports_and_has_help(capsys, monkeypatch):
    """`python -m threeg_kernels`: the report names every backend on the CPU and what 'auto' picks there (and a
    THREEG_BACKEND that overrides it); --help prints the usage instead; an unknown argument is refused."""
    from threeg_kernels import __main__ as cli

    monkeypatch.setenv("THREEG_BACKEND", "torch")
    cli.main([])
    report = capsys.readouterr().out
    assert "device cpu" in report and "auto picks: " in report and "THREEG_BACKEND=torch" in report
    assert all(f"  {b:<10} " in report for b in dispatch.BACKENDS)
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0 and "usage: python -m threeg_kernels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["--bogus"])
    assert done.value.code == 2
