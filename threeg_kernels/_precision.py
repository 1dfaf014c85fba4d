"""What keeps a computation in its compute dtype whatever the caller's process-wide settings: autocast off, and
float32 matrix products in IEEE float32 (precision='ieee') even when the caller's script allows TF32 or bf16
for them.

Both are context managers for the op bodies (threeg_kernels/backends/*_impl.py): an op body runs at run time
under torch.compile too (the registered op is one opaque node) and while a CUDA graph is captured (the products
are captured with the math mode in force when they are issued), so that is where they hold. Entered in traced
code, a global-flag context would act only while tracing.

The caller's matmul precision is read and written through the fp32_precision settings of
torch.backends.cuda.matmul and torch.backends.mkldnn.matmul (torch >= 2.9), which the older spellings
(`torch.backends.cuda.matmul.allow_tf32`, `torch.set_float32_matmul_precision`) also set: reading them never
fails, whichever spelling the caller used (torch's legacy getters refuse to answer after a mix of spellings).
Older torch has one process-wide setting, torch.get_float32_matmul_precision(). The compiled CUDA kernels do the
same in C++ (csrc/cuda/cov_pool_ext.cu, IeeeMatmul).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class MatmulSetting:
    """One setting that decides whether float32 products may run in a faster mode."""

    read: Callable[[], str]
    write: Callable[[str], None]
    exact: tuple[str, ...]  # the values that allow no faster mode
    ieee: str  # the value written to force IEEE float32
    unset: Optional[str] = None  # the value that inherits a wider setting, where there is one


def _fp32_precision(setting) -> MatmulSetting:
    return MatmulSetting(
        read=lambda: setting.fp32_precision,
        write=lambda value: setattr(setting, "fp32_precision", value),
        exact=("ieee", "none"),
        ieee="ieee",
        unset="none",
    )


# torch < 2.9 has one process-wide setting, for CUDA's TF32 and oneDNN's bf16 alike (allow_tf32 reads it too).
LEGACY_SETTING = MatmulSetting(
    read=torch.get_float32_matmul_precision,
    write=torch.set_float32_matmul_precision,
    exact=("highest",),
    ieee="highest",
)

# The setting that governs the matrix products of each device type: cuBLAS's on CUDA; oneDNN's (mkldnn) on CPU,
# whose 'bf16' mode (what torch.set_float32_matmul_precision("medium") selects) runs float32 bmm in bf16 pieces on
# CPUs with bf16 instructions.
if hasattr(torch.backends.mkldnn, "matmul"):  # torch >= 2.9
    MATMUL_SETTINGS = {
        "cuda": _fp32_precision(torch.backends.cuda.matmul),
        "cpu": _fp32_precision(torch.backends.mkldnn.matmul),
    }
else:
    MATMUL_SETTINGS = {"cuda": LEGACY_SETTING, "cpu": LEGACY_SETTING}


def no_autocast(device_type: str):
    """Autocast off, where the device type has autocast. Inside an op body: an op called in an autocast region
    (its backward, too, when loss.backward() runs inside one) would otherwise have its products cast to
    float16/bfloat16 by autocast, or fail on the mixed dtypes that follow. In eager code where autocast is off
    already, nothing is entered (torch.autocast's own Python costs ~15 us a call); traced code always gets the
    context, which torch.compile records."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = torch.amp.is_autocast_available(device_type)
        if not torch.compiler.is_compiling():
            # (not while torch.compile traces: a global that changes under the trace fails the guards it installs,
            # "Guard failed on the same frame it was created")
            _AUTOCAST_AVAILABLE[device_type] = available
    if not available:
        return _NULL_CONTEXT
    if torch.is_autocast_enabled(device_type) or torch.compiler.is_compiling():
        return torch.autocast(device_type=device_type, enabled=False)
    return _NULL_CONTEXT


# per device type: fixed for the process; the common ones filled here, so that traced code finds them
_AUTOCAST_AVAILABLE: dict[str, bool] = {d: torch.amp.is_autocast_available(d) for d in ("cpu", "cuda")}
_NULL_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


@contextlib.contextmanager
def ieee_matmul(device_type: str):
    """Float32 matrix products on `device_type` in IEEE float32 inside the block; the caller's setting is
    restored on exit (exceptions included). Does nothing where the setting already allows no faster mode."""
    setting = MATMUL_SETTINGS.get(device_type)
    before = None if setting is None else setting.read()
    if before is None or before in setting.exact:
        yield
        return
    setting.write(setting.ieee)
    try:
        yield
    finally:
        _restore(setting, before)


def _restore(setting: MatmulSetting, before: str) -> None:
    """Puts back the caller's value. fp32_precision's getter reports the effective value, which may have come from
    a wider setting (torch.backends.fp32_precision) while this one was 'none': then 'none' restores it, and keeps
    it following the wider one."""
    if setting.unset is not None:
        setting.write(setting.unset)
        if setting.read() == before:
            return
    setting.write(before)
