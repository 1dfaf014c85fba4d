"""The contract every compiled backend of the pooling head follows, and its autograd glue.

A backend provides two registered ops (torch.library), one name each:

    threeg::<name>_forward(Tensor x, Tensor? weight, int iters, float eps, bool lower, bool save_iterates)
        -> (Tensor out, Tensor A, Tensor tr, Tensor iterates)
    threeg::<name>_backward(Tensor grad, Tensor x, Tensor? weight, Tensor out, Tensor A, Tensor tr,
                            Tensor iterates, int iters, bool lower)
        -> (Tensor dx, Tensor dweight)

x is (B, C, N) and weight (B, N) in the compute dtype (float32 or float64: `cov_pool` casts
narrower inputs up before calling), out is (B, C(C+1)/2), A = Sigma / tr is (B, C, C), tr is (B,).
`lower` selects the '3g' order (lower triangle row-major) over 'mpncov' (upper triangle row-major).
`iterates` is whatever the backend keeps of the Newton-Schulz iterates for its backward; an empty
tensor means "recompute them from A". dweight is an empty tensor when weight is None.

This module registers the fake (meta) kernels and the autograd formula for such a pair, so that
every backend is traced by torch.compile and checked by opcheck in the same way.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch

IteratesShape = Callable[[int, int, int], tuple[int, ...]]


def register_pool_op(
    forward_op,
    backward_op,
    iterates_shape: Union[IteratesShape, Mapping[str, IteratesShape]],
) -> None:
    """Registers fake kernels for both ops and the autograd formula of the forward op.

    iterates_shape(B, C, iters) is the shape of the backend's kept iterates (save_iterates=True); a
    backend whose device kernels keep different state gives one such function per device type
    (e.g. {"cpu": ..., "cuda": ...}).
    """

    def _iterates_shape(x, iters):
        b, c, _ = x.shape
        shape_of = iterates_shape
        if isinstance(iterates_shape, Mapping):
            if x.device.type not in iterates_shape:
                raise NotImplementedError(f"{forward_op} has no kernel for device type {x.device.type!r}")
            shape_of = iterates_shape[x.device.type]
        return shape_of(b, c, iters)

    @torch.library.register_fake(forward_op)
    def _forward_fake(x, weight, iters, eps, lower, save_iterates):
        b, c, _ = x.shape
        out = x.new_empty(b, c * (c + 1) // 2)
        A = x.new_empty(b, c, c)
        tr = x.new_empty(b)
        iterates = x.new_empty(_iterates_shape(x, iters) if save_iterates else (0,))
        return out, A, tr, iterates

    @torch.library.register_fake(backward_op)
    def _backward_fake(grad, x, weight, out, A, tr, iterates, iters, lower):
        dweight = x.new_empty(0) if weight is None else torch.empty_like(weight)
        return torch.empty_like(x), dweight

    def setup_context(ctx, inputs, output):
        x, weight, iters, _eps, lower, _save = inputs
        out, A, tr, iterates = output
        ctx.save_for_backward(x, weight, out, A, tr, iterates)
        ctx.iters, ctx.lower = iters, lower
        ctx.mark_non_differentiable(A, tr, iterates)
        # Otherwise autograd fills a zero gradient for each auxiliary output (100s of MB for iterates).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _gA, _gtr, _giterates):
        if grad_out is None:
            return None, None, None, None, None, None
        x, weight, out, A, tr, iterates = ctx.saved_tensors
        dx, dweight = backward_op(grad_out.contiguous(), x, weight, out, A, tr, iterates, ctx.iters, ctx.lower)
        return dx, (dweight if weight is not None else None), None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
