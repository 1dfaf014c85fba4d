"""`python -m threeg_kernels`: versions, devices, and which backends run on each (with reasons)."""

from __future__ import annotations

import argparse
import os
import platform

import torch

import threeg_kernels
from threeg_kernels import autoselect, dispatch


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def main(argv=None) -> None:
    argparse.ArgumentParser(
        prog="python -m threeg_kernels",
        description="Prints the versions, the devices, and which backends run on each (with the reason where one "
        "does not), and what backend='auto' picks; it takes no other arguments.",
    ).parse_args(argv)
    print(f"threeg_kernels {threeg_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}")
    try:
        from threeg_kernels import _C

        print(f"compiled extension threeg_kernels._C: CUDA kernels {'built' if _C.cuda_built() else 'not built'}")
        try:
            running = _C.cpu_variant()
        except RuntimeError as exc:  # THREEG_EXT_ISA names one the ops refuse: say why, as they would
            running = f"none ({exc})"
        isa = os.environ.get("THREEG_EXT_ISA") or "auto"
        print(f"  CPU kernels: {running} (this CPU runs {', '.join(_C.cpu_variants())}; THREEG_EXT_ISA={isa})")
    except ImportError as exc:
        print(f"compiled extension threeg_kernels._C: not built ({exc})")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        print("CUDA: not available (torch.cuda.is_available() is False)")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"\ndevice {device} ({name})")
        ranked = dispatch.available_backends(device)
        if ranked and autoselect.measures(device):
            print(f"  auto picks: measured per shape at first use (fixed order without measuring: {', '.join(ranked)})")
        else:
            print(f"  auto picks: {ranked[0] if ranked else 'nothing'}")
        forced = dispatch.forced_backend()
        if forced is not None:
            print(f"  THREEG_BACKEND={forced}: 'auto' runs that instead")
        for backend in dispatch.BACKENDS:
            reason = dispatch.unavailable_reason(backend, device)
            print(f"  {backend:<10} {'available' if reason is None else 'missing: ' + reason}")
        if device.type == "cuda" and dispatch.unavailable_reason("triton", device) is None:
            print(f"  triton launch settings: {_tuning_state()}")


def _tuning_state() -> str:
    from threeg_kernels.triton_kernels import tuning

    if tuning.INTERPRET:
        return "fixed (TRITON_INTERPRET=1)"
    if not tuning.enabled():
        return f"fixed defaults ({tuning.ENV}=0)"
    return f"timed per shape at the first call ({tuning.ENV}=0 turns that off)"


if __name__ == "__main__":
    main()
