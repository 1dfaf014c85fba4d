"""CPU/GPU forward time of a ResNet-3G model, fused head vs the plain (unfused) head, interleaved.

    python -m benchmarks.model_speed [--arch resnet50_3g] [--batch 2] [--size 224] [--rounds 5]

Each round times every configuration once (eval mode, no_grad), so drifts of a shared machine hit
all of them alike; prints p20 / p50 / p80 ms per configuration.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.common import fmt_quantiles, interleaved_ms, markdown_table
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

    def forward(fused, backend):
        model.fused_head, model.pool_backend = fused, backend
        with torch.no_grad():
            model(x)

    samples = interleaved_ms({c: functools.partial(forward, *c) for c in configs}, device, args.rounds)

    print(f"{args.arch} forward, batch {args.batch}, {args.size} px, eval, on {device}")
    rows = [
        ["fused" if fused else "unfused", backend, fmt_quantiles(ms, 0)] for (fused, backend), ms in samples.items()
    ]
    print(markdown_table(["head", "pool backend", "ms p20 / p50 / p80"], rows))


if __name__ == "__main__":
    main()
