"""The benchmark (python -m benchmarks.pool_speed): FLOP model, baselines, timing helpers, writers, runs."""

from __future__ import annotations

import functools
import json
import textwrap

import pytest
import torch

import threeg_kernels
from benchmarks import baselines, flops
from benchmarks.baselines import BASELINES
from benchmarks.common import interleaved_ms, markdown_table, percentiles, saved_tensor_bytes, time_ms
from benchmarks.flops import cov_pool_flops, floors, totals, triton_launches
from benchmarks.pool_speed import RECORD_KEYS, main, present_backends, unsupported_options, write_json, write_plot
from tests.helpers import make_case, rel_err
from threeg_kernels import reference

# ------------------------------------------------------------------------------------------- FLOP model


def test_flops_hand_count():
    # B=1, C=2, N=3: a general 2x2x2 product is F = 2*1*2^3 = 16 FLOP, one with a symmetric result
    # H = 1*2^2*3 = 12 (3 entries of one triangle, 2C = 4 FLOP each); the covariance (3 entries, 2N = 6
    # each) 18; dL/dX_w = 2 dSigma Xc / N (4 entries, 2N = 6 each) 24.
    # K=1: fwd = cov + Y_1 = A T_1 (H)              = 18 + 12        = 30;  bwd = dY T_1 (F) + dX_w  = 16 + 24 = 40
    # K=2: fwd = cov + A T_1, Z Y, Y T (3 H)         = 18 + 36        = 54
    #      bwd = step 2 (Y dY, dY T: 2 F; Y dY Y: H) + step 1 (F) + dX_w = 32 + 12 + 16 + 24 = 84
    # K=3: fwd = cov + (1 + 2 * 3 - 1) H             = 18 + 72        = 90
    #      bwd = 84 + one middle step (4 F + 2 H = 88) = 172
    hand = {1: (30, 40), 2: (54, 84), 3: (90, 172)}
    for k, (fwd, bwd) in hand.items():
        assert cov_pool_flops(1, 2, 3, k, "fwd") == fwd
        assert cov_pool_flops(1, 2, 3, k, "bwd") == bwd
        assert cov_pool_flops(1, 2, 3, k, "full") == fwd + bwd
    # the forward's 12 products at K=5, and about 220 GFLOP fwd+bwd at the ResNet-3G size
    assert cov_pool_flops(1, 4, 2, 5, "fwd") - 1 * 4 * 5 * 2 == 12 * (4 * 4 * 5)
    assert cov_pool_flops(256, 256, 196, 5, "full") == pytest.approx(220e9, rel=0.01)
    with pytest.raises(ValueError, match="mode"):
        cov_pool_flops(1, 2, 3, 1, "both")


def test_triton_launch_model_hand_count():
    # B=1, C=32, N=16, 16-wide tiles and steps: T = 2 tiles a side; a triangle of tiles is 3 of the 4.
    # FLOPs: one tile product 2*16*16*32 = 16384; a product on a triangle of tiles 3 * 16384 = 49152, on every
    # tile 65536; covariance 3 tiles * 2*16*16*16 = 24576; covariance backward 2 * N 16 * C 32 * C 32 = 32768.
    # Bytes (float32): a C x C matrix 4096, x 2048, w 64, packed out 528*4 = 2112, tr 4, a (C,) row 128.
    blocks = dict(block=16, block_k=16, block_n=16)
    launches = triton_launches(1, 32, 16, 2, **blocks)
    # K=2 forward: covariance (x, w -> Sigma) 6208; step 1 (Sigma -> A, Y_1, Z_1, tr) 16388; T_2 (Z, Y -> T,
    # every tile) 12288; Y_2 (T, Y, tr -> packed out; the triangle's tiles) 10308
    assert [(a.kernel, a.flops, a.bytes) for a in launches if a.phase == "fwd"] == [
        ("covariance_forward_kernel", 24576, 6208),
        ("ns_first_step_kernel", 49152, 16388),
        ("ns_t_kernel", 65536, 12288),
        ("ns_step_kernel", 49152, 10308),
    ]
    # K=2 backward: triangle (grad, out, tr -> dY, 2x2 partial sums) 8340; dT_2 = Y^T dY (2 read, 1 written)
    # 12288; the reverse step (dY, dT, T, Y, Z -> dY_1, dZ_1: 3 products) 28672; step 1 (dY, A, dZ -> sym(dA),
    # 2x32 row sums 256: 2 products on a triangle of tiles) 16640; row means (x, w -> mu, r) 2368; covariance
    # backward (dA, tr, 64 + 4 partial sums, x, w, mu, r -> dx, dw) 8852
    assert [(a.kernel, a.flops, a.bytes) for a in launches if a.phase == "bwd"] == [
        ("scatter_triangle_kernel", 0, 8340),
        ("ns_backward_dt_kernel", 65536, 12288),
        ("ns_backward_step_kernel", 196608, 28672),
        ("ns_backward_first_step_kernel", 98304, 16640),
        ("row_mean_kernel", 0, 2368),
        ("covariance_backward_kernel", 32768, 8852),
    ]
    assert totals(launches)["full"] == dict(launches=10, flops=581632, bytes=122352)
    # K=1: step 1 packs the output (reads Sigma, writes A, tr, out: 10308); the backward has no sweep and
    # step 1 reads dY and A only (12544)
    one = totals(triton_launches(1, 32, 16, 1, **blocks))
    assert one["fwd"] == dict(launches=2, flops=24576 + 49152, bytes=6208 + 10308)
    assert one["bwd"] == dict(launches=4, flops=98304 + 32768, bytes=8340 + 12544 + 2368 + 8852)
    # no weights: w is neither read (3 launches) nor dw written: 64 bytes each
    bare = totals(triton_launches(1, 32, 16, 2, weighted=False, **blocks))
    assert (bare["fwd"]["bytes"], bare["bwd"]["bytes"]) == (45192 - 64, 77160 - 3 * 64)
    # recompute: the backward runs step 1 from A (A -> Y_1, Z_1: 12288) and T_2 (12288) again
    again = totals(triton_launches(1, 32, 16, 2, keep=False, **blocks))
    assert again["bwd"] == dict(launches=8, flops=393216 + 49152 + 65536, bytes=77160 + 2 * 12288)


def test_triton_launch_model_at_the_resnet_size():
    # the default launch settings of a GPU at C=256, N=196: 64-wide tiles, so a triangle of tiles is 10 of 16
    launches = triton_launches(256, 256, 196, 5, block=64, block_k=16, block_n=32)
    t = totals(launches)
    assert (t["fwd"]["launches"], t["bwd"]["launches"]) == (10, 12)  # 2K and 2K + 2
    assert t["fwd"]["bytes"] == pytest.approx(2.37e9, rel=0.005)
    assert t["bwd"]["bytes"] == pytest.approx(3.92e9, rel=0.005)
    # F = one product on every tile. Forward: step 1 and the packed Y_K on 10 of 16 tiles, 3K - 5 = 10 whole
    # products between; backward: 4 + 6 (K - 2) = 22 whole products, step 1's two on 10 of 16 tiles; the
    # covariance (N padded to 7 tiles of 32) both ways.
    F = 2 * 256 * 256**3
    cov = 256 * 10 * 2 * 64 * 64 * 224
    assert t["fwd"]["flops"] == cov + 2 * F * 10 // 16 + 10 * F
    assert t["bwd"]["flops"] == 22 * F + 2 * F * 10 // 16 + 2 * 256 * 224 * 256 * 256
    assert t["full"]["flops"] == pytest.approx(308.6e9, rel=0.001)
    assert len(triton_launches(256, 256, 196, 5, keep=False, block=64, block_k=16, block_n=32)) == 10 + 20  # 4K
    # at least 1.31 ms of memory traffic at 4.8 TB/s in every precision mode; per-launch floors add up to no
    # less than either bound alone
    for peak in flops.PEAKS.values():
        f = floors(launches, flops.HBM_NOMINAL, peak)["full"]
        assert f["memory"] == pytest.approx(1.309e-3, rel=0.002)
        assert f["roofline"] >= max(f["memory"], f["compute"])


def test_triton_launch_model_default_blocks_follow_the_library(monkeypatch):
    # the GPU default of the triton backend (what runs with THREEG_TRITON_AUTOTUNE=0) at the ResNet size
    _tiles = pytest.importorskip("threeg_kernels.triton_kernels._tiles")
    monkeypatch.setattr(_tiles, "INTERPRET", False)
    assert flops.default_blocks(256, 196) == (64, 16, 32)
    assert triton_launches(256, 256, 196, 5) == triton_launches(256, 256, 196, 5, block=64, block_k=16, block_n=32)


def test_flops_cli_prints_launches_totals_and_floors(capsys):
    small = ["--C", "32", "--N", "16", "--K", "2", "--block", "16", "--block-k", "16", "--block-n", "16"]
    flops.main(["--B", "2", *small])
    text = capsys.readouterr().out
    assert "| ns_backward_step_kernel | bwd | dY_1, dZ_1 |" in text
    assert "| full | 10 | 0.0 |" in text and "Memory alone, fwd+bwd" in text
    flops.main(["--B", "1", *small, "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["totals"]["full"] == dict(launches=10, flops=581632, bytes=122352)
    with pytest.raises(SystemExit):
        flops.main(["--block", "16"])
    assert "--block, --block-k and --block-n go together" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize(
    "name,iters,order",
    [
        ("isqrt-style", 5, "3g"),
        ("isqrt-style", 1, "mpncov"),
        ("autograd-style", 5, "3g"),
        ("autograd-style", 1, "mpncov"),
        pytest.param("compile-ref", 5, "3g", marks=pytest.mark.slow),
    ],  # one compile-ref case: a compile takes 15-40 s on 2 CPU cores
)
def test_baselines_agree_with_reference_float64(name, iters, order):
    # C=64 as in --quick: compile-ref specialises on C (B and N stay dynamic), so the smoke run below
    # reuses this compiled graph
    x, weight, grad = make_case(2, 64, 49, weighted=True, dtype=torch.float64, seed=1)
    method = BASELINES[name]

    got = _grads(lambda x, w: method.fn(x, w, iters, method.eps, order), x, weight, grad)
    want = _grads(lambda x, w: reference.cov_pool(x, w, iters, method.eps, order), x, weight, grad)
    for what, g, w in zip(("out", "dx", "dweight"), got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < 1e-12, f"{name} {what}: {rel_err(g, w):.1e}"


def _grads(fn, x, weight, grad):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out = fn(x, weight)
    return (out, *torch.autograd.grad(out, (x, weight), grad))


def test_eigh_baseline_is_the_exact_square_root():
    x, weight, _ = make_case(2, 6, 20, weighted=True, dtype=torch.float64, seed=2)  # N > C: well conditioned
    out = baselines.eigh_sqrt(x, weight, 5)
    S = torch.zeros(2, 36, dtype=torch.float64)
    S[:, reference.triangle_indices(6, "3g")] = out
    S = S.view(2, 6, 6).tril()
    S = S + S.tril(-1).transpose(1, 2)
    sigma = reference.weighted_covariance(x, weight, baselines.EPS)
    assert torch.allclose(S @ S, sigma, rtol=0, atol=1e-12)
    assert BASELINES["eigh"].exact


# -------------------------------------------------------------------------------------- timing helpers


def test_percentiles_and_time_ms_with_setup():
    assert percentiles([5.0, 1.0, 4.0, 2.0, 3.0]) == [1.0, 3.0, 4.0]
    assert percentiles([float(v) for v in range(1, 11)]) == [2.0, 5.0, 8.0]
    assert percentiles([7.0]) == [7.0, 7.0, 7.0]
    calls = []
    samples = time_ms(lambda s: calls.append(s), torch.device("cpu"), warmup=2, repeats=3, setup=lambda: "fresh")
    assert len(samples) == 3 and all(ms >= 0 for ms in samples)
    assert calls == ["fresh"] * 5


def test_interleaved_ms_and_markdown_table():
    calls = []
    samples = interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", rounds=2)
    assert calls == ["a", "b"] * 3  # one untimed call each, then two rounds in turn
    assert {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2}
    assert markdown_table(["x", "y"], [["1", "2"]]) == "| x | y |\n|---|---|\n| 1 | 2 |"
    # with setups (what a backward-only timing needs): each call gets a fresh setup result; warmup=0: no untimed call
    calls.clear()
    fns = {"a": lambda s: calls.append(("a", s)), "b": lambda: calls.append("b")}
    samples = interleaved_ms(fns, "cpu", rounds=2, warmup=0, setups={"a": lambda: "fresh"})
    assert calls == [("a", "fresh"), "b"] * 2
    # shuffle: every round calls each fn once, in an order of its own that is the same in every run
    names = [str(i) for i in range(6)]
    runs = []
    for _ in range(2):
        order = []
        interleaved_ms({k: functools.partial(order.append, k) for k in names}, "cpu", rounds=8, warmup=0, shuffle=True)
        runs.append(order)
    assert runs[0] == runs[1]
    rounds = [runs[0][6 * r : 6 * r + 6] for r in range(8)]
    assert all(sorted(r) == names for r in rounds)
    predecessors_of_0 = {r[r.index("0") - 1] for r in rounds if r.index("0") > 0}
    assert len(predecessors_of_0) > 1  # not one fixed cyclic order


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(64, 64, requires_grad=True)
    assert saved_tensor_bytes(lambda: (x * x).sum()) == x.nbytes  # x saved twice, one storage
    y = torch.randn(64, 64, requires_grad=True)
    assert saved_tensor_bytes(lambda: (x @ y).sum()) == x.nbytes + y.nbytes
    assert saved_tensor_bytes(lambda: (x[:8] * y[:8]).sum()) == x.nbytes + y.nbytes  # views keep their storage


# ------------------------------------------------------------------------------------------- the runs


def _check_schema(record: dict) -> None:
    assert tuple(record) == RECORD_KEYS
    assert record["op"] == "cov_pool" and record["kind"] in ("backend", "baseline")
    assert record["mode"] in ("fwd", "bwd", "full")
    assert all(isinstance(record[k], int) for k in ("B", "C", "N", "K"))
    assert record["ms_p20"] <= record["ms_p50"] <= record["ms_p80"]
    assert record["tflops"] > 0 and record["peak_mb"] > 0
    assert isinstance(record["speedup_vs"], dict) and record["max_rel_err"] >= 0
    assert all(isinstance(record[k], str) for k in ("dtype", "device_name", "torch_version", "git_sha", "timestamp"))
    if record["kind"] == "backend":
        assert record["precision"] == "ieee" and record["iterates"] in ("default", "keep", "recompute")
    else:
        assert record["precision"] is None and record["iterates"] is None


@pytest.mark.slow  # compile-ref compiles here unless the agreement test above already did
def test_quick_run_writes_every_backend_and_baseline(tmp_path, capsys):
    # float64 (the default is float32): the compiled graph is then the one the float64 agreement test
    # above made, so the file pays for one compile; and every K-step method must match to 1e-10.
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    main(
        [
            "--quick",
            "--B",
            "4",
            "--dtype",
            "float64",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--no-progress",
        ]
    )
    table = capsys.readouterr().out
    records = json.loads(out_json.read_text())
    backends = present_backends(torch.device("cpu"))
    assert "triton" not in backends
    expected = {(m, mode) for m in backends + list(BASELINES) for mode in ("fwd", "bwd", "full")}
    assert {(r["backend"], r["mode"]) for r in records} == expected
    for r in records:
        _check_schema(r)
        assert (r["B"], r["C"], r["N"], r["K"], r["dtype"]) == (4, 64, 49, 5, "float64")
        if r["kind"] == "backend":
            assert set(r["speedup_vs"]) == set(BASELINES)
        if r["backend"] != "eigh":
            assert r["max_rel_err"] < 1e-10, r
        assert f"| {r['backend']}" in table
    assert "exact sqrt" in table and out_png.stat().st_size > 0


def test_regimes_grid_tables_json_and_plot(tmp_path, capsys, monkeypatch):
    """--regimes: the (C, N) list at one B, fwd+bwd only, every baseline but compile-ref, the per-shape table and
    the speed-up table, JSON and PNG (here at small shapes: the real grid takes minutes)."""
    from benchmarks import pool_speed

    assert (256, 49) in pool_speed.REGIMES and (512, 196) in pool_speed.REGIMES and (64, 196) in pool_speed.REGIMES
    monkeypatch.setattr(pool_speed, "REGIMES", [(6, 4), (5, 9)])
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--regimes", "--B", "2", "--repeats", "1", "--warmup", "0", "--no-progress"]
    main(argv + ["--json", str(out_json), "--plot", str(out_png)])
    table = capsys.readouterr().out
    records = json.loads(out_json.read_text())
    assert {(r["B"], r["C"], r["N"]) for r in records} == {(2, 6, 4), (2, 5, 9)}
    assert {r["mode"] for r in records} == {"full"}
    baselines_run = {r["backend"] for r in records if r["kind"] == "baseline"}
    assert baselines_run == set(BASELINES) - {"compile-ref"}
    assert "| ms p50 | C=6 N=4 | C=5 N=9 |" in table and "| torch vs isqrt-style * |" in table
    assert out_png.stat().st_size > 0
    # the methods' timed calls at a shape take turns (one each per round), so that the speed-ups compare calls
    # made in the same spell of the machine: a spy on the timer sees the labels cycle
    order = []
    time_ms = pool_speed.time_ms

    def spy(fn, device, warmup=1, repeats=5, setup=None):
        order.append(fn)
        return time_ms(fn, device, warmup, repeats, setup)

    monkeypatch.setattr(pool_speed, "REGIMES", [(6, 4)])
    monkeypatch.setattr("benchmarks.common.time_ms", spy)
    # (--plot too: without it the PNG would go to benchmarks/results/, over the committed one)
    argv = ["--regimes", "--B", "2", "--repeats", "3", "--warmup", "1", "--no-progress", "--json", str(out_json)]
    main(argv + ["--plot", str(tmp_path / "r2.png")])
    methods = len(baselines_run) + len({r["backend"] for r in records if r["kind"] == "backend"})
    assert len(order) == 4 * methods  # one untimed round, three timed ones
    first = order[:methods]
    assert len(set(map(id, first))) == methods
    for r in range(1, 4):
        assert sorted(map(id, order[r * methods : (r + 1) * methods])) == sorted(map(id, first))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--regimes", "--C", "64"])
    assert "--regimes sets C and N itself" in capsys.readouterr().err


def test_iterates_keep_and_recompute(tmp_path, capsys):
    # cov_pool(keep_iterates=True / False) on every backend that has the switch ('reference' has none):
    # the same numbers, and recomputing saves fewer bytes for backward (the CPU peak MB)
    out_json = tmp_path / "iterates.json"
    argv = ["--device", "cpu", "--B", "2", "--C", "16", "--N", "20", "--dtype", "float64", "--modes", "fwd", "full"]
    argv += ["--repeats", "1", "--warmup", "0", "--baselines", "--iterates", "keep", "recompute", "--no-progress"]
    main(argv + ["--json", str(out_json)])
    records = json.loads(out_json.read_text())
    switched = [b for b in present_backends(torch.device("cpu")) if b != "reference"]
    expected = {(b, it, m) for b in switched for it in ("keep", "recompute") for m in ("fwd", "full")}
    assert {(r["backend"], r["iterates"], r["mode"]) for r in records} == expected
    for r in records:
        _check_schema(r)
        assert r["max_rel_err"] < 1e-10, r
    saved = {(r["backend"], r["iterates"]): r["peak_mb"] for r in records if r["mode"] == "full"}
    for b in switched:
        assert saved[(b, "recompute")] < saved[(b, "keep")], saved
    assert f"| {switched[0]} recompute |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backends", "torch", "--precision", "ieee", "bf16"], "--precision ieee bf16: backend 'torch' supports"),
        (["--precision", "tf32"], "--precision tf32: no backend present on cpu supports it"),
        (["--backends", "reference", "--iterates", "recompute"], "backend 'reference' ignores keep_iterates"),
    ],
)
def test_precision_and_iterates_only_where_supported(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv + ["--device", "cpu"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m benchmarks.pool_speed: error: ") and message in last, last


def test_supported_options_come_from_the_backends():
    cpu = torch.device("cpu")
    assert unsupported_options("torch", cpu, ["ieee"], ["default", "keep", "recompute"]) is None
    assert "precision ieee" in unsupported_options("torch", cpu, ["tf32x3"], ["default"])
    if "triton" in threeg_kernels.available_backends(cpu):  # under Triton's interpreter (tests/conftest.py)
        assert unsupported_options("triton", cpu, ["ieee", "tf32x3", "tf32", "bf16"], ["keep", "recompute"]) is None


def _record(backend, kind, mode, b, ms):
    return dict(
        op="cov_pool",
        backend=backend,
        kind=kind,
        mode=mode,
        B=b,
        C=8,
        N=6,
        K=5,
        dtype="float32",
        precision="ieee" if kind == "backend" else None,
        iterates="default" if kind == "backend" else None,
        ms_p20=0.9 * ms,
        ms_p50=ms,
        ms_p80=1.1 * ms,
        tflops=1.0,
        peak_mb=1.0,
        speedup_vs={},
        max_rel_err=1e-7,
        err_vs="reference, float64",
        device_name="cpu",
        torch_version=torch.__version__,
        triton_version=None,
        git_sha="abc",
        timestamp="2026-11-26T00:00:00+00:00",
    )


def test_json_and_plot_writers(tmp_path):
    records = [
        _record(name, kind, mode, b, b * (2.0 if kind == "baseline" else 1.0))
        for name, kind in (("torch", "backend"), ("eigh", "baseline"))
        for mode in ("fwd", "full")
        for b in (2, 4, 8)
    ]
    write_json(records, tmp_path / "sub" / "r.json")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == records
    write_plot(records, tmp_path / "r.png")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "r.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ------------------------------------------------------------------------------ upstream, fake checkout

FAKE_3G = """
    import torch
    from threeg_kernels import reference

    def cov_forward(x):  # (B, C, H, W) -> Sigma with 1e-7 I, as 3G-Net's
        return reference.weighted_covariance(x.flatten(2), None, 1e-7)

    def sqrt_forward(x, numIters):
        A, tr = reference.trace_normalise(x)
        return reference.newton_schulz(A, numIters) * tr.sqrt()[:, None, None]

    def triu_forward(x):
        return reference.pack_triangle(x, "3g")
"""

FAKE_MPNCOV = """
    import torch
    from torch import nn
    from threeg_kernels import reference

    class MPNCOV(nn.Module):
        def __init__(self, iterNum=3, is_sqrt=True, is_vec=True, input_dim=2048, dimension_reduction=None):
            super().__init__()
            self.iterNum = iterNum

        def forward(self, x):  # (B, C, H, W) -> (B, C(C+1)/2, 1), no eps, upper triangle row by row
            return reference.cov_pool(x.flatten(2), None, self.iterNum, 0.0, "mpncov").unsqueeze(-1)
"""


def _fake_checkout(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_upstream_options_with_a_fake_checkout(tmp_path, capsys):
    # laid out as the published repositories are: 3G-Net's head in models/ResNet_3G.py
    root = _fake_checkout(
        tmp_path / "up", {"models/ResNet_3G.py": FAKE_3G, "src/representation/MPNCOV.py": FAKE_MPNCOV}
    )
    out_json = tmp_path / "up.json"
    main(
        [
            "--B",
            "2",
            "--C",
            "8",
            "--N",
            "6",
            "--modes",
            "full",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--backends",
            "reference",
            "--baselines",
            "--upstream-3g",
            str(root),
            "--upstream-mpncov",
            str(root),
            "--json",
            str(out_json),
            "--no-progress",
        ]
    )
    records = {r["backend"]: r for r in json.loads(out_json.read_text())}
    assert set(records) == {"reference", "upstream-3g", "upstream-mpncov"}
    for r in records.values():
        _check_schema(r)
        assert r["max_rel_err"] < 1e-5, r  # each checked against the reference with its own eps and order
    assert set(records["reference"]["speedup_vs"]) == {"upstream-3g", "upstream-mpncov"}
    out = capsys.readouterr().out
    assert "upstream-mpncov †" in out and "upstream-3g †" in out and "upstream-3g *" not in out


def test_upstream_options_say_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--upstream-3g", str(tmp_path / "nowhere")])
    assert "models/ResNet_3G.py or models/resnet.py" in capsys.readouterr().err
    broken = _fake_checkout(tmp_path / "broken", {"models/resnet.py": "def cov_forward(x):\n    return x\n"})
    with pytest.raises(SystemExit):
        main(["--upstream-3g", str(broken)])
    assert "sqrt_forward, triu_forward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--upstream-mpncov", str(broken)])
    assert "src/representation/MPNCOV.py" in capsys.readouterr().err


@pytest.mark.skipif("ext" not in threeg_kernels.available_backends("cpu"), reason="the ext backend is not built")
def test_ext_eigensolver_crossover_table(capsys, monkeypatch):
    """benchmarks.ext_cpu_speed --eigh: a row per dtype and C, both solvers timed, their results agreeing; the
    switch it sets is restored afterwards."""
    from benchmarks import ext_cpu_speed

    monkeypatch.setenv("THREEG_EXT_EIGH", "auto")
    ext_cpu_speed.main(["--eigh", "6", "9", "--B", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| float")]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| float32", "6"],
        ["| float32", "9"],
        ["| float64", "6"],
        ["| float64", "9"],
    ]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0
        assert float(cells[5]) < (1e-4 if cells[0] == "float32" else 1e-12), r
    import os

    assert os.environ["THREEG_EXT_EIGH"] == "auto"
    with pytest.raises(SystemExit):
        ext_cpu_speed.main(["--eigh", "0"])
    with pytest.raises(SystemExit):
        ext_cpu_speed.main(["--eigh", "--tricks"])
    assert "--eigh and --tricks are separate runs" in capsys.readouterr().err
