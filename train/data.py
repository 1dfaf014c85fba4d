"""Datasets, transforms and loaders: torchvision ImageFolder trees (root/train/<class>/*, root/val/<class>/*).

Augmentation is seeded per sample: before the transform of sample i in epoch e runs, torch's RNG is
seeded from (seed, e, i) inside a forked RNG state. The images a step sees therefore depend neither on the
number of ranks, nor on the number of loader workers, nor on whether the run was resumed, which is what
makes a resumed run and a 1-process run of a torchrun job reproduce the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from torchvision import datasets, transforms

from .config import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StackCrops:
    """TenCrop's tuple of PIL crops -> one (ncrops, 3, H, W) normalised tensor."""

    def __init__(self):
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.to_tensor(c) for c in crops])


def train_transform(args) -> transforms.Compose:
    if args.train_crop == "center":
        steps = [transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size)]
    else:
        steps = [transforms.RandomResizedCrop(args.image_size, scale=tuple(args.crop_scale))]
    if args.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def eval_transform(args) -> transforms.Compose:
    """Resize + CenterCrop (1-crop) -> (3, H, W), or Resize + TenCrop -> (10, 3, H, W)."""
    if args.ten_crop:
        return transforms.Compose([transforms.Resize(args.val_resize), transforms.TenCrop(args.val_crop), StackCrops()])
    return transforms.Compose(
        [
            transforms.Resize(args.val_resize),
            transforms.CenterCrop(args.val_crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class BadImage(NamedTuple):
    """What a dataset item is when its file cannot be decoded: the collate function drops it and counts it."""

    path: str
    reason: str


class SkippingImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable files (truncated, corrupt, not an image) give a BadImage item instead of
    raising in a loader worker, so that one bad file does not end a run (see collate_skipping_bad)."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return BadImage(self.samples[index][0], f"{type(e).__name__}: {reason}")


def collate_skipping_bad(batch: list):
    """(images, target, bad): the batch without its BadImage items (images and target are None if none
    is left), and the list of those BadImages."""
    bad = [b for b in batch if isinstance(b, BadImage)]
    good = [b for b in batch if not isinstance(b, BadImage)]
    if not good:
        return None, None, bad
    images, target = default_collate(good)
    return images, target, bad


def image_folder(root: str, split: str, transform) -> datasets.ImageFolder:
    """ImageFolder of root/split, with a UserError naming the path when it is missing or empty."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f"--data {root}: no directory {path} (expected an ImageFolder tree with train/ and val/)")
    try:
        return SkippingImageFolder(path, transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"--data {root}: {path} holds no usable images: {e}") from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class PerSampleSeeded(Dataset):
    """Wraps a dataset; item (index, epoch) runs its transform under an RNG seeded from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class EpochTaggedSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, rank r takes every world_size-th index) yielding
    (index, epoch) pairs for PerSampleSeeded. Rank r's k-th batch of B / world_size indices and the other
    ranks' k-th batches together are exactly the k-th batch of B indices of a 1-process run."""

    def __iter__(self):
        epoch = self.epoch
        return ((i, epoch) for i in super().__iter__())

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "num_replicas": self.num_replicas}


class ShardSampler(Sampler):
    """Evaluation: rank r takes indices r, r + W, r + 2W, ... with no padding, so no image counts twice."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset, args, info, per_rank_batch: int) -> DataLoader:
    sampler = EpochTaggedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed)
    return DataLoader(
        PerSampleSeeded(dataset, args.seed),
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        collate_fn=collate_skipping_bad,
    )


def val_loader(dataset, args, info, per_rank_batch: int) -> DataLoader:
    # 10 crops an image: as many crops a batch as a 1-crop batch has images.
    batch = max(1, per_rank_batch // 10) if args.ten_crop else per_rank_batch
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        num_workers=args.workers,
        pin_memory=info.device.type == "cuda",
        collate_fn=collate_skipping_bad,
    )


# ---------------------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits as an ImageFolder tree (the demo's data; ships inside the sklearn wheel).

DIGITS_MARKER = "digits.json"


def digits_spec(val_fraction: float, split_seed: int) -> dict:
    return {
        "source": "sklearn.datasets.load_digits",
        "format": 1,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
    }


def check_digits_tree(root: str, val_fraction: float, split_seed: int) -> bool:
    """True if root already holds this split; False if root is absent or empty; UserError if it holds
    anything else (it is never overwritten)."""
    if not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root)):
        return False
    marker = os.path.join(root, DIGITS_MARKER)
    if not os.path.isfile(marker):
        raise UserError(
            f"--data {root}: exists and is not a digits tree written by this program; "
            "choose another --data (it is not overwritten)"
        )
    with open(marker) as f:
        found = json.load(f)
    want = digits_spec(val_fraction, split_seed)
    if {k: found.get(k) for k in want} != want:
        raise UserError(f"--data {root}: holds a digits split with {found}, not {want}; choose another --data")
    return True


def write_digits_tree(root: str, val_fraction: float, split_seed: int) -> None:
    """Writes root/{train,val}/<digit>/<index>.png (8x8 grayscale, 0..16 scaled to 0..255), a stratified
    split with a fixed seed. Built in a temporary sibling directory and renamed into place."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, stratify=digits.target, random_state=split_seed
    )
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in idx:
                folder = os.path.join(tmp, split, str(digits.target[i]))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(images[i]).save(os.path.join(folder, f"{i:04d}.png"))
        spec = dict(digits_spec(val_fraction, split_seed), train=len(train_idx), val=len(val_idx))
        with open(os.path.join(tmp, DIGITS_MARKER), "w") as f:
            json.dump(spec, f, indent=1)
        if os.path.isdir(root):
            os.rmdir(root)  # empty (check_digits_tree refused anything else)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_digits_tree(root: str, val_fraction: float, split_seed: int) -> Optional[str]:
    """Writes the tree unless it is there; returns a line for the log, or None if nothing was written."""
    if check_digits_tree(root, val_fraction, split_seed):
        return None
    write_digits_tree(root, val_fraction, split_seed)
    return f"wrote scikit-learn digits as an ImageFolder tree at {root}"
