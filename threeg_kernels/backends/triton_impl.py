"""The "triton" backend: the Triton kernels of threeg_kernels/triton_kernels as one registered op pair,
threeg::cov_pool_triton_forward / threeg::cov_pool_triton_backward, following the contract of
threeg_kernels/_registration.py; `precision` ('ieee', 'tf32x3', 'tf32', 'bf16') is an argument of the op
and reaches the kernels as a compile-time constant. The kernels run inside a torch.library.custom_op (not
triton_op + wrap_triton, whose fake-tensor tracing fails on CPU): fakes and autograd come from
`register_pool_op`, so opcheck and torch.compile(fullgraph=True) treat the op as one opaque node.

The op bodies run threeg_kernels/triton_kernels/head.py (forward: 2K launches; backward: 2K + 2) with the
launch settings of triton_kernels/tuning.py: timed per shape at the first call on a GPU
(THREEG_TRITON_AUTOTUNE=0 turns that off), one fixed setting under the interpreter.

Keep vs recompute (docs/math.md (21)): the forward writes (Y_{k-1}, Z_{k-1}, T_k), k = 2..K, anyway, so
keeping them costs memory (3(K-1) C^2 values a sample: 805 MB at B = 256, C = 256, K = 5 in fp32) and no
work, while recomputing adds (3K - 5) F + H (F = 2 C^3, H = C^2 (C + 1) a sample; docs/math.md, section 5):
90.2 GFLOP on the 302.0 of forward+backward at B = 256, C = 256, N = 196, K = 5, about +30%. Keeping is the
default by that count; it has not been timed on a GPU.

Devices: CUDA with a working Triton driver; CPU only under TRITON_INTERPRET=1 (set before this module
is imported), which is slow and meant for tests. float64 runs with tl.dot on float64 (exact on the
interpreter; on GPUs it is Triton's FMA/DMMA path, unmeasured).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from .._registration import (
    BACKWARD_SCHEMA,
    FORWARD_SCHEMA,
    backward_outputs,
    check_op_args,
    forward_outputs,
    register_pool_op,
)
from ..triton_kernels import tuning
from ..triton_kernels._tiles import INTERPRET, PRECISIONS
from ..triton_kernels.head import head_backward, head_forward
from . import Loaded


def config_for(x, weight, iters, precision):
    """The launch settings of one call: triton_kernels/tuning.py (timed per shape on a GPU, fixed under the
    interpreter). A module attribute so that tests can substitute their own."""
    return tuning.config_for(x, weight, iters, precision)


def _iterates_shape(b: int, c: int, n: int, iters: int) -> tuple[int, ...]:
    return (iters - 1, 3, b, c, c)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("threeg::cov_pool_triton_forward", mutates_args=(), schema=FORWARD_SCHEMA)
def cov_pool_triton_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    iters: int,
    eps: float,
    order: str,
    keep_iterates: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_op_args("threeg::cov_pool_triton_forward", iters, order, precision, PRECISIONS)
    if x.shape[0] == 0:  # nothing to compute, nor to tune launch settings for
        return forward_outputs(x, iters, keep_iterates, _iterates_shape)
    with _on_device(x):
        cfg = config_for(x, weight, iters, precision)
        return head_forward(x, weight, iters, eps, order == "3g", keep_iterates, cfg)


@torch.library.custom_op("threeg::cov_pool_triton_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def cov_pool_triton_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    out: torch.Tensor,
    A: torch.Tensor,
    tr: torch.Tensor,
    iterates: torch.Tensor,
    iters: int,
    order: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_op_args("threeg::cov_pool_triton_backward", iters, order, precision, PRECISIONS)
    if x.shape[0] == 0:
        return backward_outputs(x, weight)
    with _on_device(x):
        cfg = config_for(x, weight, iters, precision)
        return head_backward(grad, x, weight, out, A, tr, iterates, iters, order == "3g", cfg)


_pool_op = register_pool_op(cov_pool_triton_forward, cov_pool_triton_backward, _iterates_shape)


def pool(x, weight, iters, eps, order, precision, keep_iterates):
    return _pool_op(x, weight, iters, eps, order, keep_iterates, precision)


_NOT_ON_CPU = "Triton kernels run on CUDA devices; on CPU only under TRITON_INTERPRET=1 (slow, for tests)"


# Under torch.compile, dynamo calls this eagerly and bakes the result in as a constant instead of
# tracing into Triton's runtime (which would break a fullgraph trace on CUDA).
@torch.compiler.assume_constant_result
def _cuda_driver_problem() -> Optional[str]:
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # noqa: BLE001 - any failure means no usable driver; say which
        return f"Triton has no working CUDA driver ({type(exc).__name__}: {exc})"
    return None


def unavailable_on(device: torch.device) -> Optional[str]:
    if device.type == "cpu":
        return None if INTERPRET else _NOT_ON_CPU
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None if INTERPRET else _cuda_driver_problem()
    return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1); got device type {device.type!r}"


LOADED = Loaded(pool=pool, unavailable_on=unavailable_on, precisions=PRECISIONS, keep_iterates=True)
