"""Checkpoint files: written atomically, complete enough to resume a run exactly.

A checkpoint is a dict:
    model         state_dict of the bare model (no 'module.' prefix)
    optimizer     SGD state (momentum buffers)
    lr_scheduler  scheduler state
    scaler        GradScaler state (fp16), else None
    epoch         the last completed epoch (0-based); --resume starts at epoch + 1
    best_top1, best_epoch
    metrics       that epoch's summary.csv row
    args          the run's options (a dict)
    classes       the class names (ImageFolder order) the fc layer was trained on
    sampler       {'seed', 'epoch', 'num_replicas'}: the data order of the next epoch (seed + epoch)
    rng           {'torch', 'cuda', 'numpy', 'python'} generator states of the primary rank
It holds only tensors and plain Python values, so torch.load(..., weights_only=True) reads it.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from threeg_kernels.models import read_checkpoint_file

FORMAT = 1


def _atomic(path: str, write: Callable[[Any], None]) -> None:
    """Writes through a temporary file in the same directory, fsyncs it and renames it over `path`:
    a crash or an exception leaves either the old file or the new one, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_atomic(obj: Any, path: str) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def copy_atomic(src: str, dst: str) -> None:
    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=16 << 20)

    _atomic(dst, write)


def write_text_atomic(text: str, path: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate((3, tuple(state["python"]), None))


def load(path: str) -> dict:
    """The checkpoint at path, read as load_checkpoint reads files (weights_only: a file needing more
    than tensors and plain data is refused, not unpickled)."""
    return read_checkpoint_file(path, weights_only=True)


def fc_classes(state: dict) -> int | None:
    """The number of classes of the fc layer in any checkpoint layout (plain, {'state_dict': ...} with
    'module.' keys as released by 3G-Net, or this pipeline's {'model': ...}); None if there is no fc."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    for name in ("fc.weight", "module.fc.weight"):
        w = state.get(name)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None
