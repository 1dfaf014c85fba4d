"""--resume: a run SIGKILLed in the middle of its second epoch, resumed from last.pth, ends with the same
weights, optimizer state and per-epoch metrics as an uninterrupted run with the same seed.

Tolerance: exact (max |difference| == 0). Both runs are deterministic CPU processes with the same thread
count, the resumed run restores weights, momentum buffers, scheduler and RNG states bit for bit, and the
augmentation of each sample is seeded by (seed, epoch, index) (train/data.py), so nothing differs.
Measured 2026-11-26: 0.0 for every tensor of the model and of the optimizer state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from .test_train import REPO, make_tree, read_summary, tiny_args

EPOCHS = 2
STEPS = 6  # 24 training images, batch 4


def command(tree, out, *extra):
    # Augmentation on (RandomResizedCrop + flip) so that its seeding is part of what is checked.
    return [
        sys.executable,
        "-m",
        "train",
        *tiny_args(tree, out, "--epochs", str(EPOCHS), "--print-freq", "1", "--crop-scale", "0.3", "1.0", *extra),
    ]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=2, train=12, val=3)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(command(tree, full), cwd=REPO, check=True, capture_output=True, timeout=600)

    # Kill the second run once it reports step 2 of epoch 1 (the second epoch): the progress line is
    # printed after that step's optimizer update, with STEPS - 2 steps and the epoch's checkpoint to go.
    proc = subprocess.Popen(command(tree, cut), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"Epoch 1/{EPOCHS - 1} [2/{STEPS}]"):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    killed_at = torch.load(cut / "last.pth", weights_only=True)
    assert killed_at["epoch"] == 0, "the kill did not land in epoch 1"
    assert [r["epoch"] for r in read_summary(cut / "summary.csv")] == ["0"]
    assert not [f for f in os.listdir(cut) if f.endswith(".tmp")]

    resumed = subprocess.run(
        command(tree, cut, "--resume", str(cut / "last.pth")), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a = torch.load(full / "last.pth", weights_only=True)
    b = torch.load(cut / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    worst = max(
        (x.double() - b["model"][k].double()).abs().max().item() for k, x in a["model"].items() if x.is_floating_point()
    )
    assert worst == 0.0, f"weights differ by up to {worst}"
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    rows_a, rows_b = read_summary(full / "summary.csv"), read_summary(cut / "summary.csv")
    assert [r["epoch"] for r in rows_b] == [str(e) for e in range(EPOCHS)]
    drop = ("train_img_s", "epoch_s")  # timings
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_a] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows_b
    ]


@pytest.mark.slow
def test_resume_applies_this_runs_schedule_and_lr(tmp_path):
    """Resumed with --epochs and --lr changed: the learning rates of the epochs that follow are those of this run's
    options (a cosine curve over the new --epochs, from the new --lr), not the checkpoint's schedule."""
    import math

    tree = make_tree(tmp_path / "tree", classes=2, train=8, val=2)
    out = tmp_path / "run"
    first = [sys.executable, "-m", "train", *tiny_args(tree, out, "--epochs", "2", "--lr-schedule", "cosine")]
    subprocess.run(first, cwd=REPO, check=True, capture_output=True, timeout=600)
    more = [
        sys.executable,
        "-m",
        "train",
        *tiny_args(tree, out, "--epochs", "4", "--lr-schedule", "cosine", "--lr", "0.02"),
        "--resume",
        str(out / "last.pth"),
    ]
    resumed = subprocess.run(more, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "lr 0.01 -> 0.02" in resumed.stdout, resumed.stdout[-2000:]
    rows = read_summary(out / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    for epoch in (2, 3):
        want = 0.02 * 0.5 * (1 + math.cos(math.pi * epoch / 4))
        assert abs(float(rows[epoch]["lr"]) - want) <= 1e-5 * want, (epoch, rows[epoch]["lr"], want)
