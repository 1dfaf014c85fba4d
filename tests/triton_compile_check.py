"""Compiles every Triton kernel variant the launchers use, for a GPU target, on a machine without a GPU.

    python -m tests.triton_compile_check [--arch 90] [--quick]

The interpreter (TRITON_INTERPRET=1) runs the kernels on CPU but checks little of what the GPU
compiler demands (dot shapes, dtypes of both branches, register and shared-memory budgets). This
script runs the host launchers of threeg_kernels/ops with the launch settings of a GPU, records
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


def _capture_launches(scenarios):
    """[(kernel, args, kwargs)] of every launch the launchers make for the scenarios (nothing runs)."""
    from triton.runtime.jit import JITFunction

    from threeg_kernels.ops import _tiles
    from threeg_kernels.ops.covariance import covariance_backward, covariance_forward
    from threeg_kernels.ops.newton_schulz import newton_schulz_backward, newton_schulz_forward, newton_schulz_iterates
    from threeg_kernels.ops.triangle import triangle_backward

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        for dtype, precision, weighted, iters, keep, lower in scenarios:
            b, c, n = 2, 256, 196
            cfg = _tiles.launch_config(c, n, dtype, precision)
            x = torch.zeros(b, c, n, dtype=dtype)
            w = torch.zeros(b, n, dtype=dtype) if weighted else None
            sigma = covariance_forward(x, w, 1e-7, cfg)
            out, A, tr, iterates = newton_schulz_forward(sigma, iters, lower, keep, cfg)
            if not keep:
                iterates = newton_schulz_iterates(A, iters, cfg)
            dY, g_parts = triangle_backward(torch.zeros_like(out), out, tr, c, lower, cfg)
            dA, a_parts = newton_schulz_backward(dY, A, iterates, iters, cfg)
            covariance_backward(dA, tr, a_parts, g_parts, x, w, cfg)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--quick", action="store_true", help="float32 ieee, one scenario (~20 kernels)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if args.quick:
        scenarios = [(torch.float32, "ieee", True, 3, True, True)]
    else:
        scenarios = [
            (dtype, precision, weighted, iters, keep, lower)
            for dtype, precision in [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "bf16"),
                                     (torch.float64, "ieee")]
            for weighted in (False, True)
            for iters, keep, lower in [(1, True, True), (3, True, False), (3, False, True)]
        ]
    seen, failures = set(), 0
    target = GPUTarget("cuda", args.arch, 32)
    for fn, largs, kwargs in _capture_launches(scenarios):
        sig, constexprs, options = _signature(fn, largs, kwargs)
        key = (fn.__name__, tuple(sig.items()), tuple(sorted((k[0], str(v)) for k, v in constexprs.items())),
               tuple(sorted(options.items())))
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
        print(f"ok   {time.time() - start:4.1f}s shared={meta.shared:6d} B  {label}")
    print(f"{len(seen)} variants for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
