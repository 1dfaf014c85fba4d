"""The one place that knows the backends: which exist, which work on a device, and which 'auto' picks.

Every backend module is imported once, here, each in its own try (importing threeg_kernels never
needs Triton or the compiled extension); one that cannot load records the reason, and asking for it
raises that reason.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from . import autoselect
from .backends import Loaded

BACKENDS = ("reference", "torch", "triton", "ext")

# Preference of backend="auto", fastest first, per device type. CPU: measured (docs/benchmark.md, "Measurement
# log"). CUDA: a fixed order chosen by design (fused Triton kernels, then the extension's cuBLAS products, then
# batched ATen), never measured on a GPU; 'auto' on CUDA measures per shape instead (autoselect.py) and uses
# this order where it does not measure (THREEG_AUTO_TUNE=0, torch.compile, CUDA-graph capture) and for ties.
AUTO_ORDER = {
    "cpu": ("ext", "torch", "reference"),
    "cuda": ("triton", "ext", "torch", "reference"),
}
AUTO_ORDER_OTHER = ("torch", "reference")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name on a device where it cannot run; the message says why."""


def _load(name: str) -> tuple[Optional[Loaded], Optional[str]]:
    try:
        module = importlib.import_module(f"threeg_kernels.backends.{name}_impl")
    except ModuleNotFoundError as exc:
        if exc.name == f"threeg_kernels.backends.{name}_impl":
            return None, "not implemented in this version of threeg_kernels"
        return None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure to load is a reason to report, not to crash on
        return None, f"{type(exc).__name__}: {exc}"
    return module.LOADED, None


_LOADED = {name: _load(name) for name in BACKENDS}


def check_backend(backend, arg: str = "backend") -> None:
    """TypeError / ValueError naming `arg` unless `backend` is 'auto' or one of BACKENDS."""
    if not isinstance(backend, str):
        raise TypeError(f"{arg} must be a str ('auto' or one of {BACKENDS}); got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{arg} must be 'auto' or one of {BACKENDS}; got {backend!r}")


def unavailable_reason(name: str, device) -> Optional[str]:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}; got {name!r}")
    device = torch.device(device)
    missing = _device_missing(device)
    if missing is not None:
        return missing
    loaded, reason = _LOADED[name]
    if loaded is None:
        return f"backend {name!r} could not be loaded ({reason})"
    return loaded.unavailable_on(device)


def _device_missing(device: torch.device) -> Optional[str]:
    """Why `device` does not exist in this process, or None (CPU and meta always exist)."""
    if device.type in ("cpu", "meta"):
        return None
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "is_available"):
        return None  # a device type torch has no status for: let the backends decide
    if not module.is_available():
        return f"torch.{device.type}.is_available() is False"
    count = module.device_count() if hasattr(module, "device_count") else None
    if device.index is not None and count is not None and device.index >= count:
        return f"there is no device {device} (torch.{device.type}.device_count() is {count})"
    return None


def available_backends(device=None) -> list[str]:
    """The backends that can run on `device` (default: CPU), in the order 'auto' prefers them."""
    device = torch.device("cpu" if device is None else device)
    order = AUTO_ORDER.get(device.type, AUTO_ORDER_OTHER)
    ranked = [n for n in order if unavailable_reason(n, device) is None]
    return ranked + [n for n in BACKENDS if n not in ranked and unavailable_reason(n, device) is None]


def forced_backend() -> Optional[str]:
    """The backend THREEG_BACKEND makes 'auto' run (not checked), or None where it leaves 'auto' to decide (unset,
    empty or 'auto'). Read at each call."""
    forced = os.environ.get("THREEG_BACKEND")
    return forced if forced and forced != "auto" else None


def resolve(backend: str, device: torch.device) -> Loaded:
    """Returns the backend to run for `backend` ('auto' or a name) on `device`, or raises why not."""
    check_backend(backend)
    if backend == "auto":
        forced = forced_backend()
        if forced is not None:
            check_backend(forced, arg="the environment variable THREEG_BACKEND")
            backend = forced
        else:
            return _resolve_auto(device)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is not available on {device}: {reason}")
    return _LOADED[backend][0]


_AUTO: dict[tuple[str, ...], Loaded] = {}  # present backends' names -> what a measured 'auto' resolves to


def _resolve_auto(device: torch.device) -> Loaded:
    """'auto' on `device`: the first backend present in AUTO_ORDER or, where autoselect measures, a Loaded whose
    pool asks autoselect.choose at each call (the choice depends on the call's shape)."""
    names = tuple(n for n in AUTO_ORDER.get(device.type, AUTO_ORDER_OTHER) if unavailable_reason(n, device) is None)
    if not names:
        raise BackendUnavailableError(f"no backend of threeg_kernels runs on device {device}")
    if not autoselect.measures(device):
        return _LOADED[names[0]][0]
    loaded = _AUTO.get(names)
    if loaded is None:
        backends = [_LOADED[n][0] for n in names]
        loaded = _AUTO[names] = Loaded(
            pool=functools.partial(_pool_auto, names),
            unavailable_on=lambda device: None,
            precisions=tuple(dict.fromkeys(p for b in backends for p in b.precisions)),
            # what cov_pool's keep_iterates=None becomes: the default of the fixed order's first backend (every
            # backend's default is True)
            keep_iterates=backends[0].keep_iterates,
        )
    return loaded


def _pool_auto(names: tuple[str, ...], x, weight, iters, eps, order, precision, keep_iterates):
    available = {n: _LOADED[n][0] for n in names}
    name, precision = autoselect.choose(x, weight, iters, precision, available)
    return available[name].pool(x, weight, iters, eps, order, precision, keep_iterates)
