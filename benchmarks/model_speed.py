"""CPU/GPU forward time of a ResNet-3G model, fused head vs the plain (unfused) head, interleaved.

    python -m benchmarks.model_speed [--arch resnet50_3g] [--batch 2] [--size 224] [--rounds 5]

Each round times every configuration once (eval mode, no_grad), so drifts of a shared machine hit
all of them alike; prints p20 / p50 / p80 ms per configuration.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import percentiles, time_ms
from threeg_kernels import available_backends, models


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50_3g", choices=models.list_models())
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    model = models.create_model(args.arch).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    auto = available_backends(device)[0]
    # The same backend with and without fusion isolates the fusion; 'reference' is the plain yardstick.
    configs = [(fused, b) for b in dict.fromkeys([auto, "reference"]) for fused in (True, False)]
    samples = {c: [] for c in configs}

    def forward(fused, backend):
        model.fused_head, model.pool_backend = fused, backend
        with torch.no_grad():
            model(x)

    for fused, backend in configs:  # warm-up
        forward(fused, backend)
    for _ in range(args.rounds):
        for c in configs:
            samples[c] += time_ms(lambda: forward(*c), device, warmup=0, repeats=1)

    print(f"{args.arch} forward, batch {args.batch}, {args.size} px, eval, on {device}")
    print("| head | pool backend | ms p20 / p50 / p80 |\n|---|---|---|")
    for (fused, backend), ms in samples.items():
        q = percentiles(ms)
        print(f"| {'fused' if fused else 'unfused'} | {backend} | {q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f} |")


if __name__ == "__main__":
    main()
