"""torchrun DDP: 2 CPU processes (gloo) on a global batch of 4 give the losses, accuracies and weights of
1 process on the same global batch of 4.

Why --freeze-bn: in training mode BatchNorm normalises with the statistics of each rank's own batch (2
images here), a 1-process run with those of the whole batch (4), so the two runs compute different
functions; SyncBatchNorm would make them equal but runs on CUDA only. With BatchNorm frozen (running
statistics used, affine parameters trained) every sample's loss depends on that sample alone, and DDP's
averaged gradient of two half-batch means equals the gradient of the full-batch mean. The data side is
exact by construction: DistributedSampler's rank r takes every 2nd index of the same seeded permutation,
so the two ranks' k-th batches together are the 1-process run's k-th batch, and augmentation is seeded
per sample (train/data.py).

Both runs use one thread a process (torchrun's default for several processes), so the only differences
are the order of float32 sums (the all-reduce, and the batch split inside convolutions and matmuls).
Tolerance: 1e-5 relative on losses, 1e-4 relative (to the largest weight of each tensor) on weights.
Measured 2026-11-26 (2 epochs, 6 steps each): train and val losses identical in all 6 decimals
summary.csv holds; worst weight difference 2.0e-6 relative.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from .test_train import REPO, make_tree, read_summary, tiny_args

LOSS_RTOL, WEIGHT_RTOL = 1e-5, 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [0, 1], ids=["all-trained", "backbone-frozen-in-epoch-0"])
def test_two_gloo_ranks_match_one_process(tmp_path, freeze):
    """With freeze = 1 the DDP wrapper of epoch 0 reduces the head's gradients only and is replaced by one over
    every parameter for epoch 1."""
    tree = make_tree(tmp_path / "tree", classes=3, train=8, val=4)
    args = tiny_args(tree, "OUT", "--epochs", "2", "--freeze-bn", "--crop-scale", "0.3", "1.0")
    args += ["--freeze-backbone-epochs", str(freeze)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"

    one = subprocess.run(
        [sys.executable, "-m", "train", *[str(tmp_path / "one") if a == "OUT" else a for a in args]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "train",
            *[str(tmp_path / "two") if a == "OUT" else a for a in args],
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 rank(s) on cpu, batch 4 (2 a rank)" in two.stdout
    assert two.stdout.count("epoch 1: train loss") == 1  # logged by rank 0 only

    rows1, rows2 = read_summary(tmp_path / "one" / "summary.csv"), read_summary(tmp_path / "two" / "summary.csv")
    assert len(rows1) == len(rows2) == 2
    for r1, r2 in zip(rows1, rows2):
        for key in ("train_loss", "val_loss"):
            a, b = float(r1[key]), float(r2[key])
            assert abs(a - b) <= LOSS_RTOL * abs(a), f"epoch {r1['epoch']} {key}: {a} vs {b}, rel {abs(a - b) / a:.1e}"
        for key in ("train_top1", "val_top1"):
            assert r1[key] == r2[key]

    w1 = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["model"]
    assert w1.keys() == w2.keys()
    worst = max(
        ((w1[k] - w2[k]).abs().max() / w1[k].abs().max().clamp_min(1e-12)).item()
        for k in w1
        if w1[k].is_floating_point()
    )
    assert worst <= WEIGHT_RTOL, f"weights differ by {worst:.1e} relative"
    print(
        f"DDP vs 1 process: losses {[(r1['train_loss'], r2['train_loss']) for r1, r2 in zip(rows1, rows2)]}, "
        f"worst relative weight difference {worst:.2e}"
    )
