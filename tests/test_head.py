"""CovPoolHead (threeg_kernels/head.py) and the head on other backbones (threeg_kernels/models/backbones.py):
the head equals cov_pool on the same (B, C, N) features, maps and tokens give the same result, the attention
head is ResNet-3G's fused path, timm and torchvision backbones train through it, torchvision weights load
into ResNet-3G's backbone, and timm builds the ResNet-3G models by name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import threeg_kernels
from threeg_kernels import CovPoolHead, api, models
from threeg_kernels.models import CovPoolModel, attach_head, load_backbone_weights, register_timm_models
from threeg_kernels.models.backbones import TORCHVISION_RESNET_TRUNK

from .helpers import RTOL, rel_err

# Triton runs on CPU only under its (very slow) interpreter: tests/test_triton.py covers it.
POOL_BACKENDS = [b for b in threeg_kernels.available_backends("cpu") if b != "triton"]

# The head on a backbone's features in float32, on the 'auto' backend against 'reference' (plain PyTorch under
# autograd), max |a - b| / max |b| per tensor over the logits, dL/dfeatures and every head parameter gradient.
# Measured (CPU, 2026-11-29, 'auto' = ext, the cases below): timm resnet50 3.6e-6, timm ViT-S/16 3.9e-6,
# torchvision resnet50 2.0e-6. The tolerance is that of tests/test_models.py's fused-head comparison.
BACKBONE_RTOL = 1e-4


def grads_of(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, x, grad):
    """(output, {parameter: gradient}, dL/dx) of one forward and backward with a given upstream gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), grads_of(model), x.grad


def worst(errors: dict) -> tuple:
    name = max(errors, key=errors.get)
    return name, errors[name]


# --- the head against cov_pool -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("input_format", ["NCHW", "NLC"])
def test_head_equals_cov_pool(backend, input_format):
    """Without reduction or attention, the head is cov_pool of the features read as (B, C, N): output and dL/dx."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 12, 3, 5
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    head = CovPoolHead(c, reduce_dim=None, input_format=input_format, backend=backend, iters=3)
    assert head.output_dim == c * (c + 1) // 2 and not list(head.parameters())
    inputs = x if input_format == "NCHW" else x.flatten(2).transpose(1, 2).contiguous()  # tokens (B, N, C)
    grad = torch.randn(b, head.output_dim, generator=gen, dtype=dtype)

    got, _, dx = run(head, inputs, grad)
    x3 = x.reshape(b, c, h * w).detach().requires_grad_()
    want = threeg_kernels.cov_pool(x3, backend=backend, iters=3)
    want.backward(grad)
    want_dx = x3.grad.reshape(b, c, h, w)
    if input_format == "NLC":
        want_dx = want_dx.flatten(2).transpose(1, 2)
    assert rel_err(got, want) <= RTOL[dtype]
    assert rel_err(dx, want_dx) <= RTOL[dtype]


@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_maps_and_tokens_agree(backend):
    """With reduction and two re-weighting blocks, a map (B, C, H, W) and its tokens (B, H W, C) give the same
    output and the same gradients (input and every parameter), in train mode (BatchNorm on batch statistics)."""
    dtype = torch.float64
    torch.manual_seed(0)
    maps = CovPoolHead(24, 7, reduce_dim=16, attention=2, backend=backend).to(dtype)
    tokens = CovPoolHead(24, 7, reduce_dim=16, attention=2, backend=backend, input_format="NLC").to(dtype)
    tokens.load_state_dict(maps.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 24, 4, 5, generator=gen, dtype=dtype)
    grad = torch.randn(3, 7, generator=gen, dtype=dtype)
    out_m, grads_m, dx_m = run(maps.train(), x, grad)
    out_t, grads_t, dx_t = run(tokens.train(), x.flatten(2).transpose(1, 2).contiguous(), grad)
    assert rel_err(out_t, out_m) <= 1e-10
    assert rel_err(dx_t, dx_m.flatten(2).transpose(1, 2)) <= 1e-10
    assert grads_t.keys() == grads_m.keys() == {n for n, _ in maps.named_parameters()}
    name, err = worst({n: rel_err(grads_t[n], grads_m[n]) for n in grads_m})
    assert err <= 1e-10, f"{name}: {err:.2e}"


def test_tokens_reach_cov_pool_uncopied(monkeypatch):
    """NLC without reduction: cov_pool gets a strided view of the tokens' own memory, not a copy."""
    seen = []

    def spy(x, weight=None, **kw):
        seen.append((x.untyped_storage().data_ptr(), x.is_contiguous(), tuple(x.shape)))
        return threeg_kernels.cov_pool(x, weight, **kw)

    monkeypatch.setattr(api, "cov_pool", spy)  # what CovPool.forward calls
    tokens = torch.randn(2, 9, 6)
    CovPoolHead(6, reduce_dim=None, input_format="NLC")(tokens)
    assert seen == [(tokens.untyped_storage().data_ptr(), False, (2, 6, 9, 1))]


def test_head_outputs_and_keys():
    head = CovPoolHead(32, 5, reduce_dim=8, attention=True, dropout=0.5)
    assert head.output_dim == 36 and head.fc.in_features == 36 and len(head.attention) == 1
    keys = head.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"reduce", "attention", "fc"}
    assert "reduce.conv.weight" in keys and "attention.0.atmap3.weight" in keys
    x = torch.randn(2, 32, 3, 3)
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.fc(head.forward_features(x)))  # eval: dropout is the identity
    vector = CovPoolHead(32, reduce_dim=None)  # no classifier: forward is the pooled vector
    assert vector.fc is None and vector(x).shape == (2, 32 * 33 // 2)
    assert "output_dim=528" in repr(vector)


def test_head_argument_errors():
    cases = [
        (TypeError, "in_channels", dict(in_channels=2.0)),
        (ValueError, "in_channels", dict(in_channels=0)),
        (ValueError, "num_classes", dict(in_channels=8, num_classes=0)),
        (TypeError, "num_classes", dict(in_channels=8, num_classes="10")),
        (ValueError, "reduce_dim", dict(in_channels=8, reduce_dim=0)),
        (TypeError, "attention", dict(in_channels=8, attention="yes")),
        (ValueError, "attention", dict(in_channels=8, attention=-1)),
        (ValueError, "attention.*reduce_dim=2", dict(in_channels=8, reduce_dim=2, attention=True)),
        (ValueError, "dropout", dict(in_channels=8, dropout=1.0)),
        (TypeError, "dropout", dict(in_channels=8, dropout=None)),
        (ValueError, "input_format.*'NHWC'", dict(in_channels=8, input_format="NHWC")),
        (ValueError, "iters", dict(in_channels=8, iters=0)),
        (ValueError, "order", dict(in_channels=8, order="upper")),
        (ValueError, "backend.*'gpu'", dict(in_channels=8, backend="gpu")),
        (ValueError, "precision", dict(in_channels=8, precision="fp8")),
        (TypeError, "keep_iterates", dict(in_channels=8, keep_iterates=1)),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            CovPoolHead(**kwargs)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\).*\(2, 7, 3, 3\)"):
        CovPoolHead(8)(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, N, 8\).*\(2, 8, 3, 3\)"):
        CovPoolHead(8, input_format="NLC")(torch.randn(2, 8, 3, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        CovPoolHead(8)([1.0])


# --- the attention head is ResNet-3G's fused path ------------------------------------------------------------

RESNET3G_TO_HEAD = {
    "layer_reduce.": "reduce.conv.",
    "layer_reduce_bn.": "reduce.bn.",
    "AtMp1.": "attention.0.",
    "AtMp2.": "attention.1.",
    "AtMp3.": "attention.2.",
    "fc.": "fc.",
}


def head_state_of(model: models.ResNet3G) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in RESNET3G_TO_HEAD if key.startswith(p)), None)
        if prefix is not None:
            state[RESNET3G_TO_HEAD[prefix] + key[len(prefix) :]] = value
    return state


def test_attention_head_is_the_fused_path():
    """CovPoolHead(512, reduce_dim=256, attention=3) with ResNet-18-3G's head weights, on its layer4 map, gives
    its logits and its head's gradients (train mode, float64)."""
    dtype = torch.float64
    torch.manual_seed(0)
    model = models.resnet18_3g(num_classes=10).to(dtype).train()
    head = CovPoolHead(512, 10, reduce_dim=256, attention=3).to(dtype).train()
    head.load_state_dict(head_state_of(model))
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=dtype)  # layer4 at stride 1: 2 x 2
    grad = torch.randn(2, 10, generator=gen, dtype=dtype)

    logits_model, grads_model, _ = run(model, images, grad)
    with torch.no_grad():
        trunk = images
        for name in TORCHVISION_RESNET_TRUNK:
            trunk = getattr(model, name)(trunk)
    logits_head, grads_head, _ = run(head, trunk, grad)
    assert rel_err(logits_head, logits_model) <= 1e-12
    mapped = {RESNET3G_TO_HEAD[p] + k[len(p) :]: k for k in grads_model for p in RESNET3G_TO_HEAD if k.startswith(p)}
    assert set(mapped) == set(grads_head)
    name, err = worst({n: rel_err(grads_head[n], grads_model[k]) for n, k in mapped.items()})
    assert err <= 1e-12, f"{name}: {err:.2e}"


# --- backbones ------------------------------------------------------------------------------------------------


def check_head_gradient(model: CovPoolModel, images: torch.Tensor, num_classes: int) -> float:
    """One training step's forward and backward through backbone and head (train mode, the head's backend),
    then the head alone on the same features on 'reference' (plain PyTorch under autograd): the logits, the
    gradient reaching the backbone (dL/dfeatures, from which autograd computes every backbone gradient) and
    every head parameter's gradient agree. Returns the worst relative error."""
    grad = torch.randn(images.shape[0], num_classes, generator=torch.Generator().manual_seed(2))
    model.train().zero_grad(set_to_none=True)
    features = model.forward_backbone(images)
    features.retain_grad()
    logits = model.head(features)
    logits.backward(grad)
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used (DDP)

    reference = copy.deepcopy(model.head)
    reference.pool.backend = "reference"
    want = run(reference, features, grad)
    errors = {"logits": rel_err(logits, want[0]), "dL/dfeatures": rel_err(features.grad, want[2])}
    errors.update({n: rel_err(p.grad, want[1][n]) for n, p in model.head.named_parameters()})
    assert want[1].keys() == {n for n, _ in model.head.named_parameters()}
    name, err = worst(errors)
    assert err <= BACKBONE_RTOL, f"{name}: {err:.2e}"
    return err


def test_timm_resnet50():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = attach_head(timm.create_model("resnet50", pretrained=False), 10)
    assert model.kind == "timm" and model.head.in_channels == 2048 and model.head.input_format == "NCHW"
    assert isinstance(model.backbone.fc, nn.Identity)  # reset_classifier(0): no unused parameters
    images = torch.randn(2, 3, 96, 96)
    assert model.forward_backbone(images).shape == (2, 2048, 3, 3)
    print(f"timm resnet50 + head: worst rel err vs reference {check_head_gradient(model, images, 10):.1e}")


def test_timm_vit_drops_prefix_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64)
    model = attach_head(vit, 10, reduce_dim=64, attention=True)
    assert model.kind == "timm" and model.num_prefix_tokens == 1 and model.head.input_format == "NLC"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.forward_features(images)
        assert tokens.shape == (2, 17, 384)
        assert torch.equal(model.forward_backbone(images), tokens[:, 1:])
    print(f"timm ViT-S/16 + head: worst rel err vs reference {check_head_gradient(model, images, 10):.1e}")


def test_torchvision_resnet50():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = attach_head(torchvision.models.resnet50(weights=None), 10, reduce_dim=128)
    assert model.kind == "resnet" and model.head.in_channels == 2048 and isinstance(model.backbone.fc, nn.Identity)
    images = torch.randn(2, 3, 96, 96)
    assert model.forward_backbone(images).shape == (2, 2048, 3, 3)
    print(f"torchvision resnet50 + head: worst rel err vs reference {check_head_gradient(model, images, 10):.1e}")


class _NHWCBackbone(nn.Module):
    """timm's interface with (B, H, W, C) features, as timm's Swin models give them."""

    num_features, output_fmt = 8, "NHWC"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward_features(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


def test_other_backbones():
    nhwc = attach_head(_NHWCBackbone(), 4, reduce_dim=None)
    assert nhwc.kind == "timm" and nhwc.nhwc and nhwc.head.input_format == "NLC"
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert nhwc.forward_backbone(images).shape == (2, 16, 8)
        torch.testing.assert_close(
            nhwc.forward_features(images), threeg_kernels.cov_pool(nhwc.backbone.conv(images)), rtol=1e-5, atol=1e-6
        )

    plain = attach_head(nn.Conv2d(3, 8, 3), None, in_channels=8, reduce_dim=None)  # any module returning a map
    assert plain.kind == "module" and plain(images).shape == (2, 36) and plain.num_features == 36

    tokens = attach_head(nn.Linear(5, 8), 3, in_channels=8, input_format="NLC", num_prefix_tokens=2)
    assert tokens(torch.randn(2, 6, 5)).shape == (2, 3)

    with pytest.raises(TypeError, match="in_channels"):
        attach_head(nn.Conv2d(3, 8, 3), 4)
    with pytest.raises(TypeError, match="backbone must be an nn.Module"):
        attach_head(lambda x: x, 4, in_channels=8)
    with pytest.raises(ValueError, match="num_prefix_tokens=1 needs tokens"):
        attach_head(nn.Conv2d(3, 8, 3), 4, in_channels=8, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        attach_head(nn.Linear(5, 8), 4, in_channels=8, input_format="NLC", num_prefix_tokens=-1)


# --- torchvision ImageNet weights into ResNet-3G's backbone ------------------------------------------------------


def test_torchvision_weights_into_resnet50_3g(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        source.train()(torch.randn(2, 3, 32, 32))  # BatchNorm statistics that differ from the defaults
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(source.state_dict(), path)

    model = models.resnet50_3g(num_classes=200)
    before = copy.deepcopy(model.state_dict())
    report = load_backbone_weights(model, path)
    tv = source.state_dict()
    assert report.ignored == ["fc.weight", "fc.bias"] and not report.defaulted
    assert report.loaded == [k for k in tv if not k.startswith("fc.")]  # key for key, every backbone key
    head_modules = {k.split(".")[0] for k in report.new}
    assert head_modules == {"layer_reduce", "layer_reduce_bn", "AtMp1", "AtMp2", "AtMp3", "fc"}
    assert set(report.loaded) | set(report.new) == set(model.state_dict())
    state = model.state_dict()
    assert all(torch.equal(state[k], tv[k]) for k in report.loaded)
    assert all(torch.equal(state[k], before[k]) for k in report.new)
    assert "loaded 318 backbone tensors" in str(report) and "AtMp1" in str(report)

    with torch.device("meta"), pytest.raises(models.CheckpointMismatchError, match="another depth"):
        load_backbone_weights(models.resnet101_3g(num_classes=2), path)  # shapes suffice: nothing is copied
    with pytest.raises(models.CheckpointMismatchError, match="missing"):
        load_backbone_weights(model, {k: v for k, v in tv.items() if not k.startswith("layer4.2.")})

    built = models.create_model("resnet50_3g", num_classes=200, backbone_weights=path)
    assert torch.equal(built.layer4[2].conv3.weight, source.layer4[2].conv3.weight)

    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(tv, tmp_path / "resnet50_imagenet.safetensors")
    with torch.no_grad():
        built.conv1.weight.zero_()
    assert load_backbone_weights(built, tmp_path / "resnet50_imagenet.safetensors").loaded == report.loaded
    assert torch.equal(built.conv1.weight, source.conv1.weight)


# --- timm knows the ResNet-3G models -------------------------------------------------------------------------------


def test_timm_registration():
    timm = pytest.importorskip("timm")
    assert register_timm_models() == []  # importing threeg_kernels.models registered every name already
    assert set(models.list_models()) <= set(timm.list_models("resnet*_3g*"))
    with torch.device("meta"):
        model = timm.create_model("resnet50_3g_365", num_classes=12)
    assert isinstance(model, models.ResNet3G) and model.fc.out_features == 12
    with pytest.raises(ValueError, match="pretrained=True.*load_checkpoint"):
        timm.create_model("resnet18_3g", pretrained=True)
    with pytest.raises(TypeError, match="drop_rate"):
        timm.create_model("resnet18_3g", drop_rate=0.1)
