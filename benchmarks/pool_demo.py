"""`make demo` (until the training pipeline lands): the head at its real size on every backend here.

For each backend present on the device: max relative error of the output, dL/dx and dL/dweight
against the reference, and the fwd+bwd time (p20/p50/p80).

    python -m benchmarks.pool_demo [--B 32] [--C 256] [--N 196] [--iters 5] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform

import torch

import threeg_kernels
from benchmarks.timing import add_shape_args, fwd_bwd, make_inputs, percentiles, time_ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    x, weight, grad = make_inputs(args.B, args.C, args.N, torch.float32, device)
    backends = [b for b in threeg_kernels.available_backends(device) if not (b == "triton" and device.type == "cpu")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"cov_pool fwd+bwd, B={args.B} C={args.C} N={args.N} K={args.iters}, float32, on {device} ({name})")
    print(f"backends present: {', '.join(backends)}\n")

    want = fwd_bwd("reference", x, weight, grad, args.iters)
    rows, ref_ms = [], None
    for backend in ["reference"] + [b for b in backends if b != "reference"]:
        got = fwd_bwd(backend, x, weight, grad, args.iters)
        errs = [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
        ms = percentiles(time_ms(lambda: fwd_bwd(backend, x, weight, grad, args.iters), device, repeats=args.repeats))
        ref_ms = ms[1] if backend == "reference" else ref_ms
        rows.append((backend, errs, ms))

    print("| backend | max rel err out / dx / dweight | fwd+bwd ms p20 / p50 / p80 | speed-up vs reference (p50) |")
    print("|---|---|---|---|")
    for backend, errs, ms in rows:
        err = " / ".join(f"{e:.1e}" for e in errs)
        print(f"| {backend} | {err} | {ms[0]:.1f} / {ms[1]:.1f} / {ms[2]:.1f} | {ref_ms / ms[1]:.2f}x |")


if __name__ == "__main__":
    main()
