"""The "ext" backend: the compiled extension `threeg_kernels._C` (csrc/), as registered torch ops.

The ops threeg::cov_pool_ext_forward / threeg::cov_pool_ext_backward are declared and implemented in
C++ (csrc/ops.cpp; kernels in csrc/cpu/kernels.h and csrc/cuda/cov_pool_ext.cu, whose headers
hold the math). This module registers their fake kernels and autograd formula (the shared contract of
threeg_kernels/_registration.py) and exposes the backend to the dispatch. docs/ext.md: design, build
switches and measurements.

Saved state ("iterates", keep_iterates=True), per device:
    CPU, C x C spectral route: per sample the eigenvectors V = U^T and eigenvalues of A, (B, C (C + 1));
    CPU, Gram route (gram_route(C, N)): per sample the eigenvectors and eigenvalues of the N x N Gram
                           matrix and W (C x N), (B, N (N + 1 + C)) (docs/math.md (24)-(29)); the op's A output
                           is empty (0,) there (its backward reads x and this state only, so no C x C matrix is
                           formed);
    CUDA (iteration):      (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K, (K - 1, 3, B, C, C) as in the torch backend.
"""

from __future__ import annotations

import importlib.util

import torch

from .._registration import full_a_shape, reference_gradient, register_pool_op
from . import Loaded, torch_impl

if importlib.util.find_spec("threeg_kernels._C") is None:
    raise ImportError(
        "the compiled extension threeg_kernels._C is not built: run `pip install --no-build-isolation -e .` "
        "(setup.py says why a build skipped it)"
    )
from .. import _C


def gram_route(c, n) -> bool:
    """Whether the CPU kernels take the Gram route for C channels and N positions: N <= 13/16 C below C = 96,
    N <= 7/8 C below C = 128 and N <= 15/16 C from there, the measured crossovers (docs/ext.md, "Routes").
    csrc/cpu/kernels.h (gram_route) decides with the same rule; written with integer products so that symbolic
    sizes under torch.compile give guards, not an error."""
    return 16 * n <= (13 if c < 96 else 14 if c < 128 else 15) * c


def _cpu_iterates_shape(b, c, n, iters):
    """What the CPU forward keeps of a sample: [V, L] of A (C (C + 1)), or on the Gram route [V, m] of M and
    W (N (N + 1 + C))."""
    return (b, n * (n + 1 + c) if gram_route(c, n) else c * (c + 1))


ITERATES_SHAPE = {
    "cpu": _cpu_iterates_shape,
    "cuda": lambda b, c, n, iters: (iters - 1, 3, b, c, c),
}


def _cpu_a_shape(b, c, n):
    """The Gram route's backward reads only x and the saved state: its forward forms no C x C matrix and
    returns A empty."""
    return (0,) if gram_route(c, n) else full_a_shape(b, c, n)


A_SHAPE = {"cpu": _cpu_a_shape, "cuda": full_a_shape}

# Eager calls that need a gradient run the ops' formula as an autograd node in C++ (csrc/autograd.cpp): no Python
# frame in its bookkeeping or backward, 2-10% of a fwd+bwd call at C = 64 (docs/ext.md, "Per-call cost"). Its
# backward takes the reference math's gradient where that gradient is itself differentiated (create_graph=True).
_C.set_reference_gradient(reference_gradient)
_pool_op = register_pool_op(
    torch.ops.threeg.cov_pool_ext_forward.default,
    torch.ops.threeg.cov_pool_ext_backward.default,
    ITERATES_SHAPE,
    A_SHAPE,
    eager=_C.pool,
)


# The spectral route (CPU) computes the K-step polynomial of A from float32 eigenvectors, whose errors the
# polynomial's slope at small eigenvalues (~1.5^K) amplifies: on ill-conditioned covariances its float32
# error passes 10x the iteration's from K = 6 on (docs/math.md, "How many steps"; tests/test_accuracy.py).
# Beyond this many steps, float32 on CPU runs the iteration (the torch backend's op); csrc/cpu checks the same
# limit when the op is called directly.
SPECTRAL_MAX_ITERS_FLOAT32 = 5


def pool(x, weight, iters, eps, order, precision, keep_iterates):
    if x.device.type == "cpu" and x.dtype == torch.float32 and iters > SPECTRAL_MAX_ITERS_FLOAT32:
        return torch_impl.pool(x, weight, iters, eps, order, precision, keep_iterates)
    return _pool_op(x, weight, iters, eps, order, keep_iterates, precision)


def _unavailable_on(device: torch.device):
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if _C.cuda_built():
            return None
        return "threeg_kernels._C was built without its CUDA kernels (see setup.py: THREEG_BUILD_CUDA, nvcc, CUDA_HOME)"
    return f"no kernels for device type {device.type!r}"


# Keep the eigendecomposition (CPU) / the iterates (CUDA) for the backward by default: on CPU measured 1.40x
# faster than recomputing the eigendecomposition (docs/ext.md); on CUDA chosen by design, not yet measured.
LOADED = Loaded(pool=pool, unavailable_on=_unavailable_on, keep_iterates=True)
