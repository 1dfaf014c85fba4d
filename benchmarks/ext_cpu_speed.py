"""CPU speed of the 'ext' backend against 'reference' and 'torch': fwd+bwd of cov_pool, one process, interleaved.

Each round times every backend once, in turn, so that the noise of a shared machine falls on all of them;
the table gives p20/p50/p80 over the rounds and the speed-up of the medians.

With --tricks, a second table measures what each choice of the ext backend's CPU route gives, against the
alternative it replaced (docs/ext.md), again interleaved:
  - spectral route vs the iteration: the 'torch' backend is the batched iteration with the symmetric
    backward; the best a triangle-blocked iteration could do is bounded by the measured time of a
    triangle-blocked 256^3 product (10 of 16 tiles of 64) against a full one;
  - fusion: the same spectral math written as batched ATen calls (`spectral_aten` below) against ext;
  - parallelism over the batch: ext with 1 thread against all threads;
  - keep vs recompute the eigendecomposition for the backward.

With --eigh [C ...], the eigensolver's crossover instead: fwd+bwd of ext at each C (N = C + 36, the C x C route)
with the kernels' own solver against LAPACK's syevd (THREEG_EXT_EIGH=own / syevd), interleaved, float32 and float64.

    python -m benchmarks.ext_cpu_speed [--B 32] [--C 256] [--N 196] [--iters 5] [--rounds 7] [--threads 2] [--tricks]
    python -m benchmarks.ext_cpu_speed --eigh [32 64 ...] [--B 32] [--iters 5] [--rounds 7] [--threads 1]
(--eigh sets C and N itself: --C and --N do not apply, --tricks is refused.)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os

import torch

import threeg_kernels
from benchmarks.common import (
    add_shape_args,
    device_name,
    fmt_quantiles,
    fwd_bwd,
    interleaved_ms,
    make_inputs,
    markdown_table,
    percentiles,
    rel_err,
)

EIGH_C = [32, 64, 96, 128, 160, 192, 256, 320]  # spans every variant's crossover (docs/ext.md, "Eigensolver")


def spectral_aten(x, weight, grad, iters, eps=1e-7):
    """The ext backend's CPU math (csrc/cpu/kernels.h) as unfused batched ATen calls: (out, dx, dw).

    For measuring what fusing it into per-sample C++ gives; not a backend.
    """
    b, c, n = x.shape
    eye = torch.eye(c, dtype=x.dtype)
    xc = x * weight[:, None]
    xc = xc - xc.mean(2, keepdim=True)
    sigma = torch.baddbmm(eps * eye, xc, xc.mT, alpha=1.0 / n)
    tr = sigma.diagonal(dim1=1, dim2=2).sum(-1)
    A = sigma / tr[:, None, None]
    L, U = torch.linalg.eigh(A)
    # the scalar recursion on every eigenvalue (y, z) and, on every pair, its divided differences (dy, dz)
    y, z = L, torch.ones_like(L)
    dy, dz = torch.ones(b, c, c, dtype=x.dtype), torch.zeros(b, c, c, dtype=x.dtype)
    for _ in range(iters):
        t = (3 - z * y) / 2
        dt = -0.5 * (dz * y[:, None, :] + z[:, :, None] * dy)
        dy, dz = dy * t[:, None, :] + y[:, :, None] * dt, dt * z[:, None, :] + t[:, :, None] * dz
        y, z = y * t, t * z
    tri = torch.tril_indices(c, c)
    tri = tri[0] * c + tri[1]
    Y = (U * y[:, None, :]) @ U.mT
    out = Y.reshape(b, c * c)[:, tri] * tr.sqrt()[:, None]
    dS = torch.zeros(b, c * c, dtype=x.dtype)
    dS[:, tri] = grad * (0.5 * tr.sqrt())[:, None]
    dS = dS.view(b, c, c)
    M = U.mT @ (dS + dS.mT) @ U * dy
    coef = (M.diagonal(dim1=1, dim2=2) * L).sum(-1) - 0.5 * (grad * out).sum(-1)
    P = U @ (M @ (U.mT @ xc))
    dxw = (P - coef[:, None, None] * xc) * (2.0 / n / tr)[:, None, None]
    return out, dxw * weight[:, None], (dxw * x).sum(1)


def triangle_blocked_bmm(a, b, tile=64):
    """The lower block triangle of a @ b (symmetric when a, b commute): 10 of 16 tiles for 256 / 64."""
    c = a.shape[-1]
    out = torch.empty_like(a)
    for r0 in range(0, c, tile):
        r1 = min(c, r0 + tile)
        torch.bmm(a[:, r0:r1], b[:, :, :r1], out=out[:, r0:r1, :r1])
    return out


def table(samples: dict, baselines=("reference", "torch")) -> str:
    """fwd+bwd p20 / p50 / p80 of each entry, and its p50 speed-up over each of `baselines` present."""
    med = {name: percentiles(s)[1] for name, s in samples.items()}
    baselines = [b for b in baselines if b in med]
    head = ["backend", "fwd+bwd ms p20 / p50 / p80"] + [f"speed-up vs {b}" for b in baselines]
    rows = [[name, fmt_quantiles(s)] + [f"{med[b] / med[name]:.2f}x" for b in baselines] for name, s in samples.items()]
    return markdown_table(head, rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--tricks", action="store_true", help="also time the alternatives of each trick (docs/ext.md)")
    p.add_argument(
        "--eigh",
        nargs="*",
        type=int,
        metavar="C",
        help=f"the own eigensolver against syevd at these C, N = C + 36 (default {' '.join(map(str, EIGH_C))}; "
        "--C and --N do not apply; docs/ext.md, 'Eigensolver')",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eigh is not None:
        args.eigh = args.eigh or EIGH_C
        if args.tricks:
            p.error("--eigh and --tricks are separate runs: give one of them")
        if min(args.eigh) < 1:
            p.error(f"--eigh: every C must be >= 1; got {args.eigh}")
        if "ext" not in threeg_kernels.available_backends("cpu"):
            p.error("--eigh times the ext backend, which is not built here (python -m threeg_kernels says why)")
        eigh_crossover(args)
        return

    x, weight, grad = make_inputs(args.B, args.C, args.N, torch.float32, "cpu")
    backends = [b for b in ("reference", "torch", "ext") if b in threeg_kernels.available_backends("cpu")]
    fns = {b: functools.partial(fwd_bwd, b, x, weight, grad, args.iters) for b in backends}

    print(
        f"cov_pool fwd+bwd (with weight), B={args.B} C={args.C} N={args.N} K={args.iters}, float32, CPU "
        f"({device_name('cpu')}), torch {torch.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.rounds} interleaved rounds\n"
    )
    print(table(interleaved_ms(fns, "cpu", args.rounds)))
    if args.tricks:
        tricks(x, weight, grad, args)


@contextlib.contextmanager
def eigh_solver(name: str):
    """THREEG_EXT_EIGH=name for the ops started inside (csrc/cpu/kernels.h reads it per call)."""
    before = os.environ.get("THREEG_EXT_EIGH")
    os.environ["THREEG_EXT_EIGH"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["THREEG_EXT_EIGH"]
        else:
            os.environ["THREEG_EXT_EIGH"] = before


def eigh_crossover(args) -> None:
    from threeg_kernels import _C

    print(
        f"ext fwd+bwd (with weight), own eigensolver vs syevd, B={args.B} N=C+36 K={args.iters}, CPU "
        f"({device_name('cpu')}), torch {torch.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.rounds} interleaved rounds; "
        "by size the kernels take their own solver up to n = "
        + ", ".join(f"{n} ({dtype})" for dtype, n in _C.small_eigh_max().items())
        + "\n"
    )
    rows = []
    for dtype in (torch.float32, torch.float64):
        for c in args.eigh:
            x, weight, grad = make_inputs(args.B, c, c + 36, dtype, "cpu")

            def run(solver, x=x, weight=weight, grad=grad):
                with eigh_solver(solver):
                    return fwd_bwd("ext", x, weight, grad, args.iters)

            fns = {s: functools.partial(run, s) for s in ("own", "syevd")}
            got, want = fns["own"](), fns["syevd"]()
            agree = max(rel_err(g, w) for g, w in zip(got, want) if w is not None)
            med = {name: percentiles(v)[1] for name, v in interleaved_ms(fns, "cpu", args.rounds).items()}
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    str(c),
                    f"{med['own']:.2f}",
                    f"{med['syevd']:.2f}",
                    f"{med['syevd'] / med['own']:.2f}x",
                    f"{agree:.1e}",
                ]
            )
    head = ["dtype", "C", "own ms p50", "syevd ms p50", "syevd / own", "max rel diff"]
    print(markdown_table(head, rows))


def tricks(x, weight, grad, args) -> None:
    want = fwd_bwd("ext", x, weight, grad, args.iters)
    got = spectral_aten(x, weight, grad, args.iters)
    err = max(rel_err(g, w) for g, w in zip(got[1:], want[1:]))
    print(f"\nspectral_aten (unfused batched ATen) agrees with ext: max rel err of dx, dw {err:.1e}")

    threads = torch.get_num_threads()

    def ext_with(keep: bool, nthreads: int):
        def run():
            torch.set_num_threads(nthreads)
            try:
                fwd_bwd("ext", x, weight, grad, args.iters, keep_iterates=keep)
            finally:
                torch.set_num_threads(threads)

        return run

    c = args.C
    a = torch.randn(args.B, c, c)
    a = a @ a.mT
    fns = {
        "ext (keep eigh, all threads)": ext_with(True, threads),
        "ext, recompute eigh in backward": ext_with(False, threads),
        "ext, 1 thread": ext_with(True, 1),
        "spectral_aten (unfused, batched)": lambda: spectral_aten(x, weight, grad, args.iters),
        "torch (batched iteration)": lambda: fwd_bwd("torch", x, weight, grad, args.iters),
        "one full C^3 bmm": lambda: torch.bmm(a, a),
        "one triangle-blocked C^3 bmm": lambda: triangle_blocked_bmm(a, a),
    }
    print(f"\ntricks, {args.rounds} interleaved rounds (ms, p20 / p50 / p80):\n")
    print(table(interleaved_ms(fns, "cpu", args.rounds), baselines=("ext (keep eigh, all threads)",)))


if __name__ == "__main__":
    main()
