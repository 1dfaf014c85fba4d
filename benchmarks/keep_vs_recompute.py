"""Keep the Newton-Schulz iterates (or eigendecomposition) for the backward, or recompute them?

    python -m benchmarks.keep_vs_recompute [--B 32] [--C 256] [--N 196] [--iters 5] [--rounds 7]

For each backend present that has the switch (module attribute SAVE_ITERATES: torch, ext, triton),
times fwd+bwd with the switch on and off, interleaved in one process, and counts the bytes saved for
backward (benchmarks.timing.saved_tensor_bytes). The defaults of the backends follow this measurement.
"""

from __future__ import annotations

import argparse
import importlib

import torch

import threeg_kernels
from benchmarks.timing import add_shape_args, make_inputs, percentiles, saved_tensor_bytes, time_ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    x, w, g = make_inputs(args.B, args.C, args.N, torch.float32, device)
    x, w = x.requires_grad_(), w.requires_grad_()

    backends = [b for b in threeg_kernels.available_backends(device) if b != "reference"]
    backends = [b for b in backends if not (b == "triton" and device.type == "cpu")]
    modules = {b: importlib.import_module(f"threeg_kernels.backends.{b}_impl") for b in backends}
    configs = [(b, keep) for b in backends for keep in (True, False)]

    def forward(backend):
        return threeg_kernels.cov_pool(x, w, iters=args.iters, backend=backend)

    def step(backend, keep):
        modules[backend].SAVE_ITERATES = keep
        torch.autograd.grad(forward(backend), (x, w), g)

    samples = {c: [] for c in configs}
    saved = {}
    for c in configs:
        step(*c)  # warm-up
        modules[c[0]].SAVE_ITERATES = c[1]
        saved[c] = saved_tensor_bytes(lambda: forward(c[0]))
    for _ in range(args.rounds):
        for c in configs:
            samples[c] += time_ms(lambda: step(*c), device, warmup=0, repeats=1)
    for b in backends:
        modules[b].SAVE_ITERATES = True

    print(f"fwd+bwd, B={args.B} C={args.C} N={args.N} K={args.iters}, float32, {device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print("| backend | iterates | ms p20 / p50 / p80 | saved for backward MB |\n|---|---|---|---|")
    for (b, keep), ms in samples.items():
        q = percentiles(ms)
        print(f"| {b} | {'keep' if keep else 'recompute'} | {q[0]:.1f} / {q[1]:.1f} / {q[2]:.1f} | "
              f"{saved[(b, keep)] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
