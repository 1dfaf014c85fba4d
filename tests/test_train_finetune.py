"""Fine-tuning in train/: backbone weights (torchvision, released, timm files), per-group learning rates, the
frozen backbone (and resuming in the middle of it), timm backbones, safetensors checkpoints, the CUB recipe.

The digits run (a backbone pretrained on digits 0-4, fine-tuned on digits 5-9, against a random init) is
test_fine_tuning_from_a_torchvision_file_end_to_end; its numbers are in docs/training.md ("Fine-tuning").
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

from threeg_kernels.models import create_model
from threeg_kernels.models.backbones import TORCHVISION_RESNET_TRUNK
from train import checkpoint, data, finetune
from train.config import UserError, parse_args
from train.main import LRFactor, main

from .test_train import REPO, make_tree, read_summary, tiny_args

TRUNK = tuple(f"{name}." for name in TORCHVISION_RESNET_TRUNK)


def trunk_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(TRUNK)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision ResNet-18 state dict (random weights, BN statistics made non-trivial), as torchvision
    writes it: conv1 .. layer4 and a 1000-class fc."""
    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18-tv.pth"
    torch.save(net.state_dict(), path)
    return path


# -- parameter groups and their learning rates -----------------------------------------------------------------


def test_parameter_groups_of_resnet_3g_and_their_lr():
    args = parse_args(["--lr", "0.1", "--head-lr-factor", "2", "--fc-lr-factor", "5", "--lr-milestones", "1"])
    model = create_model("resnet18_3g", num_classes=3)
    groups = finetune.split_parameters(model)
    names = {g: {n for n, _ in params} for g, params in groups.items()}
    assert "conv1.weight" in names["backbone"] and "layer4.1.bn2.bias" in names["backbone"]
    assert {"layer_reduce.weight", "layer_reduce_bn.weight", "AtMp1.map1.weight", "AtMp3.atmap3.weight"} <= names[
        "head"
    ]
    assert names["classifier"] == {"fc.weight", "fc.bias"}
    assert sum(map(len, names.values())) == len(list(model.parameters()))  # each parameter in one group

    optimizer = finetune.build_optimizer(model, args)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
        ("backbone", 0.1),
        ("head", 0.2),
        ("classifier", 0.5),
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor("multistep", [1], 0.1, 3, 0))
    optimizer.step()  # no gradients: nothing changes (the scheduler expects a step first)
    scheduler.step()  # epoch 1: every group's lr x 0.1
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.02, 0.05])


def test_parameter_groups_of_a_timm_backbone_with_the_head():
    pytest.importorskip("timm")
    args = parse_args(["--arch", "timm:resnet18", "--lr", "0.1", "--fc-lr-factor", "5"])
    model = finetune.build_model(args, 4)
    groups = {g: {n for n, _ in params} for g, params in finetune.split_parameters(model).items()}
    assert all(n.startswith("backbone.") for n in groups["backbone"]) and "backbone.conv1.weight" in groups["backbone"]
    assert groups["classifier"] == {"head.fc.weight", "head.fc.bias"}
    assert "head.reduce.conv.weight" in groups["head"] and "head.attention.2.atmap3.weight" in groups["head"]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(UserError, match=r"--image-size 32: timm:resnet18's features have stride 32"):
        finetune.check_input_size(parse_args(["--arch", "timm:resnet18", "--image-size", "32"]), model)


def test_resume_refuses_an_optimizer_with_other_groups():
    old = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}  # one unnamed group
    with pytest.raises(UserError, match=r"--resume old.pth: its optimizer has the parameter groups \[None\]"):
        finetune.check_optimizer_state(old, "--resume old.pth")
    model = create_model("resnet18_3g", num_classes=3)
    finetune.check_optimizer_state(finetune.build_optimizer(model, parse_args([])).state_dict(), "ok")


# -- backbone weights ------------------------------------------------------------------------------------------


def test_backbone_weights_from_torchvision_and_released_files(torchvision_file):
    tv = torch.load(torchvision_file, weights_only=True)
    for weights in (tv, {"state_dict": {f"module.{k}": v for k, v in tv.items()}, "epoch": 3}):
        model = create_model("resnet18_3g", num_classes=3)
        report = finetune.load_backbone(model, weights, "file")
        assert report.startswith(f"loaded {len(trunk_of(tv))} backbone tensors")
        assert "ignored 2 tensors" in report  # torchvision's fc
        for k, v in trunk_of(tv).items():
            assert torch.equal(model.state_dict()[k], v), k

    deeper = torchvision.models.resnet34(weights=None).state_dict()
    with pytest.raises(UserError, match="--backbone-weights r34.pth"):
        finetune.load_backbone(create_model("resnet18_3g", num_classes=3), deeper, "r34.pth")


def test_backbone_weights_of_a_timm_model(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file(source, str(path))
    model = finetune.build_model(parse_args(["--arch", "timm:resnet18"]), 3)
    report = finetune.load_backbone(model, checkpoint.load(str(path)), str(path))
    assert "ignored 2 tensors" in report  # timm's classifier, removed by attach_head
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, source[k]), k
    with pytest.raises(UserError, match="does not fit"):
        finetune.load_backbone(model, torchvision.models.resnet34(weights=None).state_dict(), "r34")


# -- the frozen backbone, and resuming in the middle of it -------------------------------------------------------


def momentum_buffers(state: dict, group: str) -> list:
    opt = state["optimizer"]
    (indices,) = [g["params"] for g in opt["param_groups"] if g["name"] == group]
    return [i for i in indices if i in opt["state"]]


@pytest.mark.slow
def test_frozen_backbone_is_not_updated_and_resume_keeps_the_freeze(tree, torchvision_file, tmp_path):
    out = tmp_path / "run"
    tv = trunk_of(torch.load(torchvision_file, weights_only=True))
    base = tiny_args(tree, out, "--backbone-weights", str(torchvision_file), "--freeze-backbone-epochs", "2")
    base += ["--fc-lr-factor", "5", "--clip-grad", "5"]
    states = []
    for epochs, extra in (
        ("1", []),
        ("2", ["--resume", str(out / "last.pth")]),
        ("3", ["--resume", str(out / "last.pth")]),
    ):
        assert main(base + ["--epochs", epochs, *extra]) == 0
        states.append(torch.load(out / "last.pth", weights_only=True))

    for state in states[:2]:  # epochs 0 and 1: frozen
        for k, v in tv.items():  # parameters and BatchNorm statistics alike
            assert torch.equal(state["model"][k], v), f"epoch {state['epoch']}: {k} changed"
        assert momentum_buffers(state, "backbone") == []  # no step touched the backbone
        assert momentum_buffers(state, "head") and momentum_buffers(state, "classifier")
    for k in ("fc.weight", "AtMp1.map1.weight", "layer_reduce.weight"):  # the head trains while the backbone is frozen
        assert not torch.equal(states[0]["model"][k], states[1]["model"][k]), k
    last = states[2]  # epoch 2: the backbone trains
    assert not torch.equal(last["model"]["layer1.0.conv1.weight"], tv["layer1.0.conv1.weight"])
    assert not torch.equal(last["model"]["bn1.running_mean"], tv["bn1.running_mean"])
    assert momentum_buffers(last, "backbone")
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == pytest.approx([0.01, 0.01, 0.05])
    assert [r["epoch"] for r in read_summary(out / "summary.csv")] == ["0", "1", "2"]


# -- safetensors checkpoints -------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    model = create_model("resnet18_3g", num_classes=3)
    optimizer = finetune.build_optimizer(model, parse_args(["--fc-lr-factor", "5"]))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor("cosine", [], 0.1, 4, 1))
    optimizer.step()
    scheduler.step()
    state = {
        "format": checkpoint.FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": None,
        "epoch": 0,
        "best_top1": -1.0,
        "metrics": {"epoch": 0, "lr": "0.1", "val_top1": math.inf},
        "args": vars(parse_args(["--crop-scale", "0.5", "1"])),
        "classes": ["a", "b", "c"],
        "shape": (2, 3),
        "rng": checkpoint.rng_state(),
    }
    path = tmp_path / "last.safetensors"
    checkpoint.save(state, str(path))
    back = checkpoint.load(str(path))

    def same(a, b, where="") -> None:
        assert type(a) is type(b) or isinstance(a, dict) and isinstance(b, dict), where  # OrderedDict: a dict
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), where
        elif isinstance(a, dict):
            assert list(a) == list(b), where
            for k in a:
                same(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}/{i}")
        else:
            assert a == b, where

    same(state, back)
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys stay ints
    tensors = load_file(str(path))  # a plain safetensors file for any reader
    assert torch.equal(tensors["model/fc.weight"], state["model"]["fc.weight"])
    assert "optimizer/state/0/momentum_buffer" in tensors and "rng/torch" in tensors

    plain = tmp_path / "weights.safetensors"  # without this pipeline's metadata: a state dict
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, str(plain))
    assert list(checkpoint.load(str(plain))) == ["w"]


@pytest.mark.slow
def test_a_safetensors_run_resumes_exactly_and_evaluates(tree, tmp_path, capsys):
    pytest.importorskip("safetensors")
    ref, cut = tmp_path / "pth", tmp_path / "st"
    common = ["--fc-lr-factor", "3", "--clip-grad", "5"]
    assert main(tiny_args(tree, ref, "--epochs", "2", *common)) == 0
    assert main(tiny_args(tree, cut, "--epochs", "1", "--save-format", "safetensors", *common)) == 0
    assert sorted(p.name for p in cut.iterdir() if "." in p.name and p.suffix != ".yaml") == [
        "best.safetensors",
        "last.safetensors",
        "summary.csv",
    ]
    # without --save-format: the run goes on in the format of its --resume file
    assert main(tiny_args(tree, cut, "--epochs", "2", "--resume", str(cut / "last.safetensors"), *common)) == 0
    assert not (cut / "last.pth").exists()
    a = torch.load(ref / "last.pth", weights_only=True)
    b = checkpoint.load(str(cut / "last.safetensors"))
    assert a["epoch"] == b["epoch"] == 1
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    capsys.readouterr()
    assert main(tiny_args(tree, tmp_path / "unused", "--evaluate", "--checkpoint", str(cut / "best.safetensors"))) == 0
    assert "best.safetensors: val top-1" in capsys.readouterr().out


# -- a timm backbone ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_timm_backbone_trains_with_the_head(tree, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    weights = tmp_path / "timm_resnet18.pth"
    torch.save(source, weights)
    out = tmp_path / "run"
    argv = tiny_args(tree, out, "--arch", "timm:resnet18", "--image-size", "64", "--val-resize", "64")
    argv += ["--val-crop", "64", "--backbone-weights", str(weights), "--freeze-backbone-epochs", "1"]
    assert main(argv) == 0
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["model"]["head.fc.weight"].shape == (3, 32896)
    for k, v in source.items():
        if not k.startswith("fc."):
            assert torch.equal(state["model"][f"backbone.{k}"], v), k
    assert (
        main(
            tiny_args(
                tree,
                tmp_path / "o",
                "--arch",
                "timm:resnet18",
                "--image-size",
                "64",
                "--val-resize",
                "64",
                "--val-crop",
                "64",
                "--evaluate",
                "--checkpoint",
                str(out / "best.pth"),
            )
        )
        == 0
    )


# -- the options' checks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--head-lr-factor", "0"], "--head-lr-factor must be a finite number > 0; got 0.0"),
        (["--fc-lr-factor", "nan"], "--fc-lr-factor must be a finite number > 0; got nan"),
        (["--freeze-backbone-epochs", "-1"], "--freeze-backbone-epochs must be >= 0; got -1"),
        (["--backbone-weights", "nope.pth"], "--backbone-weights nope.pth: no such file"),
        (["--arch", "timm:no_such_net"], "--arch timm:no_such_net: timm has no model 'no_such_net'"),
        (["--arch", "timm:resnet18", "--no-fused-head"], "--no-fused-head: applies to ResNet-3G models"),
    ],
)
def test_bad_fine_tuning_options(tree, tmp_path, capsys, extra, message):
    assert main(tiny_args(tree, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_backbone_file_that_does_not_fit_is_refused_before_writing(tree, tmp_path, capsys):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    assert main(tiny_args(tree, tmp_path / "out", "--backbone-weights", str(path))) == 2
    err = capsys.readouterr().err
    assert f"error: --backbone-weights {path}: does not fit" in err and "unexpected" in err
    assert not (tmp_path / "out").exists()


# -- the CUB recipe and its data ---------------------------------------------------------------------------------


def test_cub_config_is_fast_mpn_covs_fine_grained_recipe():
    args = parse_args(["--config", str(REPO / "train/configs/cub_resnet50_3g.yaml")])
    assert (args.arch, args.image_size, args.batch_size, args.lr, args.fc_lr_factor, args.head_lr_factor) == (
        "resnet50_3g",
        448,
        10,
        1.2e-3,
        5.0,
        1.0,
    )
    assert (args.weight_decay, args.momentum, args.epochs, args.train_crop, args.val_resize, args.val_crop) == (
        1e-3,
        0.9,
        100,
        "center",
        448,
        448,
    )
    factor = LRFactor(args.lr_schedule, args.lr_milestones, args.lr_gamma, args.epochs, args.warmup_epochs)
    assert [factor(e) for e in range(args.epochs)] == [1.0] * 100  # constant over the 100 epochs
    transform = data.train_transform(args)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["Resize", "CenterCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


def test_the_documented_cub_conversion(tmp_path):
    """The one-liner of docs/training.md turns CUB's images.txt + train_test_split.txt into train/ and val/."""
    (line,) = [
        ln.strip() for ln in (REPO / "docs/training.md").read_text().splitlines() if ln.strip().startswith("cd CUB_")
    ]
    cub = tmp_path / "CUB_200_2011"
    images = []
    for i, rel in enumerate(
        [
            "001.Black_footed_Albatross/a_1.jpg",
            "001.Black_footed_Albatross/a_2.jpg",
            "002.Laysan_Albatross/b_1.jpg",
            "002.Laysan_Albatross/b_2.jpg",
        ],
        start=1,
    ):
        (cub / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cub / "images" / rel).write_bytes(b"jpeg")
        images.append(f"{i} {rel}")
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True, timeout=60)
    found = sorted(str(p.relative_to(tmp_path / "cub")) for p in (tmp_path / "cub").glob("*/*/*"))
    assert found == [
        "train/001.Black_footed_Albatross/a_1.jpg",
        "train/002.Laysan_Albatross/b_1.jpg",
        "val/001.Black_footed_Albatross/a_2.jpg",
        "val/002.Laysan_Albatross/b_2.jpg",
    ]
    assert (tmp_path / "cub/val/002.Laysan_Albatross/b_2.jpg").read_bytes() == b"jpeg"


# -- a backbone pretrained on digits 0-4 against a random one, fine-tuned on digits 5-9 ----------------------


def digit_subset(digits: Path, root: Path, classes) -> Path:
    """root/{train,val}/<k>: links to the digits tree's class folders k in `classes`."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for k in classes:
            os.symlink(digits / split / str(k), root / split / str(k))
    return root


def pretrain_torchvision_resnet18(root: Path, epochs: int) -> dict:
    """A plain torchvision ResNet-18 (global average pooling, fc) trained on root/train with the digits
    transforms: its state dict is a torchvision-format file's."""
    args = parse_args(["--config", str(REPO / "train/configs/digits_finetune.yaml")])
    train_set = data.image_folder(str(root), "train", data.train_transform(args))
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(train_set.classes))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True)
    net.train()
    for _ in range(epochs):
        for images, target in loader:
            loss = torch.nn.functional.cross_entropy(net(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.state_dict()


def probe_accuracy(model: torch.nn.Module, root: Path) -> float:
    """Val top-1 (%) of a ridge classifier fitted on root/train's average-pooled backbone features: what the
    backbone's features are worth, with no training run in between."""
    args = parse_args(["--config", str(REPO / "train/configs/digits_finetune.yaml")])
    model.eval()
    feats = {}
    with torch.no_grad():
        for split in ("train", "val"):
            dataset = data.image_folder(str(root), split, data.eval_transform(args))
            fs, ys = [], []
            for images, target in torch.utils.data.DataLoader(dataset, batch_size=90):
                h = images
                for module in finetune.backbone_modules(model):
                    h = module(h)
                fs.append(h.mean((2, 3)).double())
                ys.append(target)
            feats[split] = torch.cat(fs), torch.cat(ys)
    f, y = feats["train"]
    mean, std = f.mean(0), f.std(0) + 1e-6
    f = (f - mean) / std
    targets = torch.nn.functional.one_hot(y).double()
    w = torch.linalg.solve(f.T @ f + 10.0 * torch.eye(f.shape[1], dtype=f.dtype), f.T @ (targets - targets.mean(0)))
    fv, yv = feats["val"]
    pred = ((fv - mean) / std @ w).argmax(1)
    return 100.0 * (pred == yv).double().mean().item()


@pytest.mark.slow
def test_fine_tuning_from_a_torchvision_file_end_to_end(tmp_path):
    """digits_finetune.yaml from a backbone file: a torchvision ResNet-18 trained 3 epochs on digits 0-4 is the
    backbone of a one-epoch run on digits 5-9 with the backbone frozen; the backbone the run saves is the file's
    and its features separate the new digits (a ridge probe), as a random backbone's do. Which start ends the
    epoch higher is not asserted: on these 720 images it is decided by rounding (docs/training.md)."""
    data.ensure_digits_tree(str(tmp_path / "digits"), 0.2, 0)
    low = digit_subset(tmp_path / "digits", tmp_path / "low", range(5))
    high = digit_subset(tmp_path / "digits", tmp_path / "high", range(5, 10))
    weights = tmp_path / "resnet18-digits-0-4.pth"
    torch.save(pretrain_torchvision_resnet18(low, epochs=3), weights)
    file_trunk = trunk_of(torch.load(weights, weights_only=True))
    torchvision.models.resnet18(num_classes=5).load_state_dict(torch.load(weights, weights_only=True))  # the format

    config = ["--config", str(REPO / "train/configs/digits_finetune.yaml"), "--dataset", "imagefolder"]
    probe, top1 = {}, {}
    for name, extra in (("loaded", ["--backbone-weights", str(weights)]), ("random", [])):
        out = tmp_path / name
        argv = config + [
            "--data",
            str(high),
            "--output-dir",
            str(out),
            "--epochs",
            "1",
            "--freeze-backbone-epochs",
            "1",
        ]
        assert main(argv + extra) == 0
        top1[name] = float(read_summary(out / "summary.csv")[0]["val_top1"])
        saved = torch.load(out / "last.pth", weights_only=True)["model"]
        same = [torch.equal(saved[k], v) for k, v in file_trunk.items()]
        assert all(same) if name == "loaded" else not any(same), name
        model = finetune.build_model(parse_args(config + ["--data", str(high)]), num_classes=5)
        model.load_state_dict(saved)
        probe[name] = probe_accuracy(model, high)
    print(f"ridge probe val top-1: loaded {probe['loaded']:.2f}%, random {probe['random']:.2f}%; after the frozen")
    print(f"epoch (head trained): loaded {top1['loaded']:.2f}%, random {top1['random']:.2f}%")
    # measured 95.6% (loaded) and 98.9% (random) with either eigensolver; chance is 20%
    assert min(probe.values()) > 80, probe
