"""The FLOP model of the benchmark, and the FLOP and byte model of the triton backend's kernel launches.

    python -m benchmarks.flops [--B 256] [--C 256] [--N 196] [--K 5] [--unweighted] [--recompute]
        [--dtype float32] [--block 64 --block-k 16 --block-n 32] [--json]

`cov_pool_flops`: the symmetry-minimal work of the 3G pooling head (the products of docs/math.md). Every
row of `python -m benchmarks.pool_speed` reports TFLOP/s against this one count, whatever the row actually
computes: a method that does more work (an N x N centring matrix, products it could have skipped, both
triangles of a symmetric result) shows a lower TFLOP/s, not a higher count.

`triton_launches`: what each kernel launch of the triton backend (threeg_kernels/triton_kernels/head.py)
executes and moves: the FLOPs of its tile products as launched (whole tiles, padding included) and the
bytes it must read from and write to memory at least once. The CLI prints them with the floors they set
on an H200 (`floors`): a launch cannot take less than its bytes over the memory bandwidth, nor less than
its FLOPs over the arithmetic peak of the precision mode.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Optional

MODES = ("fwd", "bwd", "full")


def cov_pool_flops(B: int, C: int, N: int, K: int, mode: str) -> int:
    """Minimal floating-point operations of cov_pool for `mode` ('fwd', 'bwd' or 'full' = fwd + bwd).

    Only the matrix products are counted (2 FLOP per multiply-add); the elementwise work (centring,
    weighting, trace, scaling, triangle gather/scatter) is O(B C^2 + B C N) and left out.
    Write F = 2 B C^3 for one batched C x C x C product with a general result, and
    H = B C^2 (C + 1) for one whose result is symmetric (only the C(C+1)/2 entries of one triangle,
    2C FLOP each: Y_k, Z_k, T_k are polynomials in A, so all their products are symmetric).

    Forward:
      covariance Xc Xc^T / N, symmetric:                          B C (C + 1) N
      Newton-Schulz, step 1 (T_1 = 1.5 I - 0.5 A needs no
      product, Y_1 = A T_1 one), steps 2..K (Z Y, Y T, and T Z
      except at k = K, whose Z is never used):                    (1 + 3 (K - 1) - [K >= 2]) H
                                                                  (12 H for K = 5)
    Backward (the symmetric reverse sweep, docs/math.md (11): the fewest products of any backward):
      reverse of step K (dZ_K = 0): Y dY, dY T general; Y dY Y symmetric:        2 F + 1 H
      reverse of steps K-1..2: Y dY, dY T, Z dZ, T dZ general;
                               Z dZ Z, Y dY Y symmetric:                         (K - 2) (4 F + 2 H)
      reverse of step 1: dY T_1 general:                                         1 F
      dL/dX_w = 2 dSigma Xc / N, a general C x C x N product:                    2 B C^2 N
    (For K = 1 the backward is the step-1 product and dL/dX_w only.)

    At B=256, C=256, N=196, K=5: forward 55.0, backward 165.6, full 220.6 GFLOP.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if min(B, C, N, K) < 1:
        raise ValueError(f"B, C, N and K must be >= 1; got B={B} C={C} N={N} K={K}")
    F = 2 * B * C**3
    H = B * C * C * (C + 1)
    fwd = B * C * (C + 1) * N + (1 + 3 * (K - 1) - (K >= 2)) * H
    bwd = 1 * F + 2 * B * C * C * N
    if K >= 2:
        bwd += 2 * F + 1 * H + (K - 2) * (4 * F + 2 * H)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


# ---------------------------------------------------------------------------------- the triton launches

# H200 SXM, vendor figures (dense, no sparsity). The copy bandwidth is the usual achieved rate of a
# device-to-device copy on that part, not a measurement of this project: `bash benchmarks/gpu_check.sh speed`
# measures the machine's own (hbm.jsonl) and the floors scale with it.
HBM_NOMINAL = 4.8e12  # bytes/s
HBM_COPY = 4.3e12  # bytes/s
PEAKS = {  # FLOP/s of the products in each precision mode of the triton backend
    "ieee": 67e12,  # fp32 FMA on the CUDA cores
    "tf32x3": 495e12 / 3,  # three TF32 tensor-core products per product
    "tf32": 495e12,  # TF32 tensor cores
    "bf16": 989e12,  # bf16 tensor cores
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its Triton kernel (the name a profiler lists), the pass it belongs to, which
    step of it, the FLOPs its tile products execute and the bytes it must move at least once."""

    kernel: str
    phase: str  # "fwd" or "bwd"
    step: str
    flops: int
    bytes: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_blocks(C: int, N: int, dtype: str = "float32") -> tuple[int, int, int]:
    """(block, block_k, block_n) of the triton backend's default launch settings for this shape
    (threeg_kernels/triton_kernels/_tiles.launch_config: the GPU default, or the interpreter's under
    TRITON_INTERPRET=1; what runs with THREEG_TRITON_AUTOTUNE=0)."""
    import torch

    from threeg_kernels.triton_kernels._tiles import launch_config

    cfg = launch_config(C, N, getattr(torch, dtype))
    return cfg.block, cfg.block_k, cfg.block_n


def triton_launches(
    B: int,
    C: int,
    N: int,
    K: int,
    *,
    weighted: bool = True,
    keep: bool = True,
    itemsize: int = 4,
    block: Optional[int] = None,
    block_k: Optional[int] = None,
    block_n: Optional[int] = None,
) -> list[Launch]:
    """Every kernel launch of one forward and one backward of the triton backend, in launch order.

    The launch structure of threeg_kernels/triton_kernels/head.py: forward 2K launches, backward 2K + 2
    (keep) or 4K (recompute, K >= 2). Blocks default to the shape's default launch settings
    (`default_blocks`); pass the tuned ones to model a tuned run.

    FLOPs: 2 per multiply-add of the tile products as launched: whole block x block output tiles and
    whole block_k (block_n for the covariance's N) reduction steps, padding included. A kernel whose result
    is symmetric as computed (Sigma, step 1's A A, the backward's sym(dA)) or of which only one triangle is
    kept (the packed Y_K) computes T(T+1)/2 of the T^2 tiles (T = cdiv(C, block): 10 of 16 at C = 256
    with 64-wide tiles); the iterates' products from step 2 on and the reverse sweep compute every tile.
    Elementwise work is left out.

    Bytes: each tensor a launch reads counted once, each it writes once (a lower bound: it assumes the
    panels that several programs of a launch share are re-read from L2, not from memory). Buffers are of
    `itemsize` bytes (4: float32 in every precision mode; the modes change the matmul inputs, not the
    buffers). Small torch allocations around the launches are not counted.
    """
    if min(B, C, N, K) < 1:
        raise ValueError(f"B, C, N and K must be >= 1; got B={B} C={C} N={N} K={K}")
    if block is None or block_k is None or block_n is None:
        defaults = default_blocks(C, N, "float64" if itemsize == 8 else "float32")
        block, block_k, block_n = (given or d for given, d in zip((block, block_k, block_n), defaults))
    T = _cdiv(C, block)
    tile = 2 * block * block * _cdiv(C, block_k) * block_k  # one output tile of a C x C x C product
    half = B * T * (T + 1) // 2 * tile  # a product computed on the tiles of one triangle
    full = B * T * T * tile  # a product computed on every tile
    s = itemsize
    mat, x, w = B * C * C * s, B * C * N * s, (B * N * s if weighted else 0)
    packed, scalar = B * C * (C + 1) // 2 * s, B * s
    launches: list[Launch] = []

    def add(kernel, phase, step, flops, read, write):
        launches.append(Launch(kernel, phase, step, flops, read + write))

    def sweep(phase, label, last_packs):
        """newton_schulz.py's steps k = 2..K (_run_steps); the last one packs out, or is not run."""
        for k in range(2, K + 1):
            add("ns_t_kernel", phase, f"{label}T_{k}", full, 2 * mat, mat)
            if k < K:
                add("ns_step_kernel", phase, f"{label}Y_{k}, Z_{k}", 2 * full, 3 * mat, 2 * mat)
            elif last_packs:
                add("ns_step_kernel", phase, f"Y_{k}; packs out", half, 2 * mat + scalar, packed)

    # --- forward: covariance.py, newton_schulz.py (newton_schulz_forward), triangle.py (store_packed)
    cov = B * T * (T + 1) // 2 * 2 * block * block * _cdiv(N, block_n) * block_n
    add("covariance_forward_kernel", "fwd", "Sigma", cov, x + w, mat)
    if K == 1:
        add("ns_first_step_kernel", "fwd", "tr, A, Y_1; packs out", half, mat, mat + scalar + packed)
    else:
        add("ns_first_step_kernel", "fwd", "tr, A, Y_1, Z_1", half, mat, 3 * mat + scalar)
    sweep("fwd", "", True)

    # --- backward: head_backward
    add("scatter_triangle_kernel", "bwd", f"dY_{K}", 0, 2 * packed + scalar, mat + B * T * T * s)
    if not keep and K >= 2:  # newton_schulz_iterates: the forward's sweep again from A, stopping after T_K
        add("ns_first_step_kernel", "bwd", "recompute Y_1, Z_1", half, mat, 2 * mat)
        sweep("bwd", "recompute ", False)
    for k in range(K, 1, -1):  # newton_schulz_backward, the plain reverse step; dZ_K = 0
        has_dz = k < K
        add("ns_backward_dt_kernel", "bwd", f"dT_{k}", (1 + has_dz) * full, (2 + 2 * has_dz) * mat, mat)
        add(
            "ns_backward_step_kernel",
            "bwd",
            f"dY_{k - 1}, dZ_{k - 1}",
            (3 + has_dz) * full,
            (5 + has_dz) * mat,
            2 * mat,
        )
    add("ns_backward_first_step_kernel", "bwd", "sym(dA)", 2 * half, (2 + (K >= 2)) * mat, mat + B * T * C * s)
    add("row_mean_kernel", "bwd", "mu, r", 0, x + w, 2 * B * C * s)
    cov_bwd = 2 * B * _cdiv(N, block_n) * block_n * T * block * _cdiv(C, block_k) * block_k
    parts = B * (T * C + T * T) * s
    add("covariance_backward_kernel", "bwd", "dx, dw", cov_bwd, mat + scalar + parts + x + w + 2 * B * C * s, x + w)
    return launches


def totals(launches: list[Launch]) -> dict:
    """{'fwd' | 'bwd' | 'full': {'launches', 'flops', 'bytes'}} of a list of launches."""
    out = {}
    for mode in MODES:
        chosen = [a for a in launches if mode == "full" or a.phase == mode]
        out[mode] = dict(launches=len(chosen), flops=sum(a.flops for a in chosen), bytes=sum(a.bytes for a in chosen))
    return out


def floors(launches: list[Launch], bandwidth: float, peak: float) -> dict:
    """Lower bounds in seconds per pass ('fwd', 'bwd', 'full'): 'memory' (bytes / bandwidth), 'compute'
    (FLOPs / peak) and 'roofline', the sum over launches of the larger of the two (launches run one after
    another, so one launch's idle arithmetic cannot cover another's memory time)."""
    out = {}
    for mode in MODES:
        chosen = [a for a in launches if mode == "full" or a.phase == mode]
        out[mode] = dict(
            memory=sum(a.bytes for a in chosen) / bandwidth,
            compute=sum(a.flops for a in chosen) / peak,
            roofline=sum(max(a.bytes / bandwidth, a.flops / peak) for a in chosen),
        )
    return out


# ------------------------------------------------------------------------------------------------ CLI


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _launches(args: argparse.Namespace) -> list:
    """triton_launches for the command line's shape and options."""
    return triton_launches(
        args.B,
        args.C,
        args.N,
        args.K,
        weighted=not args.unweighted,
        keep=not args.recompute,
        itemsize=8 if args.dtype == "float64" else 4,
        block=args.block,
        block_k=args.block_k,
        block_n=args.block_n,
    )


def report(args: argparse.Namespace) -> str:
    """The launch table, the totals and the floors, as markdown."""
    launches = _launches(args)
    block, block_k, block_n = (
        (args.block, args.block_k, args.block_n) if args.block else default_blocks(args.C, args.N, args.dtype)
    )
    title = (
        f"triton backend, B={args.B} C={args.C} N={args.N} K={args.K}, {args.dtype}, "
        f"{'unweighted' if args.unweighted else 'weighted'}, iterates {'recomputed' if args.recompute else 'kept'}; "
        f"tiles {block} x {block}, reduction steps {block_k}, N tile {block_n}"
    )
    rows = [
        [
            a.kernel,
            a.phase,
            a.step,
            f"{a.flops / 1e9:.2f}",
            f"{a.bytes / 1e6:.1f}",
            f"{a.bytes / HBM_NOMINAL * 1e6:.1f}",
            f"{a.flops / PEAKS['ieee'] * 1e6:.1f}",
            f"{a.flops / PEAKS['tf32'] * 1e6:.1f}",
        ]
        for a in launches
    ]
    head = ["kernel", "pass", "step", "GFLOP", "MB", "us at 4.8 TB/s", "us at 67 TFLOP/s", "us at 495 TFLOP/s"]
    tot = totals(launches)
    minimal = {m: cov_pool_flops(args.B, args.C, args.N, args.K, m) for m in MODES}
    sums = _table(
        ["pass", "launches", "GFLOP as launched", "GFLOP minimal (cov_pool_flops)", "GB moved"],
        [
            [m, str(t["launches"]), f"{t['flops'] / 1e9:.1f}", f"{minimal[m] / 1e9:.1f}", f"{t['bytes'] / 1e9:.2f}"]
            for m, t in tot.items()
        ],
    )
    floor_rows = []
    for mode, peak in PEAKS.items():
        cells = [mode, f"{peak / 1e12:.0f}"]
        for bw in (HBM_NOMINAL, HBM_COPY):
            f = floors(launches, bw, peak)
            cells += [f"{f[m]['roofline'] * 1e3:.2f}" for m in MODES]
        f = floors(launches, HBM_NOMINAL, peak)
        floor_rows.append(cells + [f"{f['full']['compute'] * 1e3:.2f}"])
    memory = {bw: floors(launches, bw, 1.0)["full"]["memory"] * 1e3 for bw in (HBM_NOMINAL, HBM_COPY)}
    floor_head = ["mode", "TFLOP/s", "fwd ms (4.8 TB/s)", "bwd", "full", "fwd ms (4.3 TB/s)", "bwd", "full"]
    floor_table = _table(floor_head + ["full ms, FLOPs alone"], floor_rows)
    return "\n\n".join(
        [
            title,
            _table(head, rows),
            sums,
            "Floors (the sum over launches of max(bytes / bandwidth, FLOPs / peak); H200 SXM: HBM 4.8 TB/s "
            "nominal, 4.3 TB/s a typical copy; dense peaks):",
            floor_table,
            f"Memory alone, fwd+bwd: {memory[HBM_NOMINAL]:.2f} ms at 4.8 TB/s, {memory[HBM_COPY]:.2f} ms at 4.3 TB/s "
            "(whatever the precision mode).",
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.flops",
        description="FLOPs and bytes of each kernel launch of the triton backend, and the floors they set on an H200.",
    )
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--N", type=int, default=196)
    p.add_argument("--K", type=int, default=5, help="Newton-Schulz steps")
    p.add_argument("--unweighted", action="store_true", help="no spatial weights")
    p.add_argument("--recompute", action="store_true", help="keep_iterates=False: the backward recomputes them")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--block", type=int, help="output tile side (default: the default launch settings)")
    p.add_argument("--block-k", type=int, help="reduction step (with --block)")
    p.add_argument("--block-n", type=int, help="N tile (with --block)")
    p.add_argument("--json", action="store_true", help="print the launches and totals as JSON instead")
    args = p.parse_args(argv)
    if min(args.B, args.C, args.N, args.K) < 1:
        p.error(f"--B, --C, --N and --K must be >= 1; got {args.B}, {args.C}, {args.N}, {args.K}")
    blocks = (args.block, args.block_k, args.block_n)
    if any(v is not None for v in blocks) and not all(v is not None and v >= 1 for v in blocks):
        p.error(f"--block, --block-k and --block-n go together, each >= 1; got {blocks}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.json:
        launches = _launches(args)
        print(json.dumps(dict(launches=[asdict(a) for a in launches], totals=totals(launches)), indent=1))
        return
    print(report(args))


if __name__ == "__main__":
    main()
