"""Exporting models that use cov_pool: torch.export keeps the pooling as one op, ONNX gets its math.

torch.export.export(model, args) records cov_pool as a single node, the registered op of the backend that
'auto' (or the `backend` asked for) runs: threeg::cov_pool_<backend>_forward, in a wrap_with_autocast subgraph
until run_decompositions() (tests/test_export.py checks it). An ExportedProgram therefore needs threeg_kernels
imported where it runs.

ONNX has no such op. `onnx_translation_table()` maps every registered threeg::cov_pool_<backend>_forward
op to `cov_pool_onnx` (its A output shaped as the op declares it), an ONNX Script function that writes the
forward of docs/math.md (1)-(8) with standard ONNX operators (MatMul, ReduceMean, ReduceSum, Gather, ...),
the K Newton-Schulz steps unrolled. `export_onnx(model, args, path)` is torch.onnx.export(..., dynamo=True)
with that table; for a table of one's own, pass `custom_translation_table=onnx_translation_table()` to
torch.onnx.export.

onnxscript (and onnx) are imported when a table is built, not with threeg_kernels. docs/deploy.md has
the commands and the measured agreement with eager PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from .dispatch import BACKENDS


def _registered_forward_ops() -> list:
    """The OpOverloads threeg::cov_pool_<backend>_forward registered in this process (the backends that
    loaded; 'reference' has none: its plain torch ops export as they are)."""
    ops = []
    for name in BACKENDS:
        try:
            ops.append(getattr(torch.ops.threeg, f"cov_pool_{name}_forward").default)
        except (AttributeError, RuntimeError):
            continue  # that backend did not load here (dispatch says why)
    return ops


def cov_pool_onnx(x, weight, iters: int, eps: float, order: str, keep_iterates: bool, precision: str):
    """ONNX Script translation of threeg::cov_pool_<backend>_forward, traced by torch.onnx's exporter.

    x (B, C, N) float32/float64 with a static C, weight (B, N) or None. Returns the op's four outputs
    (out, A, tr, iterates); inference reads `out` only, so `iterates` is an empty tensor whatever
    keep_iterates says (the exporter drops the unused outputs). `precision` is not translated: ONNX
    computes every product in the input's dtype (the 'ieee' mode).
    """
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset18 as op

    c = x.shape[1]
    if not isinstance(c, int):
        raise ValueError(f"cov_pool's ONNX translation needs a static channel count C; got x of shape {x.shape}")
    dtype = x.dtype.numpy()

    def const(array):
        return op.Constant(value=ir.tensor(np.asarray(array, dtype=dtype)))

    eye = const(np.eye(c))
    # (1): Sigma = Xc Xc^T / N + eps I, Xc the centred weighted features
    xw = x if weight is None else op.Mul(x, op.Unsqueeze(weight, [1]))
    xc = op.Sub(xw, op.ReduceMean(xw, [2], keepdims=1))
    n = op.CastLike(op.Shape(x, start=2, end=3), x)
    sigma = op.Add(op.Div(op.MatMul(xc, op.Transpose(xc, perm=[0, 2, 1])), n), const(eps * np.eye(c)))
    # (2): tr = trace(Sigma), A = Sigma / tr
    tr = op.ReduceSum(op.Mul(sigma, eye), [1, 2], keepdims=0)
    A = op.Div(sigma, op.Unsqueeze(tr, [1, 2]))
    # (3), K steps; the last Z is never read
    eye3, half = const(3.0 * np.eye(c)), const(0.5)
    Y, Z = A, eye
    for k in range(iters):
        T = op.Mul(op.Sub(eye3, op.MatMul(Z, Y)), half)
        Y = op.MatMul(Y, T)
        if k + 1 < iters:
            Z = op.MatMul(T, Z)
    # (6)-(8): S = sqrt(tr) Y_K, its triangle in `order` gathered from the row-major C x C matrix
    S = op.Mul(Y, op.Unsqueeze(op.Sqrt(tr), [1, 2]))
    rows, cols = np.tril_indices(c) if order == "3g" else np.triu_indices(c)
    index = op.Constant(value=ir.tensor((rows * c + cols).astype(np.int64)))
    out = op.Gather(op.Reshape(S, op.Constant(value_ints=[-1, c * c])), index, axis=1)
    return out, A, tr, const(np.zeros(0))


def _translation(a_shape):
    """cov_pool_onnx with A shaped as the op declares it (a_shape(B, C, N)): empty where the op's kernels form no
    A (the ext backend's Gram route on CPU), so that the model's recorded shape of that output and the one ONNX
    infers agree (onnx.checker's full check). With N not static, A as cov_pool_onnx forms it."""

    def cov_pool_onnx_as_registered(x, weight, iters: int, eps: float, order: str, keep_iterates: bool, precision: str):
        out, A, tr, iterates = cov_pool_onnx(x, weight, iters, eps, order, keep_iterates, precision)
        c, n = x.shape[1], x.shape[2]
        if isinstance(n, int) and isinstance(c, int) and a_shape(1, c, n) == (0,):
            import numpy as np
            from onnxscript import ir
            from onnxscript import opset18 as op

            A = op.Constant(value=ir.tensor(np.zeros(0, dtype=x.dtype.numpy())))
        return out, A, tr, iterates

    return cov_pool_onnx_as_registered


def onnx_translation_table(device: Union[str, torch.device] = "cpu") -> dict:
    """{threeg::cov_pool_<backend>_forward OpOverload: its translation (cov_pool_onnx)} for every backend op
    registered here, for torch.onnx.export(..., dynamo=True, custom_translation_table=...), exporting with inputs
    on `device` (what the ops' output shapes depend on). Needs onnxscript."""
    try:
        import onnxscript  # noqa: F401 - only to fail here, with how to install it
    except ImportError as exc:
        raise ImportError(
            "exporting cov_pool to ONNX needs onnxscript and onnx: pip install 'threeg-kernels[export]'"
        ) from exc
    from ._registration import A_SHAPES, full_a_shape

    device_type = torch.device(device).type
    table = {}
    for forward_op in _registered_forward_ops():
        a_shape = A_SHAPES.get(forward_op, full_a_shape)
        if isinstance(a_shape, Mapping):
            a_shape = a_shape.get(device_type, full_a_shape)
        table[forward_op] = _translation(a_shape)
    return table


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    f: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
):
    """torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=onnx_translation_table(), **kwargs)
    -> the ONNXProgram (written to `f` when given). A custom_translation_table in kwargs is merged over ours."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    table = onnx_translation_table(tensors[0].device if tensors else "cpu")
    table.update(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
