"""Compiles every Triton kernel variant the launchers use, for a GPU target, on a machine without a GPU.

    python -m tests.triton_compile_check [--arch 90] [--quick]

The interpreter (TRITON_INTERPRET=1) runs the kernels on CPU but checks little of what the GPU
compiler demands (dot shapes, dtypes of both branches, register and shared-memory budgets). This
script runs the host launchers of threeg_kernels/triton_kernels with the launch settings of a GPU, records
every launch instead of running it, and compiles each distinct (kernel, signature, constexprs) to a
cubin for the given sm_<arch> with Triton's bundled ptxas. It prints the registers spilled and the
shared memory of each, and exits non-zero if any fails. It must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _capture_launches(scenarios, all_candidates=False):
    """[(kernel, args, kwargs)] of every launch the launchers make for the scenarios (nothing runs).

    Each scenario runs with the default launch config, or with every tuning candidate (triton_kernels/tuning.py)."""
    from triton.runtime.jit import JITFunction

    from threeg_kernels.triton_kernels import _tiles, tuning
    from threeg_kernels.triton_kernels.head import head_backward, head_forward

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        for dtype, precision, weighted, iters, keep_iterates, lower in scenarios:
            b, c, n = 2, 256, 196
            configs = (
                tuning.candidates(c, n, dtype, precision)
                if all_candidates
                else [_tiles.launch_config(c, n, dtype, precision)]
            )
            for cfg in configs:
                x = torch.zeros(b, c, n, dtype=dtype)
                w = torch.zeros(b, n, dtype=dtype) if weighted else None
                out, A, tr, iterates = head_forward(x, w, iters, 1e-7, lower, keep_iterates, cfg)
                # without keep_iterates, iterates is empty and head_backward records the launches recomputing them
                head_backward(torch.zeros_like(out), x, w, out, A, tr, iterates, iters, lower, cfg)
    finally:
        JITFunction.run = original
    return launches


def _signature(fn, args, kwargs):
    """Triton's (signature, constexprs, options) for one recorded launch, without specialisation."""
    ptr = {torch.float32: "*fp32", torch.float64: "*fp64"}
    sig, constexprs, options = {}, {}, {}
    values = dict(zip(fn.arg_names, args))
    for name, value in kwargs.items():
        if name in fn.arg_names:
            values[name] = value
        else:
            options[name] = value
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if i in fn.constexprs:
            sig[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = ptr[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return sig, constexprs, options


# Most dynamic shared memory one block may use, per compute capability (CUDA programming guide).
_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) that Triton's bundled ptxas reports for the PTX."""
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", "-o", os.devnull, f.name], capture_output=True, text=True, check=True
        ).stderr
    regs = max((int(r) for r in re.findall(r"Used (\d+) registers", report)), default=0)
    spills = sum(int(r) for r in re.findall(r"(\d+) bytes spill stores", report))
    return regs, spills


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument(
        "--quick", action="store_true", help="float32 ieee and tf32x3 defaults, one scenario each (24 kernels)"
    )
    parser.add_argument(
        "--max-spill",
        type=int,
        default=None,
        metavar="BYTES",
        help="fail a variant whose registers spill more than BYTES to local memory",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="every tuning candidate of triton_kernels/tuning.py instead of the default config only",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if args.quick:
        scenarios = [(torch.float32, "ieee", True, 3, True, True), (torch.float32, "tf32x3", True, 3, True, True)]
    else:
        scenarios = [
            (dtype, precision, weighted, iters, keep_iterates, lower)
            for dtype, precision in [
                (torch.float32, "ieee"),
                (torch.float32, "tf32x3"),
                (torch.float32, "tf32"),
                (torch.float32, "bf16"),
                (torch.float64, "ieee"),
            ]
            for weighted in (False, True)
            for iters, keep_iterates, lower in [(1, True, True), (3, True, False), (3, False, True)]
        ]
    seen, failures, spilled = set(), 0, 0
    shared_limit = _SHARED_LIMIT.get(args.arch, 48 * 1024)
    target = GPUTarget("cuda", args.arch, 32)
    for fn, largs, kwargs in _capture_launches(scenarios, args.candidates):
        sig, constexprs, options = _signature(fn, largs, kwargs)
        key = (
            fn.__name__,
            tuple(sig.items()),
            tuple(sorted((k[0], str(v)) for k, v in constexprs.items())),
            tuple(sorted(options.items())),
        )
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} {dict((fn.arg_names[k[0]], v) for k, v in constexprs.items())} {options}"
        start = time.time()
        try:
            kernel = triton.compile(ASTSource(fn, sig, constexprs), target=target, options=options)
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            print(f"FAIL {label}\n     {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        meta = kernel.metadata
        regs, spills = _ptxas_usage(kernel.asm["ptx"])
        spilled += spills > 0
        if args.max_spill is not None and spills > args.max_spill:
            failures += 1
            print(f"FAIL {label}\n     spills {spills} B of registers (--max-spill {args.max_spill})")
            continue
        if meta.shared > shared_limit:
            failures += 1
            print(
                f"FAIL {label}\n     needs {meta.shared} B of shared memory; sm_{args.arch} has "
                f"{shared_limit} B per block"
            )
            continue
        print(f"ok   {time.time() - start:4.1f}s shared={meta.shared:6d} B regs={regs:3d} spill={spills:5d} B  {label}")
    print(f"{len(seen)} variants for sm_{args.arch}, {failures} failed, {spilled} spill registers to local memory")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
