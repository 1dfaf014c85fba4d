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
fails, whichever spelling the caller used. The compiled CUDA kernels do the same in C++ (csrc/cuda, IeeeMatmul).
"""

from __future__ import annotations

import contextlib

import torch

# Which fp32_precision setting governs the matrix products of a device type: cuBLAS on CUDA; oneDNN (mkldnn) on
# CPU, whose 'bf16' mode (what torch.set_float32_matmul_precision("medium") selects) runs float32 bmm in bf16
# pieces on CPUs with bf16 instructions.
MATMUL_SETTINGS = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}


def no_autocast(device_type: str):
    """Autocast off, where the device type has autocast. Inside an op body: an op called in an autocast region
    (its backward, too, when loss.backward() runs inside one) would otherwise have its products cast to
    float16/bfloat16 by autocast, or fail on the mixed dtypes that follow."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def ieee_matmul(device_type: str):
    """Float32 matrix products on `device_type` in IEEE float32 inside the block; the caller's setting is
    restored on exit (exceptions included). Does nothing where the setting already allows no faster mode."""
    setting = MATMUL_SETTINGS.get(device_type)
    before = None if setting is None else setting.fp32_precision
    if before in (None, "ieee", "none"):  # 'none' everywhere: no fast mode is allowed
        yield
        return
    setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        _restore(setting, before)


def _restore(setting, before: str) -> None:
    """Puts back the caller's value. The getter reports the effective value, which may have come from a wider
    setting (torch.backends.fp32_precision) while this one was 'none': then 'none' restores it, and keeps it
    following the wider one."""
    setting.fp32_precision = "none"
    if setting.fp32_precision != before:
        setting.fp32_precision = before
