"""The op contract of threeg_kernels/_registration.py: every backend registers one op pair, and each op has
exactly the schema declared there. opcheck, torch.compile and keep-or-recompute of each pair are in
tests/test_backends.py."""

from __future__ import annotations

import pytest
import torch

from threeg_kernels import _registration, dispatch

from .helpers import OP_BACKENDS, pool_ops


def _signature(schema):
    """Argument names and types, return types (custom_op keeps no return names)."""
    return [(a.name, str(a.type)) for a in schema.arguments], [str(r.type) for r in schema.returns]


def test_declared_schemas():
    """The contract itself: changing it changes every backend, the C++ declaration in csrc/ops.cpp included."""
    assert _registration.FORWARD_SCHEMA == (
        "(Tensor x, Tensor? weight, int iters, float eps, str order, bool keep_iterates, str precision)"
        " -> (Tensor out, Tensor A, Tensor tr, Tensor iterates)"
    )
    assert _registration.BACKWARD_SCHEMA == (
        "(Tensor grad, Tensor x, Tensor? weight, Tensor out, Tensor A, Tensor tr, Tensor iterates, int iters,"
        " str order, str precision) -> (Tensor dx, Tensor dweight)"
    )


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_pair_has_the_declared_schema(backend):
    try:
        ops = pool_ops(backend)
    except AttributeError:
        pytest.skip(f"backend {backend!r} registered no ops here: {dispatch.unavailable_reason(backend, 'cpu')}")
    for op, declared in zip(ops, (_registration.FORWARD_SCHEMA, _registration.BACKWARD_SCHEMA)):
        assert op.overloads() == ["default"], op.overloads()  # one schema, no variants
        have = op.default._schema
        want = torch._C.parse_schema(f"{have.name}{declared}")
        assert _signature(have) == _signature(want), f"{have}\n!= {want}"
        _registration.check_schema(op, declared)


def test_one_op_pair_per_backend():
    """No op per variant (e.g. per precision mode): the threeg namespace holds exactly the backends' pairs."""
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("threeg::")}
    loaded = [b for b in OP_BACKENDS if hasattr(torch.ops.threeg, f"cov_pool_{b}_forward")]
    assert "torch" in loaded
    assert registered == {f"threeg::cov_pool_{b}_{d}" for b in loaded for d in ("forward", "backward")}


@pytest.mark.parametrize(
    "schema",
    [
        "(Tensor x, Tensor? weight, int iters, float eps, bool lower, bool save_iterates)"
        " -> (Tensor out, Tensor A, Tensor tr, Tensor iterates)",
        "(Tensor x, Tensor? weight, int iters, float eps, str triangle, bool keep_iterates, str precision)"
        " -> (Tensor out, Tensor A, Tensor tr, Tensor iterates)",
        "(Tensor x, Tensor? weight, int iters, float eps, str order, bool keep_iterates, str precision)"
        " -> (Tensor out, Tensor A, Tensor tr)",
    ],
    ids=["former-signature", "renamed-argument", "missing-return"],
)
def test_check_schema_names_a_drifted_op(schema):
    with torch.library._scoped_library("threeg_schema_test", "FRAGMENT") as lib:
        lib.define(f"drifted{schema}")
        op = torch.ops.threeg_schema_test.drifted
        with pytest.raises(TypeError, match=r"threeg_schema_test::drifted is registered as"):
            _registration.check_schema(op, _registration.FORWARD_SCHEMA)
        _registration.check_schema(op, schema)  # and it is its own schema
