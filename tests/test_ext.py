"""The 'ext' backend (threeg_kernels._C, csrc/): what only it has. Its CUDA kernels compiled where nvcc is, the
cases the spectral CPU routes must get right (rank-deficient covariances, repeated eigenvalues, N = 2), the
choice between the C x C and the Gram route on either side of the crossover, the empty batch, and the
errors of its C++ checks. The cases every backend shares (reference, gradcheck, opcheck, compile, keep or
recompute, CUDA) are in tests/test_backends.py.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import threeg_kernels
from threeg_kernels import dispatch

from .helpers import (
    RTOL,
    assert_close_to_reference,
    devices_for,
    eager_and_compiled,
    make_case,
    pool_ops,
    rel_err,
    run_pool,
)

_MISSING = dispatch.unavailable_reason("ext", "cpu")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"extension threeg_kernels._C not built: {_MISSING}")


def test_cuda_kernels_compiled_where_the_toolchain_is():
    """On machines with nvcc (CI included) the CUDA sources must have compiled, even without a GPU."""
    from threeg_kernels import _C

    if os.environ.get("THREEG_BUILD_CUDA") == "0" or not torch.version.cuda or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolchain here, or THREEG_BUILD_CUDA=0")
    from threeg_kernels.backends import ext_impl

    assert _C.cuda_built()
    # the backend's own verdict (dispatch says first whether a CUDA device exists in this process)
    assert ext_impl.LOADED.unavailable_on(torch.device("cuda")) is None


@pytest.mark.parametrize("device", devices_for("ext"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(2, 64, 20), pytest.param((2, 256, 196), marks=pytest.mark.slow, id="2x256x196"), (2, 48, 2)]
)
@pytest.mark.parametrize("iters", [1, 5])
def test_rank_deficient_matches_reference(device, dtype, shape, iters):
    """N < C: Sigma has rank N - 1 plus eps I, so most eigenvalues of A crowd at eps / tr."""
    x, w, g = make_case(*shape, weighted=True, dtype=dtype, seed=iters, device=device)
    assert_close_to_reference("ext", x, w, g, iters=iters)


@pytest.mark.parametrize("device", devices_for("ext"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_eigenvalues_match_reference(device, dtype):
    """Exactly repeated channels: equal eigenvalues, where the divided differences become derivatives."""
    x, w, g = make_case(2, 6, 30, weighted=True, dtype=dtype, device=device)
    x = torch.cat([x, x, x], dim=1)  # C = 18, every direction three times
    g = torch.randn(2, 18 * 19 // 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(x)
    assert_close_to_reference("ext", x, w, g, iters=5)


# --- the CPU eigensolver: Householder + implicit QL up to _C.small_eigh_max(), LAPACK's syevd above ----------


def _small_eigh_max():
    from threeg_kernels import _C

    return _C.small_eigh_max()


@pytest.mark.parametrize("isa", ["baseline", "x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", [0, 1], ids=["own-solver", "syevd"])
def test_eigensolver_either_side_of_its_crossover(monkeypatch, isa, dtype, side):
    """The largest C the own solver takes and the smallest syevd takes (C x C route, N > C), in each instruction-set
    variant: each has its own crossover per dtype."""
    if isa not in _cpu_variants():
        pytest.skip(f"this CPU does not run the {isa} variant (test_every_instruction_set_variant checks the refusal)")
    monkeypatch.setenv("THREEG_EXT_ISA", isa)
    c = _small_eigh_max()[str(dtype).removeprefix("torch.")] + side
    x, w, g = make_case(2, c, c + 9, weighted=True, dtype=dtype, seed=c)
    assert not _ext_impl.gram_route(c, c + 9)
    assert_close_to_reference("ext", x, w, g, iters=5)


@pytest.mark.parametrize("solver", ["own", "syevd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 200, 236), (2, 24, 60), (2, 64, 62), (2, 200, 49)], ids=str)
def test_either_eigensolver_at_any_size(monkeypatch, solver, dtype, shape):
    """THREEG_EXT_EIGH forces one solver at every size: the own one above its crossover (C = 200 is above it in
    float64 in every variant, and in float32 without AVX-512), syevd below it; the C x C route (full rank and rank
    C - 3) and the Gram route (N x N)."""
    monkeypatch.setenv("THREEG_EXT_EIGH", solver)
    x, w, g = make_case(*shape, weighted=True, dtype=dtype, seed=shape[1])
    assert_close_to_reference("ext", x, w, g, iters=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c, n, live", [(96, 120, 40), (128, 140, 60), (64, 40, 20)], ids=["cxc-96", "cxc-128", "gram"])
def test_own_eigensolver_converges_on_rank_deficient_covariances(monkeypatch, dtype, c, n, live):
    """Weights zero at all but `live` positions: rank live - 1, most eigenvalues of A at eps / tr (C x C route) or of
    M at exactly 0 (Gram route), at the rounding level of |T|. The QL iteration must converge there by itself
    (its coupling test relative to |T|; relative to the diagonal neighbours it ran out of sweeps on these inputs and
    the kernels fell back to syevd): THREEG_EXT_EIGH=own-strict raises where it would fall back."""
    monkeypatch.setenv("THREEG_EXT_EIGH", "own-strict")
    x, w, g = make_case(2, c, n, weighted=True, dtype=dtype, seed=c)
    w[:, live:] = 0
    assert _ext_impl.gram_route(c, n) == (n < c)
    assert_close_to_reference("ext", x, w, g, iters=5)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("THREEG_EXT_EIGH", "jacobi", "THREEG_EXT_EIGH must be 'auto', 'own', 'own-strict' or 'syevd'; got 'jacobi'"),
        ("THREEG_EXT_ISA", "avx512", "THREEG_EXT_ISA must be 'auto', 'baseline', 'x86-64-v3' or 'x86-64-v4'; got 'avx"),
    ],
)
def test_kernel_switches_reject_unknown_values(monkeypatch, variable, value, message):
    """The ops refuse the value, naming it; so do the queries that depend on the variant (THREEG_EXT_ISA)."""
    from threeg_kernels import _C

    monkeypatch.setenv(variable, value)
    x, w, g = make_case(2, 8, 12, weighted=False, dtype=torch.float64)
    calls = [lambda: run_pool("ext", x, None, g, iters=5)]
    if variable == "THREEG_EXT_ISA":
        calls += [_C.cpu_variant, _C.small_eigh_max]
    for call in calls:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("isa", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_eigensolver_sizes_are_reported(monkeypatch, isa):
    """Per dtype, for the variant THREEG_EXT_ISA picks: the own solver's share shrinks with the vector width."""
    if isa not in _cpu_variants():
        pytest.skip(f"this CPU does not run the {isa} variant (test_every_instruction_set_variant checks the refusal)")
    monkeypatch.setenv("THREEG_EXT_ISA", isa)
    sizes = _small_eigh_max()
    assert set(sizes) == {"float32", "float64"} and all(isinstance(v, int) and v >= 32 for v in sizes.values())
    assert sizes["float32"] > sizes["float64"]


# --- the CPU kernels compiled once per instruction set (csrc/cpu/cpu_variants.h), THREEG_EXT_ISA -------------

_ISAS = ("baseline", "x86-64-v3", "x86-64-v4")


def _cpu_variants():
    from threeg_kernels import _C

    return _C.cpu_variants()


def test_cpu_variants_are_reported(monkeypatch):
    """The variants this build has and this CPU runs, best last: the baseline always; unset (or 'auto'), the ops
    call the best."""
    from threeg_kernels import _C

    variants = _cpu_variants()
    assert variants[0] == "baseline" and variants == [v for v in _ISAS if v in variants]
    monkeypatch.delenv("THREEG_EXT_ISA", raising=False)
    assert _C.cpu_variant() == variants[-1]
    monkeypatch.setenv("THREEG_EXT_ISA", "auto")
    assert _C.cpu_variant() == variants[-1]


def _variant_case(case, dtype):
    """(B, C, N) of a test case for the variant THREEG_EXT_ISA picks, on either side of its eigensolver crossover
    (`_C.small_eigh_max()`): the own solver (n <= the crossover) or syevd (n above it, and above 128 so that the
    C x C backward forms its symmetric products by halves), on the C x C route (n = C) or the Gram route
    (n = N)."""
    limit = _small_eigh_max()[str(dtype).removeprefix("torch.")]
    big = max(limit, 128) + 8
    shape = {
        "cxc-own": (9, min(limit, 64), 196),
        "cxc-syevd": (2, big, big + 14),
        "gram-own": (9, 48, min(limit, 20)),
        "gram-syevd": (2, big * 16 // 15 + 16, big),
    }[case]
    assert _ext_impl.gram_route(shape[1], shape[2]) == case.startswith("gram")
    return shape


@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["cxc-own", "cxc-syevd", "gram-own", "gram-syevd"])
@pytest.mark.parametrize("keep_iterates", [True, False], ids=["keep", "recompute"])
def test_every_instruction_set_variant(monkeypatch, one_thread, isa, dtype, case, keep_iterates):
    """Each variant the CPU runs matches the reference on both routes with either eigensolver, its saved state kept
    or recomputed in the backward (B = 9 on one thread: a group of eight solved together and one alone); one it
    cannot run is refused, naming it."""
    from threeg_kernels import _C

    monkeypatch.setenv("THREEG_EXT_ISA", isa)
    if isa not in _cpu_variants():
        x, w, g = make_case(2, 16, 30, weighted=True, dtype=dtype, seed=16)
        for call in (_C.cpu_variant, _C.small_eigh_max, lambda: run_pool("ext", x, w, g, keep_iterates=keep_iterates)):
            with pytest.raises(RuntimeError, match=f"THREEG_EXT_ISA='{isa}' needs a CPU with {isa}"):
                call()
        return
    assert _C.cpu_variant() == isa
    shape = _variant_case(case, dtype)
    x, w, g = make_case(*shape, weighted=True, dtype=dtype, seed=shape[1])
    assert_close_to_reference("ext", x, w, g, iters=5, keep_iterates=keep_iterates)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the variants are x86-64 builds")
def test_no_avx_instruction_outside_the_variants():
    """Only the v3 / v4 variants' own code may use AVX (VEX or EVEX encoded) instructions: a function of torch or
    the standard library instantiated under their target and linked in for every caller would fault on a CPU
    without them. Reads the built library's disassembly (objdump, part of the toolchain that built it)."""
    from threeg_kernels import _C

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed here")
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    function, outside, inside = None, set(), set()
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1)
        elif function is not None and re.search(r"\tv[a-z0-9]+\s", line):
            (inside if "::cpu_x86_64_v" in function else outside).add(function)
    assert not outside, sorted(outside)[:10]
    if len(_cpu_variants()) > 1:
        assert inside, "the x86-64-v3/v4 variants were built but none of their code uses AVX"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "c, n", [(24, 40), (64, 196), (64, 62), (48, 20)], ids=["cxc", "cxc-64", "cxc-refined", "gram"]
)
def test_samples_solved_together_equal_each_alone(monkeypatch, one_thread, isa, dtype, c, n):
    """The forward solves the eigenproblems of up to eight samples together (their QL iterations in lockstep, one
    a vector lane, the rotations recorded and applied afterwards in column blocks); a sample alone applies each
    rotation at once. Every element goes through the same operations in the same order either way, so the results
    are equal, bit for bit, in every instruction-set variant: B = 11 on one thread is a full group and a partial
    one, with a non-finite sample inside the latter (NaN there, and only there). At (64, 62), rank 61, every sample
    refines its smallest eigenvalues through its centred features, which a group keeps for one sample only and
    centres again for the others."""
    if isa not in _cpu_variants():
        pytest.skip(f"this CPU does not run the {isa} variant (test_every_instruction_set_variant checks the refusal)")
    monkeypatch.setenv("THREEG_EXT_ISA", isa)
    x, w, g = make_case(11, c, n, weighted=True, dtype=dtype, seed=c)
    x[9, 1, 2] = float("nan")
    whole = run_pool("ext", x, w, g)
    for b in range(11):
        alone = run_pool("ext", x[b : b + 1], w[b : b + 1], g[b : b + 1])
        if b == 9:
            assert all(torch.isnan(t[b]).any() for t in whole), "the non-finite sample must give NaN"
            continue
        for name, together, single in zip(("out", "dx", "dweight"), whole, alone):
            assert torch.isfinite(together[b]).all(), (name, b)
            assert torch.equal(together[b : b + 1], single), (name, b, rel_err(together[b : b + 1], single))


def test_group_whose_first_matrix_overflows(one_thread):
    """A float32 sample whose trace is finite (summed in double) but whose Gram matrix overflows to inf in float32
    reaches the eigensolver, which drops it from the group; it leads the group (chain 0), in a thread whose solver
    is new for this size (the call before is of another N). The other samples are solved as each alone, bit for bit,
    and the overflowed one gives NaN. (The lockstep once took the size from chain 0, never started for a matrix not
    finite: every lane stopped before its first sweep.)"""
    fwd, _ = pool_ops("ext")
    c, n = 16, 11  # the Gram route (n <= 13/16 c)
    assert _ext_impl.gram_route(c, n)
    gen = torch.Generator().manual_seed(5)
    fwd(torch.randn(1, c, n + 1, generator=gen), None, 5, 1e-7, "3g", True, "ieee")  # another size: a new solver next
    x = torch.randn(8, c, n, generator=gen)
    x[0] *= 1e20
    out = fwd(x, None, 5, 1e-7, "3g", True, "ieee")[0]
    assert torch.isnan(out[0]).all()
    for b in range(1, 8):
        alone = fwd(x[b : b + 1].contiguous(), None, 5, 1e-7, "3g", True, "ieee")[0]
        assert torch.equal(out[b : b + 1], alone), (b, rel_err(out[b : b + 1], alone))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c, n", [(64, 62), (128, 124), (17, 16)])
def test_cxc_route_rank_deficient(dtype, c, n):
    """N > 15/16 C (13/16 C below C = 96), N <= C stays on the C x C route with rank N - 1: eps / tr is an
    eigenvalue C - N + 1 times, its eigenvectors any basis of that space (the QL iteration and syevd pick different
    ones)."""
    assert not _ext_impl.gram_route(c, n)
    x, w, g = make_case(2, c, n, weighted=True, dtype=dtype, seed=n)
    assert_close_to_reference("ext", x, w, g, iters=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", ["distinct", "equal"])
def test_cxc_route_diagonal_covariance(dtype, spread):
    """Orthogonal channels: A is diagonal, so every Householder step finds its column already reduced; with equal
    norms A is a multiple of I, one eigenvalue C times."""
    c, n = 24, 40
    gen = torch.Generator().manual_seed(11)
    q = torch.linalg.qr(torch.randn(n, c, generator=gen, dtype=torch.float64)).Q.T  # orthonormal rows
    q = q @ (torch.eye(n, dtype=torch.float64) - 1.0 / n)  # centred rows, still orthogonal to each other
    q = torch.linalg.qr(q.T).Q.T  # re-orthonormalised within the centred subspace
    scales = torch.linspace(1, 3, c, dtype=torch.float64)
    if spread == "equal":
        scales = torch.ones_like(scales)
    x = torch.stack([scales[:, None] * q, 2 * scales.flip(0)[:, None] * q])
    cov = x[0] @ x[0].T
    assert (cov - torch.diag(torch.diagonal(cov))).abs().max() < 1e-12 * cov.abs().max()
    x = x.to(dtype)
    g = torch.randn(2, c * (c + 1) // 2, generator=gen, dtype=torch.float64).to(dtype)
    assert_close_to_reference("ext", x, None, g, iters=5)


# --- the two CPU routes: C x C eigendecomposition, or the N x N Gram matrix (docs/math.md (24)-(29)) ------

_ext_impl = None if _MISSING is not None else __import__("threeg_kernels.backends.ext_impl", fromlist=["gram_route"])


def _saved(c: int, n: int) -> tuple[int, int]:
    """(elements of A, of the kept iterates) that the forward op returns for one sample of C x N."""
    fwd, _ = pool_ops("ext")
    x = torch.randn(1, c, n, dtype=torch.float64)
    _, A, _, iterates = fwd(x, None, 2, 1e-7, "3g", True, "ieee")
    return A.numel(), iterates.shape[1]


def _iterates_width(c: int, n: int) -> int:
    return _saved(c, n)[1]


@pytest.mark.parametrize("c, sixteenths", [(8, 13), (64, 13), (95, 13), (96, 14), (127, 14), (128, 15), (256, 15)])
def test_route_either_side_of_the_crossover(c, sixteenths):
    """The Gram route for N <= 13/16 C below C = 96, 7/8 C below C = 128, 15/16 C from there (docs/ext.md, "Routes"),
    keeping V and m of the N x N Gram matrix and W (C x N): N (N + 1 + C) values a sample against the C x C route's
    C (C + 1) and A; the fake kernel's rule (ext_impl.gram_route) agrees with the C++ one on both sides."""
    below = sixteenths * c // 16  # the last N of the Gram route
    above = below + 1  # the first of the C x C one
    assert _ext_impl.gram_route(c, below) and not _ext_impl.gram_route(c, above)
    if below >= 2:
        assert _iterates_width(c, below) == below * (below + 1 + c) < c * (c + 1) + c * c
    assert _iterates_width(c, above) == c * (c + 1)
    assert _iterates_width(c, 2) == 6 + 2 * c  # N = 2: the Gram route at any C >= 3


def test_gram_route_keeps_less_at_every_n_below_c():
    """What the backward keeps of a sample: on the Gram route V and m of M and W (N (N + 1 + C)) and no A, which its
    backward never reads; on the C x C route A (C^2) and U, L (C (C + 1))."""
    c = 40
    for n in range(2, c):
        a, iterates = _saved(c, n)
        if _ext_impl.gram_route(c, n):
            assert a == 0 and iterates == n * (n + 1 + c), n
        else:
            assert a == c * c and iterates == c * (c + 1), n
        assert a + iterates <= c * c + c * (c + 1), n


def _both_routes_case(dtype):
    """C = 24 with N = 12 (the Gram route) and N = 30 (C x C), the same channels."""
    x, w, g = make_case(2, 24, 30, weighted=True, dtype=dtype, seed=3)
    return (x[..., :12], w[:, :12], g), (x, w, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 48, 2), (2, 40, 3), (3, 96, 40), (2, 200, 49)])
@pytest.mark.parametrize("keep_iterates", [True, False])
def test_gram_route_matches_reference(dtype, shape, keep_iterates):
    """N = 2 and 3 (a rank-1 and rank-2 covariance), 7x7 maps at C = 200."""
    x, w, g = make_case(*shape, weighted=True, dtype=dtype, seed=shape[2])
    assert _ext_impl.gram_route(shape[1], shape[2])
    assert_close_to_reference("ext", x, w, g, iters=5, keep_iterates=keep_iterates)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_gram_route_rank_below_n(dtype, iters):
    """Duplicated positions: Xc has rank N / 2 - 1, so half the Gram matrix's eigenvalues are zero, where its
    eigenvectors are arbitrary and the coefficients of (25)-(28) are derivatives at a."""
    x, w, g = make_case(2, 64, 10, weighted=False, dtype=dtype, seed=iters)
    x = torch.cat([x, x], dim=2)  # N = 20
    assert_close_to_reference("ext", x, None, g, iters=iters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_route_repeated_eigenvalues(dtype):
    """Orthonormal centred features: the Gram matrix is a projection, eigenvalue 1 repeated N - 1 times."""
    c, n = 48, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.linalg.qr(torch.randn(c, n, generator=gen, dtype=torch.float64)).Q
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    x = torch.stack([q @ centring, 2 * q @ centring])
    m = torch.linalg.eigvalsh(x[0].T @ x[0])
    assert (m[1:] - m[-1]).abs().max() < 1e-12  # the case is what it says (float32 rounds it to 1e-7)
    x = x.to(dtype)
    g = torch.randn(2, c * (c + 1) // 2, generator=gen, dtype=torch.float64).to(dtype)
    assert_close_to_reference("ext", x, None, g, iters=5)


def test_routes_agree_in_float64():
    """Both routes against the float64 reference at 1e-12 (RTOL), and the Gram route's K-step function equals the
    C x C route's on the same channels when the extra positions are copies (the same covariance)."""
    assert RTOL[torch.float64] <= 1e-12
    (xg, wg, g), (xc, wc, _) = _both_routes_case(torch.float64)
    for x, w in ((xg, wg), (xc, wc)):
        assert_close_to_reference("ext", x, w, g, iters=5)
    x2 = torch.cat([xg, xg], dim=2)  # N = 24 = C: the C x C route, the covariance of xg
    assert not _ext_impl.gram_route(24, 24) and _ext_impl.gram_route(24, 12)
    a, b = (run_pool("ext", x, None, g, iters=5) for x in (xg, x2))
    for name, u, v in zip(("out", "dx"), a, b):
        v = v if name == "out" else v[..., :12] + v[..., 12:]
        assert rel_err(u, v) <= 1e-12, name


def test_gram_route_gradcheck():
    x, w, _ = make_case(2, 7, 3, weighted=True, dtype=torch.float64, seed=1)
    fn = lambda *t: threeg_kernels.cov_pool(*t, iters=3, backend="ext")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("keep_iterates", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_gram_route_opcheck(keep_iterates, weighted):
    fwd, bwd = pool_ops("ext")
    x, w, g = make_case(2, 9, 4, weighted=weighted, dtype=torch.float64)
    args = (x.requires_grad_(), None if w is None else w.requires_grad_(), 3, 1e-7, "3g", keep_iterates, "ieee")
    torch.library.opcheck(fwd.default, args)
    out, A, tr, iterates = fwd(*args)
    assert iterates.shape == ((2, 4 * (4 + 1 + 9)) if keep_iterates else (0,))
    w = None if w is None else w.detach()
    torch.library.opcheck(bwd.default, (g, x.detach(), w, out, A, tr, iterates, 3, "3g", "ieee"))


@pytest.mark.slow
def test_compile_dynamic_across_the_crossover():
    """torch.compile(dynamic=True): the fake kernel's route guard recompiles when N crosses 13/16 C (C = 8)."""
    fn = lambda a, b: threeg_kernels.cov_pool(a, b, iters=3, backend="ext").sum(-1)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n in (5, 12, 13):  # C = 8: the Gram route, then C x C twice
        x, w, _ = make_case(2, 8, n, weighted=True, dtype=torch.float64, seed=n)
        for a, b in zip(*eager_and_compiled(fn, compiled, x, w)):
            assert rel_err(a, b) <= 1e-12, n


# --- the empty batch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_iterates", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("c, n", [(4, 5), (16, 3)], ids=["cxc", "gram"])
def test_empty_batch(keep_iterates, weighted, c, n):
    """B = 0: outputs of the right shapes with no elements, forward and backward."""
    fwd, bwd = pool_ops("ext")
    x = torch.randn(0, c, n)
    w = torch.rand(0, n) if weighted else None
    out, A, tr, iterates = fwd(x, w, 5, 1e-7, "3g", keep_iterates, "ieee")
    gram = _ext_impl.gram_route(c, n)
    width = n * (n + 1 + c) if gram else c * (c + 1)
    assert out.shape == (0, c * (c + 1) // 2) and A.shape == ((0,) if gram else (0, c, c)) and tr.shape == (0,)
    assert iterates.shape == ((0, width) if keep_iterates else (0,))
    dx, dw = bwd(torch.randn(0, c * (c + 1) // 2), x, w, out, A, tr, iterates, 5, "3g", "ieee")
    assert dx.shape == x.shape and dw.shape == ((0, n) if weighted else (0,))


# --- errors raised by the C++ checks when the ops are called directly --------------------------------


def _good_forward_args(**change):
    x, w, _ = make_case(2, 4, 5, weighted=True, dtype=torch.float32)
    args = dict(x=x, weight=w, iters=3, eps=1e-7, order="3g", keep_iterates=True, precision="ieee")
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(4, 5)), r"x must have shape \(B, C, N\); got 2-d shape \[4, 5\]"),
        (dict(x=torch.randn(2, 4, 5, dtype=torch.float16)), r"x must be float32 or float64.*Half"),
        (dict(x=torch.randn(2, 4, 1)), r"x must have C >= 1 and N >= 2; got shape \[2, 4, 1\]"),
        (dict(weight=torch.rand(2, 6)), r"weight must have shape \(B, N\) = \(2, 5\).*got shape \[2, 6\]"),
        (dict(weight=torch.rand(2, 5, dtype=torch.float64)), r"weight must have the dtype and device of x.*Double"),
        (dict(iters=0), r"iters must be in \[1, 20\]; got 0"),
        (dict(iters=21), r"iters must be in \[1, 20\]; got 21"),
        (dict(eps=-1.0), r"eps must be >= 0; got -1"),
        (dict(order="lower"), r"order must be '3g' or 'mpncov'; got 'lower'"),
        (dict(precision="tf32"), r"precision must be 'ieee' .*got 'tf32'"),
    ],
)
def test_forward_errors_name_the_argument(change, match):
    fwd, _ = pool_ops("ext")
    with pytest.raises(RuntimeError, match=match):
        fwd(**_good_forward_args(**change))


def test_backward_errors_name_the_argument():
    fwd, bwd = pool_ops("ext")
    a = _good_forward_args()
    out, A, tr, iterates = fwd(**a)
    good = dict(
        grad=torch.randn_like(out),
        x=a["x"],
        weight=a["weight"],
        out=out,
        A=A,
        tr=tr,
        iterates=iterates,
        iters=3,
        order="3g",
        precision="ieee",
    )
    bwd(**good)  # the good call passes
    cases = [
        (dict(grad=torch.randn(2, 9)), r"grad must have shape \[2, 10\]; got shape \[2, 9\]"),
        (dict(A=A[:, :3]), r"A must have shape \[2, 4, 4\]"),
        (dict(tr=tr.double()), r"tr must have the dtype and device of x"),
        (dict(iterates=torch.randn(2, 7)), r"iterates must have shape \[2, 20\]; got shape \[2, 7\]"),
        (dict(iters=0), r"iters must be in \[1, 20\]; got 0"),
        (dict(order="upper"), r"order must be '3g' or 'mpncov'; got 'upper'"),
        (dict(precision="bf16"), r"precision must be 'ieee' .*got 'bf16'"),
    ]
    for change, match in cases:
        with pytest.raises(RuntimeError, match=match):
            bwd(**{**good, **change})


# ------------------------------------------------------------------------------------- the C++ autograd node


def _op_gradient(x, weight, grad, iters=3, keep=True):
    """(out, dx, dweight) of the ops called directly, the formula every autograd path must give bit for bit."""
    out, A, tr, iterates = torch.ops.threeg.cov_pool_ext_forward(x, weight, iters, 1e-7, "3g", keep, "ieee")
    dx, dw = torch.ops.threeg.cov_pool_ext_backward(grad, x, weight, out, A, tr, iterates, iters, "3g", "ieee")
    return out, dx, (dw if weight is not None else None)


@pytest.mark.parametrize("device", devices_for("ext"))
@pytest.mark.parametrize("leaves", ["x", "weight", "both"])
@pytest.mark.parametrize("keep", [True, False])
def test_eager_node_is_the_ops_formula(device, leaves, keep):
    """Eager calls that need a gradient run the C++ node (csrc/autograd.cpp): the ops' outputs and gradients bit for
    bit, for every input that needs one and none for the others, with or without the kept iterates."""
    x, w, g = make_case(3, 12, 20, weighted=True, dtype=torch.float32, device=device)
    want = _op_gradient(x, w, g, keep=keep)
    xl = x.detach().requires_grad_(leaves in ("x", "both"))
    wl = w.detach().requires_grad_(leaves in ("weight", "both"))
    out = threeg_kernels.cov_pool(xl, wl, iters=3, backend="ext", keep_iterates=keep)
    assert "CovPoolExt" in type(out.grad_fn).__name__ or "CovPoolExt" in out.grad_fn.name()
    assert torch.equal(out, want[0])
    out.backward(g)
    assert (xl.grad is None) == (leaves == "weight") and (wl.grad is None) == (leaves == "x")
    if xl.grad is not None:
        assert torch.equal(xl.grad, want[1])
    if wl.grad is not None:
        assert torch.equal(wl.grad, want[2])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward(g)  # the saved tensors are freed after the first backward, as for any autograd node


def test_eager_node_unweighted_and_double_backward_of_one_leaf():
    """weight=None, and create_graph=True where only the weight needs a gradient (the reference gradient's dx is
    None there): both against the reference."""
    x, w, g = make_case(2, 6, 9, weighted=True, dtype=torch.float64)
    assert_close_to_reference("ext", x, None, g, iters=3)
    xl, wl = x.clone(), w.clone().requires_grad_()
    out = threeg_kernels.cov_pool(xl, wl, iters=3, backend="ext")
    (dw,) = torch.autograd.grad(out, wl, g, create_graph=True)
    assert dw.requires_grad
    wr = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(threeg_kernels.cov_pool(x, wr, iters=3, backend="reference"), wr, g)
    assert rel_err(dw, want) <= 1e-12


def test_eager_node_checks_its_arguments():
    """_C.pool is reachable from Python: wrong types raise TypeError naming the argument; the ops' own checks
    (ValueError / RuntimeError from TORCH_CHECK) still run."""
    from threeg_kernels import _C

    x = torch.randn(2, 4, 6, requires_grad=True)
    ok = (x, None, 3, 1e-7, "3g", True, "ieee")
    for i, (name, bad) in enumerate(
        [
            ("x", x.numpy(force=True)),
            ("weight", 1.0),
            ("iters", 3.0),
            ("eps", "1e-7"),
            ("order", None),
            ("keep_iterates", 1),
            ("precision", b"ieee"),
        ]
    ):
        args = list(ok)
        args[i] = bad
        with pytest.raises(TypeError, match=f"{name} must be"):
            _C.pool(*args)
    with pytest.raises(TypeError, match="takes 7 positional arguments; got 6"):
        _C.pool(*ok[:6])
    with pytest.raises(ValueError, match="iters is out of range"):
        _C.pool(x, None, 2**70, 1e-7, "3g", True, "ieee")
    # what the op's schema takes (int, float) is taken here too: a numpy integer, an int eps
    want = _C.pool(x, None, 3, 0.0, "3g", True, "ieee")
    assert torch.equal(_C.pool(x, None, np.int64(3), 0, "3g", True, "ieee"), want)
    with pytest.raises(RuntimeError, match="order"):
        _C.pool(x, None, 3, 1e-7, "upper", True, "ieee")
    with pytest.raises(TypeError, match="callable"):
        _C.set_reference_gradient(3)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_eager_node_autograd_machinery():
    """What autograd offers around any node works around this one: saved-tensor hooks see (and may replace) what it
    saves, anomaly mode names the forward that made a NaN gradient, a backward inside an autocast region computes in
    the forward's dtype, and retain_graph keeps its saved tensors for a second backward."""
    x, w, g = make_case(2, 6, 9, weighted=True, dtype=torch.float32)
    want = _op_gradient(x, w, g)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    xl = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = threeg_kernels.cov_pool(xl, w, iters=3, backend="ext")
    assert torch.Size(x.shape) in packed and torch.Size(w.shape) in packed and len(packed) == 6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.backward(g, retain_graph=True)
    assert xl.grad.dtype == torch.float32 and torch.equal(xl.grad, want[1])
    out.backward(g)
    assert torch.equal(xl.grad, 2 * want[1])
    with pytest.warns(UserWarning, match="Traceback of forward call"), torch.autograd.detect_anomaly():
        xl = x.clone().requires_grad_()
        out = threeg_kernels.cov_pool(xl, w, iters=3, backend="ext")
        with pytest.raises(RuntimeError, match="returned nan values"):
            out.backward(torch.full_like(g, float("nan")))


def test_eager_node_reference_gradient_errors():
    """Under create_graph=True the node's backward calls the registered reference gradient: an exception there
    reaches the caller of backward as it was raised; a malformed return is refused, saying what was expected."""
    from threeg_kernels import _C, _registration

    class Boom(Exception):
        pass

    def raising(*args):
        raise Boom("from the reference gradient")

    x, w, g = make_case(2, 5, 8, weighted=True, dtype=torch.float64)
    try:
        for fn, error, match in (
            (raising, Boom, "from the reference gradient"),
            (lambda *a: 3, RuntimeError, "must return"),
        ):
            _C.set_reference_gradient(fn)
            xl = x.clone().requires_grad_()
            out = threeg_kernels.cov_pool(xl, w, iters=3, backend="ext")
            with pytest.raises(error, match=match):
                torch.autograd.grad(out, xl, g, create_graph=True)
    finally:
        _C.set_reference_gradient(_registration.reference_gradient)
    xl = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(threeg_kernels.cov_pool(xl, w, iters=3, backend="ext"), xl, g, create_graph=True)
    assert dx.requires_grad
