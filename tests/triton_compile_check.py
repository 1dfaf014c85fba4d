"""Compiles every Triton kernel variant the launchers use, for a GPU target, on a machine without a GPU.

    python -m tests.triton_compile_check [--arch 90] [--quick] [--candidates | --config B,BK,BN,W,S ...]
                                         [--jobs J] [--table]

The interpreter (TRITON_INTERPRET=1) runs the kernels on CPU but checks little of what the GPU
compiler demands (dot shapes, dtypes of both branches, register and shared-memory budgets). This
script runs the host launchers of threeg_kernels/triton_kernels with the launch settings of a GPU at
B = 2, C = 256, N = 196, through Triton's own launch path (JITFunction.run) with a stand-in driver
for the sm_<arch> target: Triton's binder specialises the arguments as for a real launch (integers
equal to 1 become constants; integers divisible by 16 and 16-byte aligned pointers get
tt.divisibility = 16), and the compile that the launch would start is recorded instead. Each distinct
variant (the JIT's own cache key) is then compiled to a cubin, in a pool of `--jobs` processes, and
the `ptxas -v` log of Triton's own ptxas run gives its registers and spills.

A variant fails if it does not compile, needs more shared memory than one block may have, or, for a
default launch config (_tiles.launch_config), spills registers to local memory; the check then exits 1.
The last line sums it up: variants, failures, most registers and shared memory, spills of the defaults
(and of the other candidates with --candidates or --config). It must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch

B, C, N = 2, 256, 196
MODES = [
    (torch.float32, "ieee"),
    (torch.float32, "tf32x3"),
    (torch.float32, "tf32"),
    (torch.float32, "bf16"),
    (torch.float64, "ieee"),
]
COLUMNS = ["ieee", "tf32x3", "tf32", "bf16", "float64"]

# Most dynamic shared memory one block may use, per compute capability (CUDA programming guide).
_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class Variant:
    """One compile a launch starts: what JITFunction._do_compile receives, and the launches that reach it."""

    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's options (CUDAOptions), parsed from the launch's keyword arguments
    origins: set = field(default_factory=set)  # {(LaunchConfig, column, is the default config)}

    @property
    def default(self) -> bool:
        return any(is_default for _, _, is_default in self.origins)

    def label(self) -> str:
        names = self.fn.arg_names
        constants = {names[path[0]]: value for path, value in self.constexprs.items()}
        aligned = [names[path[0]] for path, attr in self.attrs.items() if ["tt.divisibility", 16] in attr]
        pointers = ",".join(sorted({t for t in self.signature.values() if t.startswith("*")}))
        return (
            f"{self.fn.__name__} {pointers} {constants} num_warps={self.options.num_warps} "
            f"num_stages={self.options.num_stages} divisible_by_16={aligned}"
        )


class _TargetDriver:
    """Stands in for the GPU driver while the launchers run: before it compiles, a launch asks the driver
    only for the current device, stream and target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _check_alignment(args, kwargs):
    """A CUDA tensor's storage starts 512-byte aligned (caching allocator); Triton marks a pointer divisible
    by 16 from data_ptr() % 16. The CPU tensors used here give the same marks when their storage starts
    16-byte aligned (the CPU allocator aligns to 64), since the views' offsets are the same."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() % 16:
            raise AssertionError(f"storage at {value.untyped_storage().data_ptr():#x} is not 16-byte aligned")


def capture(arch: int, runs) -> list[Variant]:
    """The distinct compiles of every launch the launchers make for `runs`, [(dtype, precision, weighted,
    iters, keep_iterates, lower, cfg, is_default)], specialised by Triton's launch path (nothing runs)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from threeg_kernels.triton_kernels.head import head_backward, head_forward

    variants: dict[tuple, Variant] = {}
    origin = None

    def run(self, *args, grid, warmup, **kwargs):
        _check_alignment(args, kwargs)
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        variant = variants.setdefault((self, str(key)), Variant(self, signature, constexprs, attrs, options))
        variant.origins.add(origin)
        return None  # JITFunction.run returns before launching

    launch, compile_ = JITFunction.run, JITFunction._do_compile
    active = driver._active  # read without `driver.active`, which creates a driver and fails without a GPU
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run, JITFunction._do_compile = run, do_compile
    try:
        for dtype, precision, weighted, iters, keep_iterates, lower, cfg, is_default in runs:
            origin = (cfg, "float64" if dtype == torch.float64 else precision, is_default)
            x = torch.zeros(B, C, N, dtype=dtype)
            w = torch.zeros(B, N, dtype=dtype) if weighted else None
            out, A, tr, iterates = head_forward(x, w, iters, 1e-7, lower, keep_iterates, cfg)
            # without keep_iterates, iterates is empty and head_backward records the launches recomputing them
            head_backward(torch.zeros_like(out), x, w, out, A, tr, iterates, iters, lower, cfg)
    finally:
        JITFunction.run, JITFunction._do_compile = launch, compile_
        driver.set_active(active)
        for fn, _ in variants:  # the binders made for the stand-in target
            fn.device_caches.clear()
    return list(variants.values())


def _ptxas_usage(report: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) in the `ptxas -v` log of one compile."""
    regs = max((int(r) for r in re.findall(r"Used (\d+) registers", report)), default=0)
    spills = sum(int(r) for r in re.findall(r"(\d+) bytes spill stores", report))
    return regs, spills


_VARIANTS: list[Variant] = []  # set before the pool forks: the workers read their variant by index
_ARCH = 90


def _compile(i: int):
    """(error or None, shared bytes, registers, spill bytes, seconds) of variant i compiled for sm_<arch>."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = _VARIANTS[i]
    start = time.time()
    # Triton prints the log of the ptxas run that builds the cubin (its own flags, which differ between
    # versions); always compiling makes it run even when the kernel is in Triton's cache.
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        # as JITFunction._do_compile compiles it
        src = ASTSource(v.fn, v.signature, v.constexprs, v.attrs)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", _ARCH, 32), options=v.options.__dict__)
        regs, spills = _ptxas_usage(log.getvalue())
        if not regs:
            raise RuntimeError("no ptxas -v report")
    except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}", 0, 0, 0, time.time() - start
    return None, kernel.metadata.shared, regs, spills, time.time() - start


def _table(variants, results) -> str:
    """Markdown: per launch config (float32 and float64 apart) and mode, the spill bytes of one forward+backward
    (the sum over kernels of each kernel's largest spill across its variants; "-" = none; bold: a default
    config), then the most registers and shared memory over the row's variants."""
    worst: dict[tuple, dict] = {}  # (row, column) -> {kernel: spill bytes}
    defaults, regs, shared = set(), {}, {}
    for v, (error, shm, r, spills, _) in zip(variants, results):
        for config, column, is_default in v.origins:
            shape = (config.block, config.block_k, config.block_n, config.num_warps, config.num_stages)
            row = (shape, column == "float64")
            per_kernel = worst.setdefault((row, column), {})
            per_kernel[v.fn.__name__] = max(per_kernel.get(v.fn.__name__, 0), spills)
            if is_default:
                defaults.add((row, column))
            if error is None:
                regs[row] = max(regs.get(row, 0), r)
                shared[row] = max(shared.get(row, 0), shm)
    lines = [
        "| tile, depth, N tile, warps, stages | " + " | ".join(COLUMNS) + " | max registers | max shared KB |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for row in dict.fromkeys(row for row, _ in worst):
        cells = []
        for column in COLUMNS:
            total = sum(worst[(row, column)].values()) if (row, column) in worst else None
            cell = "" if total is None else str(total) if total else "-"
            cells.append(f"**{cell}**" if (row, column) in defaults else cell)
        usage = f"{regs.get(row, '')} | {shared.get(row, 0) / 1024:.0f}"
        lines.append(f"| {', '.join(map(str, row[0]))} | " + " | ".join(cells) + f" | {usage} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global _VARIANTS, _ARCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument(
        "--quick", action="store_true", help="float32 ieee and tf32x3 only, one scenario each (weighted, K = 3, keep)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--candidates",
        action="store_true",
        help="every tuning candidate of triton_kernels/tuning.py as well as the default config",
    )
    which.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="B,BK,BN,W,S",
        help="also compile this launch config (tile, reduction depth, N tile, warps, stages) in every mode; repeatable",
    )
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compiles in parallel")
    parser.add_argument("--table", action="store_true", help="print spills per config and mode as markdown")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2

    import triton

    from threeg_kernels.triton_kernels import _tiles, tuning

    if args.quick:
        modes, scenarios = MODES[:2], [(True, 3, True, True)]
    else:
        modes = MODES
        scenarios = [
            (weighted, iters, keep_iterates, lower)
            for weighted in (False, True)
            for iters, keep_iterates, lower in [(1, True, True), (3, True, False), (3, False, True)]
        ]
    runs = []
    for dtype, precision in modes:
        default = _tiles.launch_config(C, N, dtype, precision)
        if args.candidates:
            configs = tuning.candidates(C, N, dtype, precision)
        else:
            extra = [_tiles.LaunchConfig(*map(int, spec.split(",")), default.precision, False) for spec in args.config]
            configs = [default] + [cfg for cfg in extra if cfg != default]
        for cfg in configs:
            runs += [(dtype, precision, *scenario, cfg, cfg == default) for scenario in scenarios]

    start = time.time()
    _VARIANTS, _ARCH = capture(args.arch, runs), args.arch
    jobs = max(1, min(args.jobs, len(_VARIANTS)))
    shared_limit = _SHARED_LIMIT.get(args.arch, 48 * 1024)
    failures = 0
    spilled = {True: [], False: []}  # default config or not -> spill bytes of each spilling variant
    results = []
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for v, result in zip(_VARIANTS, pool.imap(_compile, range(len(_VARIANTS)))):
            results.append(result)
            error, shared, regs, spills, seconds = result
            if error is None and spills:
                spilled[v.default].append(spills)
            if error is None and shared > shared_limit:
                error = f"needs {shared} B of shared memory; sm_{args.arch} has {shared_limit} B per block"
            if error is None and spills and v.default:
                error = f"spills {spills} B of registers in a default launch config"
            if error is not None:
                failures += 1
                print(f"FAIL {v.label()}\n     {error}", flush=True)
            else:
                usage = f"shared={shared:6d} B regs={regs:3d} spill={spills:5d} B"
                print(f"ok   {seconds:4.1f}s {usage}  {v.label()}", flush=True)
    if args.table:
        print(_table(_VARIANTS, results))
    ok = [r for r in results if r[0] is None]
    regs, shared = max((r[2] for r in ok), default=0), max((r[1] for r in ok), default=0)
    line = (
        f"Triton {triton.__version__}, sm_{args.arch}: {len(_VARIANTS)} variants, {failures} failed, "
        f"max registers {regs}, max shared memory {shared} B, "
        f"spills of defaults: {len(spilled[True])} variants ({sum(spilled[True])} B)"
    )
    if args.candidates or args.config:
        line += f", spills of other configs: {len(spilled[False])} variants (max {max(spilled[False], default=0)} B)"
    print(f"{line}; {time.time() - start:.0f} s with {jobs} jobs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
