"""train/: users' mistakes and damaged files end in one `error: ...` line (exit status 2), unreadable images
are skipped and counted, an epoch's checkpoint is written before its validation, a non-finite loss names
the pooling when the pooling produced it, and load_checkpoint says why a damaged file cannot be read."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from threeg_kernels.models import CheckpointFormatError, load_checkpoint, read_checkpoint_file
from train import engine
from train.config import UserError, parse_args
from train.distributed import DistInfo
from train.main import MAX_SEED, feature_map_side, main, validate

from .test_train import make_tree, read_summary, tiny_args


def run_main(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def spoil(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(b"this is not an image" * 4)


# ---------------------------------------------------------------------------------------------------------
# options checked before anything is read


def test_feature_map_side_matches_the_backbone():
    from threeg_kernels.models import create_model

    model = create_model("resnet18_3g", num_classes=2, pool_backend="torch").eval()
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    with torch.no_grad():
        for size in (16, 17, 32, 33):
            x = model.layer4(model.layer3(model.layer2(model.layer1(stem(torch.zeros(1, 3, size, size))))))
            assert x.shape[-1] == feature_map_side(size)
    assert feature_map_side(16) == 1 and feature_map_side(17) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "16"], "--image-size 16: the final feature map would be 1x1"),
        (["--val-crop", "8"], "--val-crop 8: the final feature map would be 1x1"),
        (["--lr", "0"], "--lr must be a finite number > 0; got 0.0"),
        (["--lr", "-0.1"], "--lr must be a finite number > 0; got -0.1"),
        (["--lr", "nan"], "--lr must be a finite number > 0; got nan"),
        (["--momentum", "-0.5"], "--momentum must be a finite number >= 0; got -0.5"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0; got -1.0"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0; got inf"),
        (["--seed", "-1"], "--seed must be in [0, 2**32 - 1]"),
        (["--seed", str(2**32)], "--seed must be in [0, 2**32 - 1]"),
        (["--split-seed", str(2**63)], "--split-seed must be in [0, 2**32 - 1]"),
        (["--ten-crop", "--val-crop", "40"], "--ten-crop: --val-crop 40 is larger than --val-resize 36"),
        (["--max-bad-images", "1"], "--max-bad-images must be in [0, 1)"),
    ],
)
def test_bad_options_give_one_error_line(tmp_path, capsys, extra, message):
    rc = main(tiny_args(tmp_path / "data", tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_is_accepted():
    for seed in (0, MAX_SEED):
        np.random.seed(seed)  # numpy's range is the limit
        validate(parse_args(["--seed", str(seed), "--device", "cpu"]), DistInfo())
    with pytest.raises(ValueError):
        np.random.seed(MAX_SEED + 1)


@pytest.mark.parametrize(
    "text, message",
    [
        (b"batch_size: 2.5\n", "option 'batch_size': expected an integer; got 2.5"),
        (b"epochs: 3.0\n", "option 'epochs': expected an integer; got 3.0"),
        (b"lr-milestones: [30, 60.5]\n", "option 'lr-milestones': expected an integer"),
        (b"lr: 0.1\narch: r\xe9snet\n", "not UTF-8 text (byte 0xe9 at offset"),
    ],
)
def test_bad_config_values(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_bytes(text)
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config ") and message in err and "Traceback" not in err


def test_integer_config_values_still_work(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 8\nlr: 1\nlr_milestones: [2, 4]\n")
    args = parse_args(["--config", str(config)])
    assert args.batch_size == 8 and args.lr == 1.0 and args.lr_milestones == [2, 4]


# ---------------------------------------------------------------------------------------------------------
# unreadable images, a corrupt summary.csv on resume, the checkpoint written before validation


@pytest.fixture(scope="module")
def spoiled_run(tmp_path_factory):
    """Two epochs on a tree with one truncated training image and one corrupt validation image."""
    tree = make_tree(tmp_path_factory.mktemp("spoiled"), train=4, val=2)
    spoil(tree / "train" / "c1" / "3.png", "truncated")
    spoil(tree / "val" / "c2" / "0.png", "corrupt")
    out = tmp_path_factory.mktemp("run") / "out"
    rc, stdout = run_main(tiny_args(tree, out, "--epochs", "2", "--max-bad-images", "0.2", "--time-head-steps", "0"))
    return tree, out, rc, stdout


def test_unreadable_images_are_skipped_reported_once_and_counted(spoiled_run):
    tree, out, rc, stdout = spoiled_run
    assert rc == 0
    for name in ("train/c1/3.png", "val/c2/0.png"):
        lines = [line for line in stdout.splitlines() if line.startswith("warning: skipped unreadable")]
        assert sum(str(tree / name) in line for line in lines) == 1, stdout
    rows = read_summary(out / "summary.csv")
    assert [(r["train_bad_images"], r["val_bad_images"]) for r in rows] == [("1", "1"), ("1", "1")]
    assert "skipped unreadable images: 1 train, 1 val" in stdout
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["metrics"]["val_bad_images"] == 1


def test_a_corrupt_summary_on_resume_is_one_error(spoiled_run, capsys):
    tree, out, rc, _ = spoiled_run
    assert rc == 0
    (out / "summary.csv").write_text("epoch,lr\nnot-a-number,0.1\n")
    argv = tiny_args(tree, out, "--epochs", "3", "--max-bad-images", "0.2", "--resume", str(out / "last.pth"))
    assert run_main(argv)[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and "summary.csv is not a summary.csv of this pipeline" in err


def test_too_many_unreadable_images_stop_the_run(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    spoil(tree / "train" / "c0" / "0.png", "corrupt")
    rc, _ = run_main(tiny_args(tree, tmp_path / "out"))  # default --max-bad-images 0.01: 1 of 24 is too many
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: 1 of the 24 training images are unreadable (more than --max-bad-images 0.01" in err
    assert str(tree / "train" / "c0" / "0.png") in err


def test_the_epoch_checkpoint_is_written_before_validation(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    for k in range(3):
        spoil(tree / "val" / f"c{k}" / "1.png", "truncated")  # 3 of 12 validation images
    rc, _ = run_main(tiny_args(tree, tmp_path / "out", "--max-bad-images", "0.1"))
    err = capsys.readouterr().err
    assert rc == 2 and "error: 2 of the 12 validation images are unreadable" in err
    state = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    assert state["epoch"] == 0 and state["metrics"]["train_bad_images"] == 0 and "val_loss" not in state["metrics"]
    assert not (tmp_path / "out" / "best.pth").exists()


# ---------------------------------------------------------------------------------------------------------
# a non-finite loss: the pooling or the learning rate


class TinyNet(nn.Module):
    """layer_reduce_relu -> a 'pooling' -> fc, like ResNet3G's head; `pool_nan` makes the pooling non-finite."""

    def __init__(self, pool_nan: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.layer_reduce_relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        self.pool_nan = pool_nan

    def forward(self, x):
        y = self.layer_reduce_relu(self.conv(x)).mean(dim=(2, 3))
        if self.pool_nan:
            y = y * float("nan")
        return self.fc(y)


class ListLoader(list):
    dataset = range(8)
    batch_size = 2


def one_epoch(model, lr=0.01):
    args = argparse.Namespace(
        freeze_bn=False,
        epochs=1,
        print_freq=1,
        channels_last=False,
        amp="none",
        clip_grad=0.0,
        pool_backend="ext",
        iters=5,
        max_bad_images=0.01,
    )
    batches = ListLoader((torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), []) for _ in range(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with contextlib.redirect_stdout(io.StringIO()):
        return engine.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, batches, 0, args, DistInfo(), scaler)


def test_a_non_finite_pooling_output_is_named():
    with pytest.raises(UserError) as exc:
        one_epoch(TinyNet(pool_nan=True))
    msg = str(exc.value)
    assert "non-finite output of cov_pool (backend 'ext', iters 5) at step 0" in msg and "--lr" not in msg


def test_a_diverging_network_keeps_the_lr_hint():
    model = TinyNet(pool_nan=False)
    with torch.no_grad():
        model.conv.weight.fill_(float("inf"))  # non-finite before the pooling
    with pytest.raises(UserError) as exc:
        one_epoch(model)
    msg = str(exc.value)
    assert "lower --lr" in msg and "cov_pool" not in msg


def test_finite_training_is_unaffected():
    stats = one_epoch(TinyNet(pool_nan=False))
    assert np.isfinite(stats["loss"]) and stats["bad_images"] == 0 and stats["images"] == 8


# ---------------------------------------------------------------------------------------------------------
# load_checkpoint on damaged files


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.pth"
    torch.save({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b"", "the file is empty (0 bytes)"),
        (lambda b: b[: len(b) // 2], "the file is truncated or corrupt (torch.load: PytorchStreamReader failed"),
        (lambda b: b"\x00garbage" * 50, "not a file written by torch.save (starts with b'\\x00gar'"),
    ],
    ids=["empty", "truncated", "corrupt"],
)
def test_load_checkpoint_on_a_damaged_file(good_file, tmp_path, damage, reason):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(damage(good_file.read_bytes()))
    with pytest.raises(CheckpointFormatError) as exc:
        load_checkpoint(nn.Linear(3, 2), str(bad))
    msg = str(exc.value)
    assert msg.startswith(f"{bad}: ") and reason in msg and "weights_only" not in msg
    assert set(read_checkpoint_file(good_file)) == {"fc.weight", "fc.bias"}


def test_the_pipeline_reports_a_truncated_checkpoint(tmp_path, capsys, good_file):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good_file.read_bytes()[:100])
    tree = make_tree(tmp_path / "tree", train=1, val=1)
    assert main(tiny_args(tree, tmp_path / "o", "--evaluate", "--checkpoint", str(bad))) == 2
    err = capsys.readouterr().err
    assert "cannot be read as a checkpoint" in err and "truncated or corrupt" in err and "Traceback" not in err


def test_help_shows_every_options_default_and_no_none():
    """--help: every option says what it does; defaults are shown where there is one ('(default: None)' never, the
    help text saying what happens then)."""
    from train.config import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text
    assert "SGD momentum (default: 0.9)" in text and "(default: 0.1)" in text
    assert not [a.option_strings for a in parser._actions if a.option_strings and not a.help]
