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

Two file formats (--save-format), the same dict in both:
    last.pth / best.pth                  torch.save of the dict
    last.safetensors / best.safetensors  every tensor of the dict as a safetensors tensor named by its path in
        the dict ('model/conv1.weight', 'optimizer/state/0/momentum_buffer', 'rng/torch', ...), and the
        rest of the dict (epoch, args, param groups, scheduler, ...) as JSON in the header's metadata under
        'threeg.checkpoint', where each tensor is {"__tensor__": "<its name>"}. Dicts with keys other than
        strings (the optimizer's state, keyed by parameter index) are {"__items__": [[key, value], ...]},
        tuples {"__tuple__": [...]}. load() rebuilds the dict from either.
A .safetensors file without that metadata is read as a plain state dict (e.g. backbone weights).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from threeg_kernels.models import read_checkpoint_file

FORMAT = 1
SAVE_FORMATS = ("pth", "safetensors")
SAFETENSORS_KEY = "threeg.checkpoint"


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


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict, storages: set) -> Any:
    """obj as JSON-able data, its tensors moved into `tensors` under their path in obj."""
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"checkpoint entry {path}: two tensors would have this name (a key holds '/')")
        t = obj.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # safetensors refuses tensors that share memory
        if t.numel():
            storages.add(t.untyped_storage().data_ptr())
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(path, k), tensors, storages) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, _join(path, k), tensors, storages)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors, storages) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint entry {path or '/'}: cannot be saved as safetensors ({type(obj).__name__})")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "the safetensors format needs the safetensors package (pip install safetensors, or the [timm] extra)"
        ) from None
    return safetensors.torch


def save_safetensors_atomic(obj: dict, path: str) -> None:
    tensors: dict = {}
    text = json.dumps(_encode(obj, "", tensors, set()))
    data = _safetensors().save(tensors, metadata={"format": "pt", SAFETENSORS_KEY: text})
    _atomic(path, lambda f: f.write(data))


def save(obj: dict, path: str) -> None:
    """Atomic write of a checkpoint dict, in the format that path's suffix names (.safetensors, else torch.save)."""
    if path.endswith(".safetensors"):
        save_safetensors_atomic(obj, path)
    else:
        save_atomic(obj, path)


def load_safetensors(path: str) -> dict:
    st = _safetensors()
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    tensors = st.load_file(path, device="cpu")
    if SAFETENSORS_KEY not in metadata:
        return tensors  # a plain state dict
    return _decode(json.loads(metadata[SAFETENSORS_KEY]), tensors)


def load(path: str) -> dict:
    """The checkpoint at path: a .safetensors file (this pipeline's layout, or a plain state dict), else read as
    load_checkpoint reads files (weights_only: a file needing more than tensors and plain data is refused,
    not unpickled)."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return read_checkpoint_file(path, weights_only=True)


def fc_classes(state: dict) -> int | None:
    """The number of classes of the fc layer in any checkpoint layout (plain, {'state_dict': ...} with
    'module.' keys as released by 3G-Net, or this pipeline's {'model': ...}); None if there is no fc."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    for name in ("fc.weight", "module.fc.weight", "head.fc.weight", "module.head.fc.weight"):
        w = state.get(name)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None
