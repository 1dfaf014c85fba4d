"""train/: one epoch end to end, its files, evaluation (1-crop, 10-crop), configs, schedules, bad input.

The resume (SIGKILL) test is in test_train_resume.py, the torchrun test in test_train_ddp.py and the
digits demo in test_train_demo.py. The helpers here (a tiny ImageFolder tree of random PNGs, the
command line of a tiny run) are shared with those files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from train import checkpoint, data, engine
from train.config import UserError, parse_args
from train.distributed import DistInfo
from train.main import LRFactor, main

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 40, seed: int = 0) -> Path:
    """root/{train,val}/c<k>/<i>.png: random RGB images, `train` and `val` of each class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_args(data_dir, out_dir, *extra) -> list[str]:
    """A ResNet18-3G at 32 px (a 2x2 map after layer4 at stride 1), batch 4, one epoch, no workers."""
    return [
        "--data",
        str(data_dir),
        "--output-dir",
        str(out_dir),
        "--arch",
        "resnet18_3g",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--val-resize",
        "36",
        "--val-crop",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--lr",
        "0.01",
        "--print-freq",
        "2",
        *extra,
    ]


def read_summary(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):
    """One epoch of train + eval (gradient clipping on), in process; returns the output directory (its
    stdout in ../stdout.txt)."""
    out = tmp_path_factory.mktemp("run") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(tiny_args(tree, out, "--time-head-steps", "2", "--clip-grad", "5")) == 0
    (out.parent / "stdout.txt").write_text(stdout.getvalue())
    return out


def test_one_epoch_writes_the_run_files(trained):
    assert sorted(p.name for p in trained.iterdir()) == [
        "args.yaml",
        "best.pth",
        "head_timing.json",
        "last.pth",
        "summary.csv",
    ]
    rows = read_summary(trained / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0"]
    assert np.isfinite(float(rows[0]["train_loss"])) and 0 <= float(rows[0]["val_top1"]) <= 100
    saved = yaml.safe_load((trained / "args.yaml").read_text())
    assert saved["arch"] == "resnet18_3g" and saved["batch_size"] == 4 and saved["data"].endswith("tree0")
    assert saved["clip_grad"] == 5.0

    state = torch.load(trained / "last.pth", weights_only=True)
    assert {
        "model",
        "optimizer",
        "lr_scheduler",
        "scaler",
        "epoch",
        "best_top1",
        "best_epoch",
        "args",
        "classes",
        "sampler",
        "rng",
        "metrics",
    } <= set(state)
    assert state["epoch"] == 0 and state["classes"] == ["c0", "c1", "c2"]
    assert state["model"]["fc.weight"].shape == (3, 32896)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["sampler"] == {"seed": 0, "epoch": 0, "num_replicas": 1}
    best = torch.load(trained / "best.pth", weights_only=True)
    assert best["epoch"] == 0 and torch.equal(best["model"]["fc.weight"], state["model"]["fc.weight"])


def test_head_timing_is_recorded(trained):
    import json

    timing = json.loads((trained / "head_timing.json").read_text())
    assert timing["steps"] == 2 and 0 < timing["head_ms"] < timing["step_ms"]
    assert timing["ops"] and all(op.startswith("threeg::") for op in timing["ops"])


def test_the_printed_commands_evaluate_and_resume_the_run(trained, capsys):
    """The end of a run names its files and prints a command to evaluate it and one to resume it."""
    lines = (trained.parent / "stdout.txt").read_text().splitlines()
    assert any(line.startswith(f"run files in {trained}: last.pth") and "summary.csv" in line for line in lines)
    commands = {}
    for line in lines:
        for what in ("evaluate it: ", "resume it (after an interruption): "):
            if line.startswith(what):
                commands[what.split()[0]] = shlex.split(line[len(what) :])
    assert set(commands) == {"evaluate", "resume"}
    for argv in commands.values():
        assert argv[0] == os.path.relpath(sys.executable) and argv[1:3] == ["-m", "train"]
        assert "--arch" in argv and "--overwrite" not in argv
    assert main(commands["evaluate"][3:]) == 0
    assert "best.pth: val top-1" in capsys.readouterr().out
    checkpoints = {name: digest(trained / name) for name in ("last.pth", "best.pth")}
    assert main(commands["resume"][3:]) == 0  # the run is complete: resuming it has nothing to do
    assert "nothing to do: the checkpoint has finished epoch 0" in capsys.readouterr().out
    assert {name: digest(trained / name) for name in checkpoints} == checkpoints


@pytest.mark.parametrize("ten_crop", [False, True])
def test_evaluate_a_checkpoint(trained, tree, tmp_path, capsys, ten_crop):
    argv = tiny_args(tree, tmp_path / "unused", "--evaluate", "--checkpoint", str(trained / "best.pth"))
    assert main(argv + (["--ten-crop"] if ten_crop else [])) == 0
    out = capsys.readouterr().out
    assert ("10-crop" if ten_crop else "1-crop") in out and "val top-1" in out
    assert not (tmp_path / "unused").exists()  # --evaluate writes nothing


def test_evaluate_a_released_style_checkpoint(trained, tree, tmp_path, capsys):
    """{'state_dict': {'module.' + key: ...}, 'best_prec1': ...} as 3G-Net released them (DataParallel)."""
    model = torch.load(trained / "best.pth", weights_only=True)["model"]
    released = tmp_path / "resnet18_3g.pth.tar"
    torch.save(
        {
            "epoch": 1,
            "arch": "resnet18_3g",
            "best_prec1": torch.tensor(1.0),
            "state_dict": {f"module.{k}": v for k, v in model.items()},
        },
        released,
    )
    assert main(tiny_args(tree, tmp_path / "o", "--evaluate", "--checkpoint", str(released))) == 0
    assert "val top-1" in capsys.readouterr().out


# -- 10-crop evaluation averages the crops -----------------------------------------------------------------


class MeanPixel(nn.Module):
    """A model whose output is known: logits (mean pixel, -mean pixel) of each image."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)


def test_ten_crop_transform_and_average():
    args = parse_args(["--ten-crop", "--val-resize", "36", "--val-crop", "32"])
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    crops = torch.stack([data.eval_transform(args)(im) for im in images])
    assert crops.shape == (3, 10, 3, 32, 32)
    # TenCrop: corners tl, tr, bl, br and the centre, then the same of the mirrored image
    assert torch.equal(crops[:, 5:], crops[:, [1, 0, 3, 2, 4]].flip(-1))
    got = engine.predict(MeanPixel(), crops)
    want_mean = crops.mean(dim=(2, 3, 4)).mean(dim=1)  # each crop's mean pixel, averaged over the 10 crops
    torch.testing.assert_close(got, torch.stack([want_mean, -want_mean], 1), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(crops.mean(dim=(2, 3, 4))[:, 0], want_mean)  # the crops do differ


def test_evaluate_with_ten_crops_uses_the_averaged_logits(tree):
    args = parse_args(["--ten-crop", "--val-resize", "36", "--val-crop", "32", "--workers", "0", "--print-freq", "100"])
    info = DistInfo()
    val_set = data.image_folder(str(tree), "val", data.eval_transform(args))
    logits, targets = [], []
    for crops, target in val_set:
        m = crops.mean(dim=(1, 2, 3)).mean()
        logits.append(torch.stack([m, -m, torch.zeros(())]))
        targets.append(target)
    want = nn.functional.cross_entropy(torch.stack(logits), torch.tensor(targets)).item()

    class MeanPixel3(MeanPixel):  # 3 classes like the tree
        def forward(self, x):
            out = super().forward(x)
            return torch.cat([out, torch.zeros_like(out[:, :1])], 1)

    stats = engine.evaluate(MeanPixel3(), nn.CrossEntropyLoss(), data.val_loader(val_set, args, info, 20), args, info)
    assert stats["images"] == len(val_set)
    assert stats["loss"] == pytest.approx(want, rel=1e-6)


# -- configs and schedules ---------------------------------------------------------------------------------


def test_command_line_overrides_the_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nbatch-size: 64\nlr_milestones: [3, 6]\nfused_head: false\n")
    args = parse_args(["--config", str(cfg), "--lr", "0.2"])
    assert (args.lr, args.batch_size, args.lr_milestones, args.fused_head) == (0.2, 64, [3, 6], False)
    assert parse_args(["--config", str(cfg), "--fused-head"]).fused_head is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("bacth_size: 4\n", "unknown option 'bacth_size'"),
        ("lr: fast\n", "option 'lr': expected float"),
        ("amp: fp8\n", "expected one of"),
        ("crop_scale: 0.5\n", "expected a list"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_config_is_refused(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_args(["--config", str(cfg)])


def schedule(config: str) -> list[float]:
    args = parse_args(["--config", str(REPO / "train" / "configs" / config)])
    factor = LRFactor(args.lr_schedule, args.lr_milestones, args.lr_gamma, args.epochs, args.warmup_epochs)
    return [args.lr * factor(e) for e in range(args.epochs)]


def test_paper_schedules():
    imagenet = schedule("imagenet_resnet50_3g.yaml")
    assert len(imagenet) == 115
    assert imagenet == pytest.approx([0.1 * 0.1 ** (e // 30) for e in range(115)])
    places = schedule("places365_resnet50_3g.yaml")
    assert len(places) == 55
    assert places == pytest.approx([0.1 * 0.1 ** sum(e > t for t in (30, 40, 45, 50)) for e in range(55)])
    for config in ("imagenet_resnet50_3g.yaml", "places365_resnet50_3g.yaml"):
        args = parse_args(["--config", str(REPO / "train" / "configs" / config)])
        assert (args.batch_size, args.momentum, args.weight_decay, args.image_size, args.val_resize, args.val_crop) == (
            256,
            0.9,
            1e-4,
            224,
            256,
            224,
        )
    assert parse_args(["--config", str(REPO / "train/configs/places365_resnet50_3g.yaml")]).ten_crop


# -- the atomic writer ----------------------------------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    checkpoint.save_atomic({"epoch": 1, "w": torch.arange(5)}, str(path))
    before = digest(path)

    def torch_save_then_crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2}, str(path))
    assert digest(path) == before and os.listdir(tmp_path) == ["last.pth"]  # no temporary file left
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_rng_state_round_trip():
    import random

    state = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# -- bad input: a clear message, a non-zero exit, nothing written --------------------------------------------


def test_negative_clip_grad_is_refused(tree, tmp_path, capsys):
    assert main(tiny_args(tree, tmp_path / "out", "--clip-grad", "-1")) == 2
    assert "--clip-grad must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_data_dir(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(tiny_args(tmp_path / "nope", out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "no such directory" in err and "Traceback" not in err
    assert not out.exists()


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    assert main(tiny_args(tmp_path / "d", tmp_path / "out")) == 2
    assert "holds no usable images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_arch(tree, tmp_path, capsys):
    assert main(tiny_args(tree, tmp_path / "out", "--arch", "resnet19_3g")) == 2
    err = capsys.readouterr().err
    assert "--arch resnet19_3g: unknown" in err and "resnet18_3g" in err
    assert not (tmp_path / "out").exists()


def test_class_mismatch_with_a_checkpoint(trained, tmp_path, capsys):
    two = make_tree(tmp_path / "two", classes=2, train=4, val=2)
    assert main(tiny_args(two, tmp_path / "o", "--evaluate", "--checkpoint", str(trained / "best.pth"))) == 2
    assert "fc layer has 3 classes but" in capsys.readouterr().err

    before = {p.name: digest(p) for p in trained.iterdir()}
    assert main(tiny_args(two, trained, "--resume", str(trained / "last.pth"), "--epochs", "2")) == 2
    assert "fc layer has 3 classes" in capsys.readouterr().err
    assert {p.name: digest(p) for p in trained.iterdir()} == before


def test_same_classes_in_another_order_or_name_are_refused(trained, tmp_path, capsys):
    other = make_tree(tmp_path / "other", classes=3, train=4, val=2)
    (other / "val" / "c2").rename(other / "val" / "zz")
    (other / "train" / "c2").rename(other / "train" / "zz")
    assert main(tiny_args(other, tmp_path / "o", "--evaluate", "--checkpoint", str(trained / "best.pth"))) == 2
    assert "trained on other classes" in capsys.readouterr().err


def test_an_existing_run_is_not_overwritten(trained, tree, capsys):
    before = {p.name: digest(p) for p in trained.iterdir()}
    assert main(tiny_args(tree, trained)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: digest(p) for p in trained.iterdir()} == before


def test_bad_checkpoint_file(tree, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert main(tiny_args(tree, tmp_path / "o", "--evaluate", "--checkpoint", str(junk))) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err
    assert main(tiny_args(tree, tmp_path / "o", "--evaluate", "--checkpoint", str(tmp_path / "none.pth"))) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_users_mistake_prints_no_traceback(tmp_path):
    """The same through `python -m train`, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "train", *tiny_args(tmp_path / "nope", tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --data") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
