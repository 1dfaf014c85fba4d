"""Loading weights into a ResNet-3G: a plain state_dict, the released checkpoints, this project's checkpoints.

Accepted layouts (as a dict or a file path):
- a plain state_dict (every value a tensor);
- the released 3G-Net files: {'state_dict': ..., 'epoch', 'arch', 'best_prec1', 'optimizer', ...} saved
  from nn.DataParallel, keys prefixed 'module.';
- this project's training checkpoints: {'model': state_dict, 'optimizer': ..., 'epoch': ..., 'args': ...}.
Prefixes 'module.' (DataParallel / DistributedDataParallel) and '_orig_mod.' (torch.compile) are
stripped when every key has them; a wrapped model (DataParallel, DDP, torch.compile) is loaded through
the module it wraps.

Everything is checked before anything is copied: a strict load that fails leaves the model untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from .resnet_3g import list_models

_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
# BatchNorm counters that checkpoints from PyTorch < 0.4.1 lack; BatchNorm itself tolerates their absence.
_OPTIONAL_SUFFIX = ".num_batches_tracked"
_LIST_AT_MOST = 20


class CheckpointFormatError(ValueError):
    """The object or file is not a state_dict nor a dict holding one under 'state_dict' or 'model'."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes differ from the model's. `.report` holds the details; nothing was loaded."""

    def __init__(self, report: LoadReport):
        self.report = report
        super().__init__(report.describe(failed=True))


@dataclass
class LoadReport:
    """What load_checkpoint found and did. mismatched: (key, checkpoint shape, model shape)."""

    source: str
    stripped_prefixes: tuple = ()
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    defaulted: list = field(default_factory=list)  # optional BN counters absent from the checkpoint, left as is

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, failed: bool = False) -> str:
        stripped = (
            f", stripped prefix {' then '.join(map(repr, self.stripped_prefixes))}" if self.stripped_prefixes else ""
        )
        head = (
            f"checkpoint ({self.source}{stripped}) does not match the model"
            if failed
            else (f"loaded {len(self.loaded)} tensors ({self.source}{stripped})")
        )
        lines = [head]
        for title, keys in (
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
        ):
            if keys:
                lines.append(f"  {len(keys)} {title}: {_short_list(keys)}")
        if self.mismatched:
            shapes = [f"{k} (checkpoint {list(c)}, model {list(m)})" for k, c, m in self.mismatched]
            lines.append(f"  {len(shapes)} with a different shape: {_short_list(shapes)}")
        if self.defaulted:
            lines.append(f"  {len(self.defaulted)} BatchNorm counters absent (old checkpoint), left as they were")
        lines += [f"  hint: {h}" for h in self._hints()]
        if failed:
            lines.append("  nothing was loaded: the model is unchanged (strict=False loads the matching keys)")
        return "\n".join(lines)

    def _hints(self) -> list[str]:
        hints = []
        shapes = {k: (c, m) for k, c, m in self.mismatched}
        if "fc.weight" in shapes:
            (ck, _), (mk, _) = shapes["fc.weight"]
            hints.append(
                f"the checkpoint's fc has {ck} classes and the model's {mk}: build the model with num_classes={ck} "
                "(Places365 checkpoints: the *_3g_365 models), or load with strict=False to keep the model's fc "
                "(fine-tuning to new classes)"
            )
        backbone = [k for k in self.missing + self.unexpected + list(shapes) if re.match(r"layer\d\.|conv1\.", k)]
        if backbone:
            hints.append(
                "backbone keys differ: the checkpoint is probably of another depth "
                f"(18/34: BasicBlock, 23/50/101/152: Bottleneck); models: {', '.join(list_models())}"
            )
        return hints

    def __str__(self) -> str:
        return self.describe()


def _short_list(items: list) -> str:
    shown = ", ".join(items[:_LIST_AT_MOST])
    return shown + (f", ... ({len(items) - _LIST_AT_MOST} more)" if len(items) > _LIST_AT_MOST else "")


def read_checkpoint_file(path, weights_only: bool = True):
    """torch.load on the CPU; with weights_only, tensors and plain data only (argparse.Namespace allowed),
    and a file needing more raises CheckpointFormatError saying how to load a trusted one. An empty,
    truncated or corrupt file raises CheckpointFormatError saying so."""
    _check_file_header(path)
    try:
        # Training checkpoints may hold argparse args; a Namespace is plain data, safe to rebuild.
        # (torch.serialization.safe_globals is torch >= 2.5; pyproject.toml allows 2.4.)
        safe_globals = getattr(torch.serialization, "safe_globals", None)
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError) as exc:  # a zip archive cut short or damaged, a pickle cut short
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise CheckpointFormatError(
            f"{os.fspath(path)}: the file is truncated or corrupt (torch.load: {reason}); copy or save it again"
        ) from exc
    except pickle.UnpicklingError as exc:
        if not weights_only:
            raise
        reason = str(exc).strip().splitlines()[0]
        raise CheckpointFormatError(
            f"{os.fspath(path)}: torch.load(weights_only=True) refused an object in this file ({reason}). "
            "Old checkpoints can pickle arbitrary Python objects; if you trust this file, call "
            "load_checkpoint(..., weights_only=False), which unpickles it in full (it can run code)."
        ) from exc


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (a zip archive)
_PICKLE_PROTO = 0x80  # the legacy format: pickles, the first one starting with the protocol opcode


def _check_file_header(path) -> None:
    """CheckpointFormatError for an empty file or one that torch.save cannot have written (first bytes);
    a missing or unreadable file keeps its OSError."""
    if not isinstance(path, (str, os.PathLike)):
        return  # a file-like object: torch.load reports
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointFormatError(f"{os.fspath(path)}: the file is empty (0 bytes); copy or save it again")
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        raise CheckpointFormatError(
            f"{os.fspath(path)}: not a file written by torch.save (starts with {head!r}, "
            f"neither a zip archive nor a pickle); the file is corrupt or of another kind"
        )


def _state_dict_of(obj) -> tuple[dict, str]:
    """(the state_dict inside obj, a name for its layout) or CheckpointFormatError."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), "module"
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"expected a state_dict or a dict holding one under 'state_dict' or 'model'; got {type(obj).__name__}"
        )
    source = "plain state_dict"
    if not (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if key is None:
            raise CheckpointFormatError(
                "expected a state_dict (str -> tensor) or a dict holding one under 'state_dict' (released 3G-Net "
                "files) or 'model' (this project's training checkpoints); "
                + (f"got a dict with keys {_short_list(sorted(map(str, obj)))}" if obj else "got an empty dict")
            )
        obj = obj[key].state_dict() if isinstance(obj[key], nn.Module) else obj[key]
        source = f"dict with {key!r}"
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise CheckpointFormatError(
            f"the state_dict ({source}) must map str keys to tensors; "
            + (f"these entries do not: {_short_list(bad)}" if bad else "it is empty")
        )
    return dict(obj), source


def _strip_prefixes(state_dict: dict) -> tuple[dict, tuple]:
    stripped = []
    while True:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            return state_dict, tuple(stripped)
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
        stripped.append(prefix)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def load_checkpoint(
    model: nn.Module,
    path_or_dict: Union[str, os.PathLike, Mapping],
    strict: bool = True,
    *,
    weights_only: bool = True,
) -> LoadReport:
    """Copies a checkpoint's tensors into `model` and returns a LoadReport.

    Args:
        model: the model (a ResNet3G, or any nn.Module; DataParallel / DDP / torch.compile wrappers are seen through).
        path_or_dict: a file path (read with torch.load on the CPU) or an already loaded object: a
            state_dict, a dict with 'state_dict' (released 3G-Net files, 'module.' prefixes) or 'model'
            (this project's training checkpoints).
        strict: True: any missing, unexpected or wrong-shaped key raises CheckpointMismatchError before
            anything is copied. False: the keys present in both with equal shapes are loaded, the rest
            reported (e.g. an ImageNet checkpoint into a 365-class model: everything but fc).
        weights_only: passed to torch.load for paths. Keep True unless you trust the file: an old pickle
            that needs more than tensors and plain containers raises CheckpointFormatError saying so.

    Raises:
        CheckpointFormatError (ValueError) for something that is not a checkpoint, or a file that is empty,
            truncated or corrupt (the message says which);
        CheckpointMismatchError (ValueError) on a strict mismatch, listing missing, unexpected and
        wrong-shaped keys with hints (e.g. num_classes for a fc of another size).
    """
    path = None
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        path_or_dict = read_checkpoint_file(path_or_dict, weights_only)
    try:
        state_dict, source = _state_dict_of(path_or_dict)
    except CheckpointFormatError as e:
        if path is None:
            raise
        raise CheckpointFormatError(f"{path}: {e}") from None
    if path is not None:
        source = f"{path}, {source}"  # the file in every message and in the report
    state_dict, stripped = _strip_prefixes(state_dict)

    target = _unwrap(model)
    own = target.state_dict()
    report = LoadReport(source=source, stripped_prefixes=stripped)
    # Only a checkpoint without any counter is an old one; a missing counter among others is a real gap.
    old_format = not any(k.endswith(_OPTIONAL_SUFFIX) for k in state_dict)
    for key, value in own.items():
        if key not in state_dict:
            (report.defaulted if old_format and key.endswith(_OPTIONAL_SUFFIX) else report.missing).append(key)
        elif tuple(state_dict[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(state_dict[key].shape), tuple(value.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state_dict if k not in own]

    if strict and not report.ok:
        raise CheckpointMismatchError(report)
    target.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=False)
    return report
