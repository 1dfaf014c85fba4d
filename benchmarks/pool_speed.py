"""Speed of cov_pool on every backend present, side by side with the baselines users would otherwise run.

    python -m benchmarks.pool_speed [--quick | --full | --regimes] [--B 32 64] [--C 256] [--N 196] [--iters 5]
        [--modes fwd bwd full] [--dtype float32 bf16] [--backends torch ...] [--baselines eigh ...]
        [--precision ieee tf32 ...] [--iterates default keep recompute]
        [--upstream-3g PATH] [--upstream-mpncov PATH] [--json out.json] [--plot out.png]

Prints one markdown table per (mode, dtype): p20/p50/p80 milliseconds, TFLOP/s against the minimal
FLOP count (benchmarks/flops.py), memory (GPU: allocator peak of the call; CPU: bytes saved for
backward), max relative error against the float64 reference at that shape, and each backend's
speed-up over each baseline (p50 / p50). docs/benchmark.md explains every column.

--regimes times fwd+bwd on the (C, N) shapes users run (REGIMES: C from 64 to 512; N = 49, 196, 784) at one B
(16 on CPU, 64 on CUDA), the methods' calls at a shape taking turns, prints one more table (a column per shape)
and writes JSON and a PNG under benchmarks/results/ unless --json / --plot say where.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

import threeg_kernels
from benchmarks import baselines
from benchmarks.baselines import BASELINES, Method, UpstreamImportError
from benchmarks.common import (
    device_name,
    interleaved_ms,
    make_inputs,
    markdown_table,
    peak_mb,
    percentiles,
    rel_err,
    time_ms,
)
from benchmarks.flops import MODES, cov_pool_flops
from threeg_kernels import dispatch, reference
from threeg_kernels._validate import PRECISIONS

OP = "cov_pool"

# Low-precision dtypes run as the head does inside an autocast region: inputs in that dtype, the call
# under torch.autocast. Only on CUDA (CPU autocast benchmarks would measure something no one trains on).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"bf16", "fp16"}

# --iterates: cov_pool's keep_iterates (None: the backend's own default).
ITERATES = {"default": None, "keep": True, "recompute": False}

GPU_GRID = dict(B=[32, 64, 128, 256], C=[64, 128, 256], N=[196])
CPU_GRID = dict(B=[32], C=[256], N=[196])
QUICK_GRID = dict(B=[4, 8], C=[64], N=[49])
# --regimes: (C, N) as users run the head: 7x7 maps (N = 49), 14x14 maps and ViT tokens (196), 448 px fine-grained
# (784), C from a reduced 64 to 512; one B. compile-ref is left out unless --baselines names it (one cold compile
# per C and dtype, ~20 s each on 2 CPU cores).
REGIMES = [(64, 196), (128, 196), (256, 49), (256, 196), (256, 784), (384, 196), (512, 196)]
REGIMES_B = {"cpu": 16, "cuda": 64}
REGIMES_BASELINES = [b for b in BASELINES if b != "compile-ref"]
REGIMES_MODES = ["full"]

RECORD_KEYS = (
    "op",
    "backend",
    "kind",
    "mode",
    "B",
    "C",
    "N",
    "K",
    "dtype",
    "precision",
    "iterates",
    "ms_p20",
    "ms_p50",
    "ms_p80",
    "tflops",
    "peak_mb",
    "speedup_vs",
    "max_rel_err",
    "err_vs",
    "device_name",
    "torch_version",
    "triton_version",
    "git_sha",
    "timestamp",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pool_speed",
        description="Time cov_pool (fwd, bwd, fwd+bwd) on every backend present and on the baselines.",
        epilog=(
            "Default grid: on CUDA B in {32,64,128,256} x C in {64,128,256}, N=196; on CPU only B=32 C=256 "
            "N=196 (a B=256 C=256 fwd+bwd takes seconds per call on a few cores: ask for the GPU grid "
            "with --full). --quick: B in {4,8}, C=64, N=49, 5 repeats (under a minute on 2 CPU cores). "
            "The 'triton' backend is skipped on CPU (it only runs under the slow interpreter there). "
            "Without --backends, only the backends that support every --precision and --iterates asked for "
            "run; a backend named in --backends that does not support one is an error."
        ),
    )
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="small CPU-friendly set (B 4 8, C 64, N 49, 5 repeats)")
    grid.add_argument("--full", action="store_true", help="the full grid on any device (slow on CPU)")
    grid.add_argument(
        "--regimes",
        action="store_true",
        help=(
            "the (C, N) shapes users run, " + " ".join(f"({c},{n})" for c, n in REGIMES) + ", at one B "
            "(16 CPU, 64 CUDA; --B overrides), fwd+bwd only unless --modes, every baseline but compile-ref unless "
            "--baselines, 7 timed calls of each, the methods taking turns; writes JSON and a PNG under "
            "benchmarks/results/ unless --json/--plot"
        ),
    )
    p.add_argument("--B", type=int, nargs="+", help="batch sizes (overrides the grid)")
    p.add_argument("--C", type=int, nargs="+", help="channels (overrides the grid)")
    p.add_argument("--N", type=int, nargs="+", help="spatial positions H*W (overrides the grid)")
    p.add_argument("--iters", type=int, default=5, help="Newton-Schulz steps K (default 5, as 3G-Net)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all three (--regimes: full)")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=list(DTYPES),
        default=["float32"],
        help="float32 (default), float64; bf16 / fp16 autocast on CUDA only",
    )
    p.add_argument("--backends", nargs="+", help="only these backends (default: every one present)")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=["ieee"],
        help="cov_pool(precision=...) of the backend rows (default ieee; tf32x3, tf32, bf16: the triton backend only)",
    )
    p.add_argument(
        "--iterates",
        nargs="+",
        choices=list(ITERATES),
        default=["default"],
        help="cov_pool(keep_iterates=None / True / False) of the backend rows (default: the backend's default)",
    )
    p.add_argument("--baselines", nargs="*", choices=list(BASELINES), help="only these baselines (none: no args)")
    p.add_argument("--upstream-3g", metavar="PATH", help="a 3G-Net checkout: time its models/resnet.py head too")
    p.add_argument(
        "--upstream-mpncov",
        metavar="PATH",
        help="a fast-MPN-COV checkout: time its src/representation/MPNCOV.py MPNCOV layer too",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed calls per measurement (default: 20 CUDA, 5 CPU and --quick, 7 with --regimes on CPU)",
    )
    p.add_argument("--warmup", type=int, help="untimed calls first (default: 3 CUDA and --quick, 1 CPU)")
    p.add_argument("--json", metavar="PATH", help="write one JSON record per measurement")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: p50 time vs B, one line per backend/baseline")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is no tty)"
    )
    args = p.parse_args(argv)

    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    if args.device.type != "cuda" and AUTOCAST & set(args.dtype):
        p.error(f"--dtype {' '.join(sorted(AUTOCAST & set(args.dtype)))}: autocast dtypes are benchmarked on CUDA only")
    on_gpu_grid = args.full or args.device.type == "cuda"
    grid = QUICK_GRID if args.quick else GPU_GRID if on_gpu_grid else CPU_GRID
    if args.regimes:
        if args.C or args.N:
            p.error("--regimes sets C and N itself (benchmarks.pool_speed.REGIMES); give --B only")
        grid = dict(B=[REGIMES_B.get(args.device.type, 16)], C=[c for c, _ in REGIMES], N=[n for _, n in REGIMES])
    for key in ("B", "C", "N"):
        values = getattr(args, key) or grid[key]
        if min(values) < (2 if key == "N" else 1):
            p.error(f"--{key} must be >= {2 if key == 'N' else 1}; got {values}")
        setattr(args, key, values)
    if args.regimes:
        args.shapes = [(b, c, n) for c, n in REGIMES for b in args.B]
    else:
        args.shapes = [(b, c, n) for c in args.C for n in args.N for b in args.B]
    if args.modes is None:
        args.modes = REGIMES_MODES if args.regimes else list(MODES)
    if args.regimes:
        args.json = args.json or str(_regimes_path(args.device, "json"))
        args.plot = args.plot or str(_regimes_path(args.device, "png"))
        if args.baselines is None:
            args.baselines = REGIMES_BASELINES
    if args.iters < 1:
        p.error(f"--iters must be >= 1; got {args.iters}")
    cuda = args.device.type == "cuda"
    if args.repeats is None:
        args.repeats = 20 if cuda and not args.quick else 7 if args.regimes else 5
    if args.warmup is None:  # the --quick calls take a millisecond: three warm-ups cost nothing there
        args.warmup = 3 if cuda or args.quick else 1
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0; got {args.repeats}, {args.warmup}")
    args.precision = list(dict.fromkeys(args.precision))
    args.iterates = list(dict.fromkeys(args.iterates))

    present = present_backends(args.device)
    if args.backends is not None:
        unknown = [b for b in args.backends if b not in present]
        if unknown:
            p.error(f"--backends {' '.join(unknown)}: not present on {args.device} (present: {', '.join(present)})")
    asked = " ".join(
        [f"--precision {' '.join(args.precision)}"] * (args.precision != ["ieee"])
        + [f"--iterates {' '.join(args.iterates)}"] * (args.iterates != ["default"])
    )
    why = {b: unsupported_options(b, args.device, args.precision, args.iterates) for b in present}
    if args.backends is not None:
        for b in args.backends:
            if why[b]:
                p.error(f"{asked}: {why[b]}")
        chosen = [b for b in present if b in args.backends]
    else:
        chosen = [b for b in present if not why[b]]
        if not chosen:
            p.error(f"{asked}: no backend present on {args.device} supports it ({'; '.join(why.values())})")
    args.methods = [
        Method(b, "backend", _backend_fn(b, pr, it), baselines.EPS, "3g", precision=pr, iterates=it)
        for b in chosen
        for pr in args.precision
        for it in args.iterates
    ]
    args.methods += [BASELINES[b] for b in BASELINES if args.baselines is None or b in args.baselines]
    try:
        if args.upstream_3g:
            args.methods.append(baselines.upstream_3g(args.upstream_3g))
        if args.upstream_mpncov:
            args.methods.append(baselines.upstream_mpncov(args.upstream_mpncov))
    except UpstreamImportError as exc:
        p.error(str(exc))
    return args


def _regimes_path(device: torch.device, ext: str) -> Path:
    return Path(__file__).resolve().parent / "results" / f"regimes-{device.type}.{ext}"


def present_backends(device: torch.device) -> list[str]:
    """Every backend that runs on `device`, but not 'triton' on CPU (the interpreter is not a speed)."""
    return [b for b in threeg_kernels.available_backends(device) if not (b == "triton" and device.type == "cpu")]


def unsupported_options(backend: str, device: torch.device, precisions, iterates) -> Optional[str]:
    """None if `backend` runs every precision and iterates setting asked for, else a sentence saying what not.

    The precisions come from the backend itself (dispatch's `precisions`); keep_iterates is honoured by every
    backend but 'reference', which differentiates with autograd and ignores it (cov_pool's docstring).
    """
    supported = dispatch.resolve(backend, device).precisions
    if any(pr not in supported for pr in precisions):
        return f"backend {backend!r} supports only precision {' '.join(supported)}"
    if backend == "reference" and any(ITERATES[it] is not None for it in iterates):
        return "backend 'reference' ignores keep_iterates (autograd keeps what it needs)"
    return None


def _backend_fn(name: str, precision: str, iterates: str):
    options = dict(eps=baselines.EPS, backend=name, precision=precision, keep_iterates=ITERATES[iterates])
    return lambda x, weight, iters: threeg_kernels.cov_pool(x, weight, iters=iters, **options)


# ------------------------------------------------------------------------------------------- metadata


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # noqa: BLE001 - absent or broken: record that there is none
        return None
    return triton.__version__


def git_sha() -> str:
    """HEAD of the checkout the benchmark runs from, '+dirty' when the tree has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def run_metadata(device: torch.device) -> dict:
    return dict(
        device_name=device_name(device),
        torch_version=torch.__version__,
        triton_version=triton_version(),
        git_sha=git_sha(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# ------------------------------------------------------------------------------------------ measuring


def _autocast(device: torch.device, dtype_name: str):
    if dtype_name in AUTOCAST:
        return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name])
    return contextlib.nullcontext()


def _forward(fn, x, weight, iters, ctx_factory=contextlib.nullcontext):
    """(out, x, weight) of fn on fresh leaves: x and weight require grad, as in training."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with ctx_factory():
        out = fn(x, weight, iters)
    return out, x, weight


def _backward(state, grad):
    out, x, weight = state
    return torch.autograd.grad(out, (x, weight), grad.to(out.dtype))


def mode_calls(mode, method, x, weight, grad, iters, ctx_factory):
    """(fn, setup) for time_ms / peak_mb: what one call of `mode` runs, and its untimed setup."""
    forward = functools.partial(_forward, method.fn, x, weight, iters, ctx_factory)
    if mode == "fwd":
        return forward, None
    if mode == "bwd":
        return functools.partial(_backward, grad=grad), forward
    return (lambda: _backward(forward(), grad)), None


class Truth:
    """The float64 answers at one shape, computed once and shared by every method and mode."""

    def __init__(self, x, weight, grad, iters):
        self.x, self.weight, self.grad, self.iters = x.double(), weight.double(), grad.double(), iters
        self._cache = {}

    def kstep(self, eps, order):
        """(out, dx, dweight) of reference.cov_pool in float64 with this eps and triangle order."""
        key = ("kstep", eps, order)
        if key not in self._cache:
            fn = lambda x, w, k: reference.cov_pool(x, w, k, eps, order)  # noqa: E731
            state = _forward(fn, self.x, self.weight, self.iters)
            self._cache[key] = (state[0].detach(), *_backward(state, self.grad))
        return self._cache[key]

    def exact(self, eps, order):
        key = ("exact", eps, order)
        if key not in self._cache:
            self._cache[key] = baselines.exact_sqrt_triangle(self.x, self.weight, eps, order)
        return self._cache[key]


def method_errors(method: Method, truth: Truth, x, weight, grad, iters, ctx_factory) -> tuple[dict, str]:
    """Max relative error per mode (fwd: output; bwd: dx and dweight; full: all three), and what against.

    The exact-sqrt baseline is compared on its output against the float64 exact square root, in every
    mode (its gradient is that of a different function, and ill-conditioned when C > N).
    """
    state = _forward(method.fn, x, weight, iters, ctx_factory)
    out = state[0]
    if method.exact:
        err = rel_err(out, truth.exact(method.eps, method.order))
        return {m: err for m in MODES}, "exact sqrt, float64 (output)"
    dx, dw = _backward(state, grad)
    want = truth.kstep(method.eps, method.order)
    e_out, e_dx, e_dw = rel_err(out, want[0]), rel_err(dx, want[1]), rel_err(dw, want[2])
    return {"fwd": e_out, "bwd": max(e_dx, e_dw), "full": max(e_out, e_dx, e_dw)}, "reference, float64"


def measure(
    method: Method,
    x,
    weight,
    grad,
    truth: Truth,
    dtype_name: str,
    args: argparse.Namespace,
    timings: Optional[dict] = None,
) -> list[dict]:
    """One record per mode of `method` at the shape of x, in dtype `dtype_name`; timings[mode], where given, are
    its calls' milliseconds (interleaved with the other methods': interleaved_timings), else its calls run here."""
    device, iters = args.device, args.iters
    ctx_factory = functools.partial(_autocast, device, dtype_name)
    errs, err_vs = method_errors(method, truth, x, weight, grad, iters, ctx_factory)
    b, c, n = x.shape
    cpu_mb = None
    if device.type != "cuda":  # saved-for-backward bytes: a property of the forward, the same in every mode
        cpu_mb = peak_mb(mode_calls("fwd", method, x, weight, grad, iters, ctx_factory)[0], device)
    records = []
    for mode in args.modes:
        fn, setup = mode_calls(mode, method, x, weight, grad, iters, ctx_factory)
        samples = timings[mode] if timings is not None else time_ms(fn, device, args.warmup, args.repeats, setup=setup)
        ms = percentiles(samples)
        records.append(
            dict(
                op=OP,
                backend=method.name,
                kind=method.kind,
                mode=mode,
                B=b,
                C=c,
                N=n,
                K=iters,
                dtype=dtype_name + ("-autocast" if dtype_name in AUTOCAST else ""),
                precision=method.precision,
                iterates=method.iterates,
                ms_p20=ms[0],
                ms_p50=ms[1],
                ms_p80=ms[2],
                tflops=cov_pool_flops(b, c, n, iters, mode) / (ms[1] * 1e-3) / 1e12,
                peak_mb=cpu_mb if cpu_mb is not None else peak_mb(fn, device, setup),
                speedup_vs={},
                max_rel_err=errs[mode],
                err_vs=err_vs,
            )
        )
    return records


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dev dependency; without it there is simply no bar
        return contextlib.nullcontext(None)
    return tqdm(total=total, file=sys.stderr, disable=disable or not sys.stderr.isatty(), unit="run", leave=False)


def run(args: argparse.Namespace) -> list[dict]:
    meta = run_metadata(args.device)
    shapes = args.shapes
    total = len(shapes) * len(args.dtype) * len(args.methods)
    records = []
    with _progress(total, args.no_progress) as bar:
        for dtype_name in args.dtype:
            for b, c, n in shapes:
                x, weight, grad = make_inputs(b, c, n, DTYPES[dtype_name], args.device)
                truth = Truth(x, weight, grad, args.iters)
                # --regimes: every method's calls at a shape in turn (one of each per round), so that a slow spell of
                # the machine falls on all of them alike instead of on the one timed then: the speed-ups are read
                # across methods. The other grids time one method after the other.
                timings = interleaved_timings(args, x, weight, grad, dtype_name) if args.regimes else None
                for i, method in enumerate(args.methods):
                    if bar is not None:
                        bar.set_description(f"{method.label} B={b} C={c} N={n} {dtype_name}")
                    mine = None if timings is None else {mode: timings[i, mode] for mode in args.modes}
                    records += [{**r, **meta} for r in measure(method, x, weight, grad, truth, dtype_name, args, mine)]
                    if bar is not None:
                        bar.update(1)
    add_speedups(records)
    return records


def interleaved_timings(args: argparse.Namespace, x, weight, grad, dtype_name: str) -> dict:
    """{(method index, mode): [ms of each timed call]} for every method and mode at the shape of x: args.warmup
    untimed rounds, then args.repeats rounds that call each (method, mode) once, each round in its own (seeded)
    order, so that no method always runs right after the same one."""
    ctx_factory = functools.partial(_autocast, args.device, dtype_name)
    fns, setups = {}, {}
    for i, method in enumerate(args.methods):
        for mode in args.modes:
            fns[i, mode], setups[i, mode] = mode_calls(mode, method, x, weight, grad, args.iters, ctx_factory)
    return interleaved_ms(fns, args.device, args.repeats, warmup=args.warmup, setups=setups, shuffle=True)


def _shape_key(r: dict) -> tuple:
    return (r["mode"], r["B"], r["C"], r["N"], r["K"], r["dtype"])


def add_speedups(records: list[dict]) -> None:
    """speedup_vs[baseline] = baseline p50 / backend p50 at the same mode, shape and dtype."""
    base = {}
    for r in records:
        if r["kind"] == "baseline":
            base.setdefault(_shape_key(r), {})[r["backend"]] = r["ms_p50"]
    for r in records:
        if r["kind"] == "backend":
            r["speedup_vs"] = {name: ms / r["ms_p50"] for name, ms in base.get(_shape_key(r), {}).items()}


# -------------------------------------------------------------------------------------------- writers


def record_label(r: dict) -> str:
    """The row's name in tables and plots: the backend, with its precision and iterates when not the default."""
    return baselines.label(r["backend"], r["precision"], r["iterates"])


def markdown_tables(records: list[dict]) -> str:
    """One table per (mode, dtype): rows by shape, then backends, then baselines."""
    baseline_names = list(dict.fromkeys(r["backend"] for r in records if r["kind"] == "baseline"))
    mode_names = {"fwd": "forward", "bwd": "backward", "full": "forward + backward"}
    blocks = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in records):
        rows = [r for r in records if r["mode"] == mode and r["dtype"] == dtype]
        rows.sort(key=lambda r: (r["C"], r["N"], r["B"], r["kind"] != "backend"))
        head = ["method", "B", "C", "N", "ms p50 (p20-p80)", "TFLOP/s", "peak MB", "max rel err"]
        head += [f"x vs {name}" for name in baseline_names]
        cells = []
        for r in rows:
            flag = " (exact sqrt)" if r["err_vs"].startswith("exact") else ""
            cells.append(
                [
                    record_label(r) + _marker(r),
                    str(r["B"]),
                    str(r["C"]),
                    str(r["N"]),
                    f"{_fmt_ms(r['ms_p50'])} ({_fmt_ms(r['ms_p20'])}-{_fmt_ms(r['ms_p80'])})",
                    f"{r['tflops']:.3g}",
                    f"{r['peak_mb']:.3g}",
                    f"{r['max_rel_err']:.1e}{flag}",
                ]
                + [f"{r['speedup_vs'][name]:.2f}x" if name in r["speedup_vs"] else "" for name in baseline_names]
            )
        title = f"{mode} ({mode_names[mode]}), {dtype}, K={rows[0]['K']}"
        blocks.append(title + "\n\n" + markdown_table(head, cells))
    return "\n\n".join(blocks)


def _regime_columns(records: list[dict]) -> list[tuple]:
    return list(dict.fromkeys((r["B"], r["C"], r["N"]) for r in records))


def regimes_tables(records: list[dict]) -> str:
    """Per (mode, dtype): p50 ms of every method (rows) at every shape (columns), then the speed-up of each
    backend over each baseline at every shape."""
    blocks = []
    for mode, dtype in dict.fromkeys((r["mode"], r["dtype"]) for r in records):
        rows = [r for r in records if r["mode"] == mode and r["dtype"] == dtype]
        shapes = _regime_columns(rows)
        by = {(record_label(r), r["B"], r["C"], r["N"]): r for r in rows}
        methods = list(dict.fromkeys((record_label(r), _marker(r), r["kind"]) for r in rows))
        head = ["ms p50"] + [f"C={c} N={n}" for _, c, n in shapes]
        cells = [
            [label + mark] + [_fmt_ms(by[(label, *sh)]["ms_p50"]) if (label, *sh) in by else "" for sh in shapes]
            for label, mark, _ in methods
        ]
        baselines_ = [(label, mark) for label, mark, kind in methods if kind == "baseline"]
        speed = []
        for label, _, kind in methods:
            if kind != "backend":
                continue
            for base, mark in baselines_:
                row = [f"{label} vs {base}{mark}"]
                for sh in shapes:
                    r = by.get((label, *sh))
                    row.append(f"{r['speedup_vs'][base]:.2f}x" if r and base in r["speedup_vs"] else "")
                speed.append(row)
        b = ", ".join(sorted({f"B={sh[0]}" for sh in shapes}))
        title = f"{mode}, {dtype}, K={rows[0]['K']}, {b}: p50 ms per shape"
        blocks.append(title + "\n\n" + markdown_table(head, cells))
        if speed:
            blocks.append("speed-up (baseline p50 / backend p50)\n\n" + markdown_table(["x"] + head[1:], speed))
    return "\n\n".join(blocks)


def write_regimes_plot(records: list[dict], path) -> None:
    """Two panels per mode: p50 ms of every method per shape (log), and every backend's speed-up over the
    original fast-MPN-COV code where it ran (else over the first baseline) per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.8 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        rows = [r for r in records if r["mode"] == mode]
        shapes = _regime_columns(rows)
        ticks = [f"{c}x{n}" for _, c, n in shapes]
        names = list(dict.fromkeys((record_label(r), r["kind"]) for r in rows))
        ax = axes[row][0]
        for name, kind in names:
            ms = {(r["B"], r["C"], r["N"]): r["ms_p50"] for r in rows if record_label(r) == name}
            style = "-o" if kind == "backend" else "--s"
            ax.plot(ticks, [ms.get(sh, float("nan")) for sh in shapes], style, label=name)
        ax.set_yscale("log")
        ax.set_ylabel("ms (p50)")
        ax.set_xlabel("C x N")
        ax.set_title(f"{mode}, B={shapes[0][0]}, K={rows[0]['K']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        bases = [n for n, k in names if k == "baseline"]
        base = "upstream-mpncov" if "upstream-mpncov" in bases else (bases[0] if bases else None)
        ax = axes[row][1]
        if base is not None:
            for name, kind in names:
                if kind != "backend":
                    continue
                sp = {(r["B"], r["C"], r["N"]): r["speedup_vs"].get(base) for r in rows if record_label(r) == name}
                ax.plot(ticks, [sp.get(sh) or float("nan") for sh in shapes], "-o", label=name)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylabel(f"speed-up vs {base}")
            ax.set_xlabel("C x N")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    _save_figure(fig, path, f"cov_pool regimes on {records[0]['device_name']} (torch {records[0]['torch_version']})")


def _save_figure(fig, path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def write_json(records: list[dict], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def write_plot(records: list[dict], path) -> None:
    """p50 ms vs B (log-log), one panel per (mode, C, N), one line per method and dtype; p20-p80 shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["mode"], r["C"], r["N"]) for r in records))
    modes = list(dict.fromkeys(p[0] for p in panels))
    cols = max(sum(p[0] == m for p in panels) for m in modes)
    fig, axes = plt.subplots(len(modes), cols, figsize=(4.2 * cols, 3.4 * len(modes)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    multi_dtype = len({r["dtype"] for r in records}) > 1
    for mode_row, mode in enumerate(modes):
        for col, (_, c, n) in enumerate(p for p in panels if p[0] == mode):
            ax = axes[mode_row][col]
            ax.set_visible(True)
            rows = [r for r in records if (r["mode"], r["C"], r["N"]) == (mode, c, n)]
            for name, dtype in dict.fromkeys((record_label(r), r["dtype"]) for r in rows):
                line = sorted((r for r in rows if (record_label(r), r["dtype"]) == (name, dtype)), key=lambda r: r["B"])
                bs = [r["B"] for r in line]
                label = name + (f" {dtype}" if multi_dtype else "")
                style = "-o" if line[0]["kind"] == "backend" else "--s"
                ax.plot(bs, [r["ms_p50"] for r in line], style, label=label, markersize=4)
                ax.fill_between(bs, [r["ms_p20"] for r in line], [r["ms_p80"] for r in line], alpha=0.12)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{mode}, C={c}, N={n}, K={rows[0]['K']}", fontsize=9)
            ax.set_xlabel("B")
            ax.set_ylabel("ms (p50)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    _save_figure(fig, path, f"cov_pool on {records[0]['device_name']} (torch {records[0]['torch_version']})")


def _marker(record: dict) -> str:
    """Table mark of a row: none for a backend, * for a re-stated baseline, † for the original code."""
    if record["kind"] == "backend":
        return ""
    return " †" if record["backend"].startswith("upstream-") else " *"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = ", ".join(m.label for m in args.methods if m.kind == "backend")
    print(
        f"cov_pool on {args.device} ({device_name(args.device)}), torch {torch.__version__}; "
        f"backends: {names}; {args.warmup} warm-up + {args.repeats} timed calls each"
    )
    if args.device.type == "cpu" and "triton" in threeg_kernels.available_backends(args.device):
        print("(triton skipped on CPU: it runs only under the interpreter there)")
    records = run(args)
    print(markdown_tables(records))
    if args.regimes:
        print("\n" + regimes_tables(records))
    print(
        "\n* baseline: a re-statement of the published method (docs/benchmark.md); "
        "† the original project's code, imported from the checkout given with --upstream-*. "
        + (
            "peak MB: bytes saved for backward."
            if args.device.type != "cuda"
            else "peak MB: allocator peak during the call, inputs excluded."
        )
    )
    if args.json:
        write_json(records, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    if args.plot:
        (write_regimes_plot if args.regimes else write_plot)(records, args.plot)
        print(f"wrote {args.plot}")
    return records


if __name__ == "__main__":
    main()
