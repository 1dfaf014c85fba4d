"""The "triton" backend: the Triton kernels of threeg_kernels/ops as registered torch ops.

One op pair per matmul precision, each following the contract of threeg_kernels/_registration.py:
    threeg::cov_pool_triton_forward / threeg::cov_pool_triton_backward            precision="ieee"
    threeg::cov_pool_triton_tf32x3_forward / ..._tf32x3_backward                  precision="tf32x3"
    threeg::cov_pool_triton_tf32_forward / ..._tf32_backward                      precision="tf32"
    threeg::cov_pool_triton_bf16_forward / ..._bf16_backward                      precision="bf16"
The kernels run inside a torch.library.custom_op (not triton_op + wrap_triton, whose fake-tensor
tracing fails on CPU): fakes and autograd come from `register_pool_op`, so opcheck and
torch.compile(fullgraph=True) treat the op as one opaque node.

The op bodies run threeg_kernels/ops/head.py (forward: 2K launches; backward: 2K + 2) with the
launch settings of ops/tuning.py: timed per shape at the first call on a GPU (THREEG_TRITON_AUTOTUNE=0
turns that off), one fixed setting under the interpreter. Math: the docstrings of threeg_kernels/ops/*.py.

Keep vs recompute: the forward keeps (Y_{k-1}, Z_{k-1}, T_k), k = 2..K (SAVE_ITERATES below): they
are written by the forward anyway, so keeping costs memory (3(K-1) C^2 values a sample: 805 MB at
B = 256, C = 256, K = 5 in fp32) and no work, while recomputing adds 3K - 4 = 11 products to the
12 + 30 of forward+backward (+26% FLOPs, K = 5). Not measured on a GPU yet (docs/triton.md).

Devices: CUDA with a working Triton driver; CPU only under TRITON_INTERPRET=1 (set before this module
is imported), which is slow and meant for tests. float64 runs with tl.dot on float64 (exact on the
interpreter; on GPUs it is Triton's FMA/DMMA path, unmeasured).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton  # noqa: F401 - a missing Triton must fail this import; dispatch records the reason

from .._registration import register_pool_op
from ..ops import tuning
from ..ops._tiles import INTERPRET, PRECISIONS
from ..ops.head import head_backward, head_forward
from . import Loaded

# The default of save_iterates (see the module docstring).
SAVE_ITERATES = True


def config_for(x, weight, iters, precision):
    """The launch settings of one call: ops/tuning.py (timed per shape on a GPU, fixed under the interpreter).
    A module attribute so that tests can substitute their own."""
    return tuning.config_for(x, weight, iters, precision)


def _iterates_shape(b: int, c: int, iters: int) -> tuple[int, ...]:
    return (iters - 1, 3, b, c, c)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _register(precision: str):
    suffix = "" if precision == "ieee" else f"_{precision}"

    @torch.library.custom_op(f"threeg::cov_pool_triton{suffix}_forward", mutates_args=())
    def forward(
        x: torch.Tensor, weight: Optional[torch.Tensor], iters: int, eps: float, lower: bool, save_iterates: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with _on_device(x):
            cfg = config_for(x, weight, iters, precision)
            return head_forward(x, weight, iters, eps, lower, save_iterates, cfg)

    @torch.library.custom_op(f"threeg::cov_pool_triton{suffix}_backward", mutates_args=())
    def backward(
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        out: torch.Tensor,
        A: torch.Tensor,
        tr: torch.Tensor,
        iterates: torch.Tensor,
        iters: int,
        lower: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with _on_device(x):
            cfg = config_for(x, weight, iters, precision)
            return head_backward(grad, x, weight, out, A, tr, iterates, iters, lower, cfg)

    register_pool_op(forward, backward, _iterates_shape)
    return forward


FORWARD = {precision: _register(precision) for precision in PRECISIONS}


def pool(x, weight, iters, eps, order, precision="ieee"):
    return FORWARD[precision](x, weight, iters, eps, order == "3g", SAVE_ITERATES)[0]


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


LOADED = Loaded(pool=pool, unavailable_on=unavailable_on, precisions=PRECISIONS)
