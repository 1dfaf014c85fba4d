"""Export (threeg_kernels/export.py): torch.export keeps cov_pool as one op node; ONNX, through the ONNX Script
translation of that op, runs in onnxruntime and agrees with eager PyTorch (docs/deploy.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import threeg_kernels
from threeg_kernels import CovPoolHead, models

from .helpers import OP_BACKENDS, RTOL, rel_err

# The backends with an op to translate that run here (Triton on CPU only under its interpreter).
CPU_OP_BACKENDS = [b for b in OP_BACKENDS if b in threeg_kernels.available_backends("cpu") and b != "triton"]
AUTO_CPU = threeg_kernels.available_backends("cpu")[0]  # what backend='auto' runs on the CPU

# ONNX (onnxruntime, CPU) against eager PyTorch (backend 'auto'), max |a - b| / max |b| of the logits, float32.
# Measured (CPU, 2026-11-29): the small head model <= 1e-6, resnet18_3g and ViT-S/16 + head ~3e-6.
ONNX_RTOL = 1e-4


def small_model(**head_kwargs) -> nn.Module:
    torch.manual_seed(0)
    head = CovPoolHead(16, 5, reduce_dim=8, attention=1, **head_kwargs)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), head).eval()


def batch_dim(n_inputs: int = 1) -> tuple:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in range(n_inputs))


def pool_nodes(ep: torch.export.ExportedProgram) -> list:
    """The nodes calling threeg:: ops anywhere in the program (its submodules included)."""
    found = []
    for gm in ep.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                name = getattr(node.target, "name", lambda: "")()
                if node.op == "call_function" and name.startswith("threeg::"):
                    found.append(node)
    return found


def pool_op_names(ep: torch.export.ExportedProgram) -> list[str]:
    return [node.target.name() for node in pool_nodes(ep)]


def run_onnx(program, *inputs: torch.Tensor):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


# --- torch.export -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", *CPU_OP_BACKENDS])
def test_torch_export_keeps_one_op(backend):
    model = small_model(backend=backend)
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(model, (x,), dynamic_shapes=batch_dim())
    name = AUTO_CPU if backend == "auto" else backend
    assert pool_op_names(ep) == [f"threeg::cov_pool_{name}_forward"]
    assert pool_op_names(ep.run_decompositions()) == [f"threeg::cov_pool_{name}_forward"]
    x3 = torch.randn(3, 3, 6, 6)  # another batch size: the batch is dynamic
    with torch.no_grad():
        assert rel_err(ep.module()(x3), model(x3)) <= 1e-6
        # Exported without grad, the op keeps nothing for a backward (its keep_iterates argument, 6th).
        (node,) = pool_nodes(torch.export.export(model, (x,)))
        assert node.args[5] is False
    assert pool_nodes(ep)[0].args[5] is True  # exported with grad enabled: the backend's default, keep


# --- ONNX ---------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:# The axis name")  # x and weight share their batch Dim, as they must
@pytest.mark.parametrize(
    "backend, order, weighted",
    [(b, "3g", True) for b in CPU_OP_BACKENDS] + [(CPU_OP_BACKENDS[0], "mpncov", False)],
)
def test_onnx_translation_is_the_math(backend, order, weighted):
    """cov_pool_onnx in float64 equals the op it replaces to float64 rounding, with a dynamic batch."""
    pytest.importorskip("onnxscript")
    from threeg_kernels.export import export_onnx

    class Pool(nn.Module):
        def forward(self, x, weight=None):
            return threeg_kernels.cov_pool(x, weight, iters=4, order=order, backend=backend)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 10, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 10, generator=gen, dtype=torch.float64) if weighted else None
    inputs = (x, w) if weighted else (x,)
    program = export_onnx(Pool().eval(), inputs, dynamic_shapes=batch_dim(len(inputs)))
    x3, w3 = torch.randn(3, 7, 10, dtype=torch.float64), torch.rand(3, 10, dtype=torch.float64)
    inputs3 = (x3, w3) if weighted else (x3,)
    assert rel_err(run_onnx(program, *inputs3), Pool()(*inputs3)) <= RTOL[torch.float64]


@pytest.mark.parametrize("backend", CPU_OP_BACKENDS)
@pytest.mark.parametrize("c, n", [(16, 9), (8, 10)])  # N <= 13/16 C (the ext CPU kernels' Gram route), and not
def test_onnx_model_passes_the_full_check(backend, c, n):
    """Every output's recorded shape agrees with the one ONNX infers (onnx.checker's full check): the translation
    returns A as the op declares it, empty where the op forms none (the Gram route)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from threeg_kernels.export import export_onnx

    model = threeg_kernels.CovPool(backend=backend).eval()
    x = torch.randn(2, c, n)
    program = export_onnx(model, (x,))
    onnx.checker.check_model(program.model_proto, full_check=True)
    with torch.no_grad():
        assert rel_err(run_onnx(program, x), model(x)) <= ONNX_RTOL


def test_onnx_head():
    pytest.importorskip("onnxscript")
    from threeg_kernels.export import export_onnx

    model = small_model()
    program = export_onnx(model, (torch.randn(2, 3, 6, 6),), dynamic_shapes=batch_dim())
    types = {node.op_type for node in program.model_proto.graph.node}
    assert {"MatMul", "Gather", "Sigmoid"} <= types and not any("threeg" in t for t in types)
    x3 = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(run_onnx(program, x3), model(x3)) <= ONNX_RTOL


def test_onnx_needs_onnxscript(monkeypatch):
    from threeg_kernels import export

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    with pytest.raises(ImportError, match=r"onnxscript.*threeg-kernels\[export\]"):
        export.onnx_translation_table()


@pytest.mark.slow
def test_imports_stay_lazy():
    """threeg_kernels imports without timm; it, its models and its export module import without onnx or
    onnxscript."""
    code = (
        "import sys, threeg_kernels; print('timm' in sys.modules); "
        "import threeg_kernels.models, threeg_kernels.export; "
        "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "[]"]


@pytest.mark.slow
def test_onnx_reference_backend_needs_no_table():
    """backend='reference' is plain torch ops: torch.onnx exports it without the translation table."""
    pytest.importorskip("onnxscript")
    model = small_model(backend="reference")
    x = torch.randn(2, 3, 6, 6)
    program = torch.onnx.export(model, (x,), dynamo=True)
    with torch.no_grad():
        assert rel_err(run_onnx(program, x), model(x)) <= ONNX_RTOL


@pytest.mark.slow
def test_onnx_resnet18_3g():
    pytest.importorskip("onnxscript")
    from threeg_kernels.export import export_onnx

    torch.manual_seed(0)
    model = models.resnet18_3g(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    program = export_onnx(model, (x,))
    with torch.no_grad():
        err = rel_err(run_onnx(program, x), model(x))
    print(f"resnet18_3g: ONNX vs eager max rel logits difference {err:.1e}")
    assert err <= ONNX_RTOL


@pytest.mark.slow
def test_onnx_vit_with_head():
    timm = pytest.importorskip("timm")
    pytest.importorskip("onnxscript")
    from threeg_kernels.export import export_onnx

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64)
    model = models.attach_head(vit, 10, attention=True).eval()
    x = torch.randn(2, 3, 64, 64)
    program = export_onnx(model, (x,))
    with torch.no_grad():
        err = rel_err(run_onnx(program, x), model(x))
    print(f"ViT-S/16 + CovPoolHead: ONNX vs eager max rel logits difference {err:.1e}")
    assert err <= ONNX_RTOL
