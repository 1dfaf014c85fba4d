"""ResNet-3G models: released key names and shapes, fused == unfused head, checkpoint loading, features."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import threeg_kernels
from threeg_kernels import models
from threeg_kernels.models import CheckpointFormatError, CheckpointMismatchError

# Every key and shape of the released checkpoints (state dicts of the published 3G-Net files, 'module.' stripped).
KEYS_JSON = Path(__file__).resolve().parent / "data" / "state_dict_keys.json"
RELEASED = ("resnet18_3g", "resnet50_3g", "resnet101_3g", "resnet50_3g_365")
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")

# Triton runs on CPU only under its (very slow) interpreter: tests/test_triton.py covers it.
POOL_BACKENDS = [b for b in threeg_kernels.available_backends("cpu") if b != "triton"]

# Fused (AtMp3's map as cov_pool's weight, on `backend`) against unfused (a * map, then pool_backend
# 'reference', the yardstick), resnet23_3g in train mode, 2 x 3 x 64 x 64: max |a - b| / max |b| per tensor, logits and
# every parameter gradient. Measured (CPU, 2026-11-26): float32 logits 1.3e-6 / 1.5e-6 and worst
# gradient 1.5e-5 / 5.1e-6 (torch / ext backend); float64 logits <= 5.1e-15, gradients <= 2.8e-14.
# On the 'reference' backend the two paths agree bit for bit: the fusion itself changes nothing.
FUSED_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def released_keys() -> dict:
    return json.loads(KEYS_JSON.read_text())


def meta_model(name: str, **kw) -> models.ResNet3G:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return models.create_model(name, **kw)


def small_model(name="resnet18_3g", seed=0, **kw) -> models.ResNet3G:
    torch.manual_seed(seed)
    return models.create_model(name, **kw)


# --- names and shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RELEASED)
def test_state_dict_matches_released_keys(name, released_keys):
    want = released_keys[name]
    got = {k: list(v.shape) for k, v in meta_model(name).state_dict().items()}
    assert set(got) == set(want), f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, wrong


def test_parameter_count_resnet50(released_keys):
    from_json = sum(math.prod(s) for k, s in released_keys["resnet50_3g"].items() if not k.endswith(BUFFER_SUFFIXES))
    model = meta_model("resnet50_3g")
    count = sum(p.numel() for p in model.parameters())
    fc = model.fc.weight.numel() + model.fc.bias.numel()
    print(f"resnet50_3g: {count:,} parameters (json: {from_json:,}; fc: {fc:,})")
    assert count == from_json


def test_registry_and_arguments():
    names = models.list_models()
    depths = ("18", "34", "23", "50", "101", "152")
    assert names == sorted([f"resnet{d}_3g" for d in depths] + [f"resnet{d}_3g_365" for d in depths])
    assert meta_model("resnet34_3g_365").fc.out_features == 365
    assert meta_model("resnet152_3g").fc.out_features == 1000
    assert meta_model("resnet50_3g_365", num_classes=10).fc.out_features == 10

    with pytest.raises(ValueError, match="unknown model 'resnet51_3g'.*resnet50_3g"):
        models.create_model("resnet51_3g")
    with pytest.raises(TypeError, match="resnet50_3g.*pretrained"):
        models.create_model("resnet50_3g", pretrained=True)
    with pytest.raises(TypeError, match="resnet18_3g_365.*'fused'"):
        models.resnet18_3g_365(fused=False)
    with pytest.raises(ValueError, match="pool_backend"):
        models.resnet18_3g(pool_backend="cuda")
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet18_3g(num_classes=0)
    with pytest.raises(ValueError, match="iters"):
        models.resnet18_3g(iters=0)


def test_register_model(monkeypatch):
    from threeg_kernels.models import resnet_3g

    monkeypatch.setattr(resnet_3g, "_MODELS", dict(resnet_3g._MODELS))  # registered for this test only

    @models.register_model
    def resnet10_3g(*, num_classes: int = 7, **options) -> models.ResNet3G:
        return models.ResNet3G(models.BasicBlock, (1, 1, 1, 1), num_classes=num_classes, **options)

    assert "resnet10_3g" in models.list_models()
    model = meta_model("resnet10_3g", fused_head=False)
    assert model.fc.out_features == 7 and len(model.layer3) == 1 and not model.fused_head
    with pytest.raises(ValueError, match="'resnet10_3g' is already registered"):
        models.register_model(resnet10_3g)


def test_init():
    model = small_model("resnet23_3g", num_classes=10)
    conv = model.AtMp1.map1.weight  # 256 -> 256, 1x1: kaiming fan_out std = sqrt(2 / 256)
    assert abs(conv.std().item() - math.sqrt(2 / 256)) < 0.1 * math.sqrt(2 / 256)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())


# --- the fused head ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_head_matches_unfused(backend, dtype):
    unfused = small_model("resnet23_3g", num_classes=10, fused_head=False, pool_backend="reference").to(dtype)
    fused = models.resnet23_3g(num_classes=10, fused_head=True, pool_backend=backend).to(dtype)
    fused.load_state_dict(unfused.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=dtype)  # layer4 at stride 1: a 4 x 4 map, N = 16
    grad = torch.randn(2, 10, generator=gen, dtype=dtype)  # one upstream gradient for both

    def run(model):
        model.train()
        out = model(x)
        out.backward(grad)
        return out, {n: p.grad for n, p in model.named_parameters()}

    (out_u, grads_u), (out_f, grads_f) = run(unfused), run(fused)
    rtol = FUSED_RTOL[dtype]
    assert rel_err(out_f, out_u) <= rtol, rel_err(out_f, out_u)
    errs = {n: rel_err(grads_f[n], grads_u[n]) for n in grads_u}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= rtol, f"{worst}: {errs[worst]:.2e}"


def test_fused_head_passes_the_map_as_weight(monkeypatch):
    """The fused path never forms a * map: cov_pool gets AtMp3's input and its map (B, 1, H, W).
    The unfused path pools a * map without weight, on the same pool_backend (never another one)."""
    from threeg_kernels.models import resnet_3g

    calls = []

    def spy(x, weight=None, **kw):
        calls.append((tuple(x.shape), None if weight is None else tuple(weight.shape), kw["backend"]))
        return threeg_kernels.cov_pool(x, weight, **kw)

    monkeypatch.setattr(resnet_3g, "cov_pool", spy)
    model = small_model(num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        model.fused_head = False
        model(torch.randn(2, 3, 32, 32))
        model.pool_backend = "reference"
        model(torch.randn(2, 3, 32, 32))
    assert calls == [
        ((2, 256, 2, 2), (2, 1, 2, 2), "auto"),
        ((2, 256, 2, 2), None, "auto"),
        ((2, 256, 2, 2), None, "reference"),
    ]


# --- features, crops, layouts, autocast ---------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return small_model(num_classes=10)


def test_forward_features(resnet18):
    x = torch.randn(2, 3, 64, 64)
    for train in (True, False):
        resnet18.train(train)
        with torch.no_grad():
            features = resnet18.forward_features(x)
            logits = resnet18(x)
        assert features.shape == (2, models.POOLED_FEATURES) == (2, 32896)
        if not train:  # train mode updates BN statistics between the two calls
            torch.testing.assert_close(logits, resnet18.fc(features))


def test_average_crops_and_forward_crops(resnet18):
    logits = torch.arange(12.0).reshape(6, 2)  # 2 samples x 3 crops, stored sample by sample
    torch.testing.assert_close(models.average_crops(logits, 3), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    with pytest.raises(ValueError, match=r"\(B \* ncrops, K\).*\(7, 2\)"):
        models.average_crops(torch.zeros(7, 2), 3)
    with pytest.raises(ValueError, match="ncrops"):
        models.average_crops(logits, 0)

    resnet18.eval()
    crops = torch.randn(2, 3, 3, 32, 32)  # (B, ncrops, 3, H, W), as TenCrop + stack gives
    with torch.no_grad():
        got = resnet18.forward_crops(crops)
        want = torch.stack([resnet18(c).mean(0) for c in crops])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, ncrops, 3, H, W\)"):
        resnet18.forward_crops(crops[0])


def test_channels_last_and_autocast(resnet18):
    """channels_last: fp32 rounding only. autocast(bfloat16): finite, close to fp32 in norm.

    A randomly initialised network amplifies rounding: float32 against float64 differs by ~500 units
    of rounding at the pooled vector (3e-5, measured; each AtMp block multiplies it by 2-3). With
    bfloat16's unit of 3.9e-3 that predicts what was measured for ||bf16 - fp32|| / ||fp32|| of the
    logits over 8 inputs (64 px): 0.15-0.28 in train mode, <= 0.16 in eval mode. Trained weights are far
    less sensitive. The head itself runs in float32.
    """
    x = torch.randn(2, 3, 64, 64)
    x_cl = x.to(memory_format=torch.channels_last)
    for train in (False, True):
        # Fresh copies for each run: a train-mode forward updates the BatchNorm statistics.
        fresh = lambda train=train: copy.deepcopy(resnet18).train(train).to(memory_format=torch.channels_last)  # noqa: E731
        with torch.no_grad():
            want = copy.deepcopy(resnet18).train(train)(x)
            got = fresh()(x_cl)
        assert norm_rel_err(got, want) <= 1e-3  # measured <= 7.6e-5 (channels_last convs sum in another order)

        model = fresh()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.forward_features(x_cl)
            logits = model.fc(features)
        assert features.dtype == logits.dtype == torch.bfloat16
        assert bool(torch.isfinite(logits).all()) and bool(torch.isfinite(features).all())
        assert norm_rel_err(logits, want) <= 0.5
        logits.float().sum().backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# --- checkpoints -------------------------------------------------------------------------------------


def assert_same_state(model: nn.Module, state: dict):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def source():
    """A trained-looking resnet18_3g: non-default BN statistics, so a load that skips buffers shows."""
    model = small_model(num_classes=10, seed=1)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
    return model


def layouts(state: dict):
    prefixed = {f"module.{k}": v for k, v in state.items()}
    return {
        "plain": state,
        "released": {
            "epoch": 115,
            "arch": "resnet18_3g",
            "best_prec1": torch.tensor(70.0),
            "state_dict": prefixed,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        },
        "training": {
            "model": state,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 3,
            "args": argparse.Namespace(arch="resnet18_3g", lr=0.1),
        },
        "prefixed plain": prefixed,
    }


@pytest.mark.parametrize("layout", ["plain", "released", "training", "prefixed plain"])
@pytest.mark.parametrize("from_file", [False, True])
def test_load_checkpoint_round_trip(source, layout, from_file, tmp_path):
    state = source.state_dict()
    checkpoint = layouts(state)[layout]
    if from_file:
        torch.save(checkpoint, tmp_path / "ckpt.pth.tar")
        checkpoint = tmp_path / "ckpt.pth.tar"
    target = small_model(num_classes=10, seed=2)
    report = models.load_checkpoint(target, checkpoint)
    assert report.ok and len(report.loaded) == len(state)
    assert report.stripped_prefixes == (("module.",) if "released" in layout or "prefixed" in layout else ())
    assert_same_state(target, state)


def test_load_into_wrapped_model(source):
    target = nn.DataParallel(small_model(num_classes=10, seed=2))  # keys 'module.*' on the model side
    models.load_checkpoint(target, source.state_dict())
    assert_same_state(target.module, source.state_dict())


def test_load_wrong_num_classes():
    imagenet = meta_model("resnet18_3g").state_dict()  # 1000 classes; shapes suffice to fail
    places = small_model("resnet18_3g_365")
    before = copy.deepcopy(places.state_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        models.load_checkpoint(places, {"state_dict": {f"module.{k}": v for k, v in imagenet.items()}})
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "fc.weight (checkpoint [1000, 32896], model [365, 32896])" in message
    assert "fc.bias (checkpoint [1000], model [365])" in message
    assert "num_classes=1000" in message and "unchanged" in message
    assert info.value.report.mismatched == [("fc.weight", (1000, 32896), (365, 32896)), ("fc.bias", (1000,), (365,))]
    assert_same_state(places, before)


def test_load_non_strict_keeps_mismatched(source):
    """strict=False: fine-tuning an ImageNet checkpoint to other classes loads everything but fc."""
    target = small_model("resnet18_3g", num_classes=5)
    fc_before = target.fc.weight.detach().clone()
    report = models.load_checkpoint(target, source.state_dict(), strict=False)
    assert [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    assert not report.missing and not report.unexpected and not report.ok
    assert torch.equal(target.fc.weight, fc_before)
    assert torch.equal(target.AtMp3.bnat1.running_var, source.AtMp3.bnat1.running_var)
    assert "2 with a different shape" in str(report)


def test_load_truncated_and_extra_keys(source):
    state = source.state_dict()
    keys = list(state)
    target = small_model(num_classes=10, seed=2)
    before = copy.deepcopy(target.state_dict())

    truncated = {k: state[k] for k in keys[: len(keys) // 2]}
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: layer_reduce_bn\.weight") as info:
        models.load_checkpoint(target, truncated)
    assert info.value.report.missing == keys[len(truncated) :]
    assert "another depth" not in str(info.value)  # only the head is missing
    assert_same_state(target, before)

    extra = dict(state, **{"head.weight": torch.zeros(3)})
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected in the checkpoint: head\.weight"):
        models.load_checkpoint(target, extra)
    assert_same_state(target, before)

    deeper = {k: v for k, v in meta_model("resnet50_3g").state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="another depth"):
        models.load_checkpoint(target, deeper)
    assert_same_state(target, before)


def test_load_old_checkpoint_without_bn_counters(source):
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(".num_batches_tracked")}
    target = small_model(num_classes=10, seed=2)
    report = models.load_checkpoint(target, state)
    assert report.ok and report.defaulted and all(k.endswith(".num_batches_tracked") for k in report.defaulted)
    torch.testing.assert_close(target.bn1.running_mean, source.bn1.running_mean, rtol=0, atol=0)


class _NotData:  # a class torch.load(weights_only=True) refuses to rebuild
    pass


def test_load_format_errors(source, tmp_path):
    target = small_model(num_classes=10, seed=2)
    with pytest.raises(CheckpointFormatError, match="'state_dict'.*'model'.*keys epoch, net"):
        models.load_checkpoint(target, {"epoch": 1, "net": 2})
    with pytest.raises(CheckpointFormatError, match="got list"):
        models.load_checkpoint(target, [1, 2])
    with pytest.raises(CheckpointFormatError, match="do not: extra"):
        models.load_checkpoint(target, {"model": dict(source.state_dict(), extra=3)})

    path = tmp_path / "old.pth"
    torch.save({"state_dict": source.state_dict(), "meta": _NotData()}, path)
    with pytest.raises(CheckpointFormatError, match="weights_only=False"):
        models.load_checkpoint(target, path)
    report = models.load_checkpoint(target, path, weights_only=False)
    assert report.ok


def test_load_errors_name_the_file(tmp_path):
    """A file that is not a checkpoint, or one that does not fit, is named in the error; an empty dict says so."""
    model = models.create_model("resnet18_3g", num_classes=10)
    state = model.state_dict()
    state["fc.weight_renamed"] = state.pop("fc.weight")
    renamed = tmp_path / "renamed.pth"
    torch.save(state, renamed)
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint \\({renamed}, plain state_dict\\) does not match"):
        models.load_checkpoint(model, renamed)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(CheckpointFormatError, match=f"^{empty}: .*got an empty dict$"):
        models.load_checkpoint(model, empty)
    with pytest.raises(CheckpointFormatError, match="got an empty dict$"):
        models.load_checkpoint(model, {})  # an object, not a file: no path to name
