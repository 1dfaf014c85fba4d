"""The contract every compiled backend of the pooling head follows: its op schema, declared once, and its
autograd glue.

A backend provides two registered ops (torch.library) named threeg::cov_pool_<name>_forward and
threeg::cov_pool_<name>_backward with exactly the schemas FORWARD_SCHEMA and BACKWARD_SCHEMA below. The
Python backends pass these strings to torch.library.custom_op; the C++ extension declares the same schema
in csrc/ops.cpp, and `register_pool_op` checks every op against the declaration here, so a backend whose
signature drifts fails at import, naming the difference.

    x          (B, C, N) in the compute dtype (float32 or float64: `cov_pool` casts narrower inputs up)
    weight     (B, N) or None
    order      the triangle order, '3g' or 'mpncov' (docs/math.md (8))
    keep_iterates
               True: the forward keeps what its backward needs of the Newton-Schulz iterates, in `iterates`;
               False: `iterates` is empty and the backward recomputes them from A (docs/math.md, "keep or
               recompute")
    precision  the matmul input precision ('ieee', or a mode the backend lists in `Loaded.precisions`)
    out        (B, C(C+1)/2);  A = Sigma / tr (B, C, C), or empty (0,) where the backend's backward never
               reads it (its `a_shape` says where: the ext CPU kernels' Gram route);  tr (B,)
    dweight    an empty tensor when weight is None

Every op pair also promises:
    B = 0      empty outputs of the shapes above (`forward_outputs`, `backward_outputs`), and no launch of an
               empty grid (an error in CUDA);
    dtypes     its products run in x's dtype whatever the caller's autocast region (the backward too, when
               loss.backward() runs inside one) and, for precision='ieee', whatever TF32 / bf16 matmul setting
               the caller's script made (threeg_kernels/_precision.py; tests/test_backends.py checks both).

This module registers the fake (meta) kernels and the autograd formula for such a pair, so that every
backend is traced by torch.compile and checked by opcheck in the same way, and returns the function the backend
calls: in eager mode it runs the same formula as a plain torch.autograd.Function around the op's kernel, which
skips the per-call Python of torch.library's generated autograd wrapper (about a quarter of the fixed cost of a
fwd+bwd call: docs/ext.md, "Per-call cost"), or, where the backend compiles one (`eager=`: the ext backend's, in
csrc/autograd.cpp), the same formula as an autograd node in C++; traced code (torch.compile, torch.export) gets the
registered op.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch

from . import reference
from ._precision import no_autocast
from ._validate import MAX_ITERS
from .reference import ORDERS

FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight, int iters, float eps, str order, bool keep_iterates, str precision)"
    " -> (Tensor out, Tensor A, Tensor tr, Tensor iterates)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor x, Tensor? weight, Tensor out, Tensor A, Tensor tr, Tensor iterates, int iters,"
    " str order, str precision) -> (Tensor dx, Tensor dweight)"
)

IteratesShape = Callable[[int, int, int, int], tuple[int, ...]]
AShape = Callable[[int, int, int], tuple[int, ...]]


def full_a_shape(b: int, c: int, n: int) -> tuple[int, ...]:
    """A = Sigma / tr of every sample, what the forward op returns unless its backend says otherwise."""
    return (b, c, c)


def check_op_args(op: str, iters: int, order: str, precision: str, precisions: tuple[str, ...] = ("ieee",)) -> None:
    """The checks every op body runs on its scalar arguments (the C++ ops run the same in csrc/cov_pool_ext.h):
    `cov_pool` has checked them already, but the ops are public (torch.ops.threeg.*) and may be called directly."""
    if not 1 <= iters <= MAX_ITERS:
        raise ValueError(f"{op}: iters must be in [1, {MAX_ITERS}]; got {iters}")
    if order not in ORDERS:
        raise ValueError(f"{op}: order must be one of {ORDERS}; got {order!r}")
    if precision not in precisions:
        raise ValueError(f"{op}: precision must be one of {precisions}; got {precision!r}")


def _signature(schema: torch._C.FunctionSchema) -> tuple:
    """What must agree between two declarations: argument names and types, return types (not return names,
    which torch.library.custom_op does not keep)."""
    return [(a.name, str(a.type)) for a in schema.arguments], [str(r.type) for r in schema.returns]


def check_schema(op, schema: str) -> None:
    """Raises TypeError naming the op unless its registered schema is `schema` (e.g. FORWARD_SCHEMA)."""
    op = getattr(op, "_opoverload", op)  # a torch.library.custom_op -> its OpOverload
    op = getattr(op, "default", op)  # an OpOverloadPacket (torch.ops.threeg.<name>) -> its OpOverload
    have = op._schema
    want = torch._C.parse_schema(f"{have.name}{schema}")
    if _signature(have) != _signature(want):
        raise TypeError(f"{have.name} is registered as\n    {have}\nbut the backend contract declares\n    {want}")


# forward OpOverload -> its a_shape as registered (register_pool_op): what the ONNX translation returns for A
A_SHAPES: dict = {}


def register_pool_op(
    forward_op,
    backward_op,
    iterates_shape: Union[IteratesShape, Mapping[str, IteratesShape]],
    a_shape: Union[AShape, Mapping[str, AShape]] = full_a_shape,
    eager: Optional[Callable] = None,
) -> Callable:
    """Checks both ops against the declared schemas, registers their fake kernels and the autograd formula, and
    returns pool_op(x, weight, iters, eps, order, keep_iterates, precision) -> out, what the backend's `pool`
    calls (eager: the formula as an autograd.Function; traced: the op).

    iterates_shape(B, C, N, iters) is the shape of the backend's kept iterates (keep_iterates=True), a_shape(B, C, N)
    that of its A output (default (B, C, C)); a backend whose device kernels keep different state gives one such
    function per device type (e.g. {"cpu": ..., "cuda": ...}).

    eager(x, weight, iters, eps, order, keep_iterates, precision) -> out, where given, is the same formula compiled
    (an autograd node in C++, whose backward calls `reference_gradient` below where create_graph=True): what eager
    calls that need a gradient run instead of the autograd.Function here.
    """
    check_schema(forward_op, FORWARD_SCHEMA)
    check_schema(backward_op, BACKWARD_SCHEMA)
    A_SHAPES[forward_op] = a_shape

    def on_device(shape, x):
        if not isinstance(shape, Mapping):
            return shape
        if x.device.type not in shape:
            raise NotImplementedError(f"{forward_op} has no kernel for device type {x.device.type!r}")
        return shape[x.device.type]

    @torch.library.register_fake(forward_op)
    def _forward_fake(x, weight, iters, eps, order, keep_iterates, precision):
        return forward_outputs(x, iters, keep_iterates, on_device(iterates_shape, x), on_device(a_shape, x))

    @torch.library.register_fake(backward_op)
    def _backward_fake(grad, x, weight, out, A, tr, iterates, iters, order, precision):
        return backward_outputs(x, weight)

    def save(ctx, inputs, output):
        x, weight, iters, eps, order, _keep, precision = inputs
        out, A, tr, iterates = output
        ctx.save_for_backward(x, weight, out, A, tr, iterates)
        ctx.iters, ctx.eps, ctx.order, ctx.precision = iters, eps, order, precision

    def setup_context(ctx, inputs, output):
        save(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        # Otherwise autograd fills a zero gradient for each auxiliary output (100s of MB for iterates).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, *_aux_grads):
        if grad_out is None:
            return None, None, None, None, None, None, None
        x, weight, out, A, tr, iterates = ctx.saved_tensors
        # loss.backward() may run inside the caller's autocast region: the gradient is computed in the forward's
        # compute dtype all the same (each op body also turns autocast off, for direct calls and compiled graphs).
        with no_autocast(x.device.type):
            if torch.is_grad_enabled():
                # create_graph=True: the gradient will itself be differentiated (a gradient penalty, a Hessian).
                # The backward ops have no derivative of their own, so the gradient is taken through the
                # reference math instead, whose autograd graph supports any order.
                dx, dweight = reference_gradient(x, weight, grad_out, ctx.iters, ctx.eps, ctx.order)
                return dx, dweight, None, None, None, None, None
            dx, dweight = backward_op(
                grad_out.contiguous(), x, weight, out, A, tr, iterates, ctx.iters, ctx.order, ctx.precision
            )
        return dx, (dweight if weight is not None else None), None, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)

    # The ops' C++ entry points (an OpOverload's _op), called without OpOverload.__call__'s Python frame: after a
    # call's kernels have filled the core's caches, each Python frame around them costs several times what it
    # costs warm (docs/ext.md, "Per-call cost").
    forward_call, backward_call = _entry_point(forward_op), _entry_point(backward_op)

    class EagerPool(torch.autograd.Function):
        """The registered formula (save / backward above) without torch.library's wrapper: the op's kernel is
        called below the Autograd dispatch key, so that nothing runs twice. Returns `out` only."""

        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                output = forward_call(*inputs)
            save(ctx, inputs, output)
            return output[0]

        @staticmethod
        def backward(ctx, grad_out):
            if torch.is_grad_enabled():  # create_graph=True: the reference math, differentiable (backward above)
                return backward(ctx, grad_out)
            # backward() above, inlined: the backward op has no derivative to set up, and grad_out is never None
            # here (EagerPool materialises the gradient of its one output)
            x, weight, out, A, tr, iterates = ctx.saved_tensors
            with torch._C._AutoDispatchBelowAutograd(), no_autocast(x.device.type):
                dx, dweight = backward_call(
                    grad_out.contiguous(), x, weight, out, A, tr, iterates, ctx.iters, ctx.order, ctx.precision
                )
            return dx, (dweight if weight is not None else None), None, None, None, None, None

    eager_apply = EagerPool.apply if eager is None else eager

    def pool_op(x, weight, iters, eps, order, keep_iterates, precision):
        """`out` of forward_op(...); differentiable by the registered formula."""
        inputs = (x, weight, iters, eps, order, keep_iterates, precision)
        if torch.compiler.is_compiling() or not (_plain(x) and (weight is None or _plain(weight))):
            return forward_op(*inputs)[0]  # traced (or a tensor subclass): the op, one node with its formula
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
            return eager_apply(*inputs)
        with torch._C._AutoDispatchBelowAutograd():
            return forward_op(*inputs)[0]

    return pool_op


def _entry_point(op) -> Callable:
    """The C++ callable behind `op` (an OpOverload, a torch.library.custom_op or an OpOverloadPacket): what
    OpOverload.__call__ calls."""
    overload = getattr(op, "_opoverload", op)
    overload = getattr(overload, "default", overload)
    return getattr(overload, "_op", op)


def _plain(t: torch.Tensor) -> bool:
    """A tensor, not a subclass that traces or transforms (FakeTensor, FunctionalTensor, ...); a Parameter is
    plain."""
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def forward_outputs(
    x: torch.Tensor, iters: int, keep_iterates: bool, iterates_shape: IteratesShape, a_shape: AShape = full_a_shape
) -> tuple:
    """(out, A, tr, iterates) of the forward op for x (B, C, N), uninitialised: its fake kernel, and what a
    backend's op returns for an empty batch (B = 0), where no kernel has anything to compute."""
    b, c, n = x.shape
    out = x.new_empty(b, c * (c + 1) // 2)
    A = x.new_empty(a_shape(b, c, n))
    tr = x.new_empty(b)
    iterates = x.new_empty(iterates_shape(b, c, n, iters) if keep_iterates else (0,))
    return out, A, tr, iterates


def backward_outputs(x: torch.Tensor, weight: Optional[torch.Tensor]) -> tuple:
    """(dx, dweight) of the backward op, uninitialised, as forward_outputs."""
    dweight = x.new_empty(0) if weight is None else torch.empty_like(weight)
    return torch.empty_like(x), dweight


def reference_gradient(x, weight, grad_out, iters, eps, order):
    """(dx or None, dweight or None) of reference.cov_pool, as a differentiable function of x, weight and grad_out, in
    x's dtype whatever autocast region the backward runs in."""
    leaves = [t for t in (x, weight) if t is not None and t.requires_grad]
    with torch.enable_grad(), no_autocast(x.device.type):
        out = reference.cov_pool(x, weight, iters, eps, order)
        grads = dict(zip(map(id, leaves), torch.autograd.grad(out, leaves, grad_out, create_graph=True)))
    return grads.get(id(x)), (None if weight is None else grads.get(id(weight)))
