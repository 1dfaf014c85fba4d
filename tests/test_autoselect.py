"""backend="auto" decided by measurement (threeg_kernels/autoselect.py), on CPU: the selection logic with fake
timings and fake failures (choice, ties, rejections, cache file, batch buckets, the off switch, the
capture / compile / out-of-memory fallbacks), then the real measuring path end to end on CPU tensors with a
CPU timer substituted. CPU 'auto' itself is not measured for users: the tests add a CPU row to CANDIDATES."""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

import threeg_kernels
from tests.helpers import rel_err
from threeg_kernels import autoselect, dispatch
from threeg_kernels.backends import Loaded

CUDA_CANDIDATES = autoselect.CANDIDATES["cuda"]
TRITON_PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")


def _never(*args):
    raise AssertionError("the fake backends are run through the fake `run` only")


class FakeBackends:
    """Backends named like the real ones; `run` and `timer` substitutes that look up each candidate's output
    error, time and exception in tables, and record every (backend, precision) run."""

    def __init__(self):
        self.available = {
            name: Loaded(pool=_never, unavailable_on=lambda device: None, precisions=precisions)
            for name, precisions in (
                ("triton", TRITON_PRECISIONS),
                ("ext", ("ieee",)),
                ("torch", ("ieee",)),
                ("reference", ("ieee",)),
            )
        }
        self._names = {id(loaded): name for name, loaded in self.available.items()}
        self.ms: dict = {}  # (backend, precision) -> ms (default 1.0)
        self.err: dict = {}  # (backend, precision) -> relative error of its output
        self.raises: dict = {}  # (backend, precision) -> exception
        self.runs: list = []

    def run(self, loaded, precision, inputs):
        candidate = (self._names[id(loaded)], precision)
        self.runs.append(candidate)
        if candidate in self.raises:
            raise self.raises[candidate]
        out = torch.ones(4, dtype=inputs.x.dtype) * (1 + self.err.get(candidate, 0.0))
        return out, torch.ones(3, dtype=inputs.x.dtype), torch.ones(2, dtype=inputs.x.dtype)

    def timer(self, fn, device):
        fn()
        return self.ms.get(self.runs[-1], 1.0)

    def choose(self, b=8, c=4, n=6, dtype=torch.float32, precision="ieee", weighted=False, iters=5):
        x = torch.zeros(b, c, n, dtype=dtype)
        w = torch.ones(b, n, dtype=dtype) if weighted else None
        return autoselect.choose(x, w, iters, precision, self.available)


@pytest.fixture
def fresh(monkeypatch):
    """No decisions, no cache file, tuning on; forgets what the test decided."""
    monkeypatch.delenv(autoselect.ENV_CACHE, raising=False)
    monkeypatch.delenv(autoselect.ENV_TUNE, raising=False)
    autoselect.clear()
    yield
    autoselect.clear()


@pytest.fixture
def fake(fresh, monkeypatch):
    """CPU measured like CUDA (its candidates), with fake backends, outputs and times."""
    backends = FakeBackends()
    monkeypatch.setitem(autoselect.CANDIDATES, "cpu", CUDA_CANDIDATES)
    monkeypatch.setattr(autoselect, "run", backends.run)
    monkeypatch.setattr(autoselect, "timer", backends.timer)
    return backends


def _only(selections=None):
    (selection,) = autoselect.selections() if selections is None else selections
    return selection


def _outcome(selection, backend, precision):
    (found,) = [c for c in selection["candidates"] if (c["backend"], c["precision"]) == (backend, precision)]
    return found


# --- the candidates and the fixed order ----------------------------------------------------------------


def test_cuda_candidates_follow_the_fixed_order():
    order = dispatch.AUTO_ORDER["cuda"]
    backends = [b for b, _ in CUDA_CANDIDATES]
    assert backends == sorted(backends, key=order.index)
    assert set(CUDA_CANDIDATES) == {("triton", "ieee"), ("triton", "tf32x3"), ("ext", "ieee"), ("torch", "ieee")}


def test_cpu_auto_is_not_measured(fresh):
    cpu = torch.device("cpu")
    assert not autoselect.measures(cpu)
    first = next(n for n in dispatch.AUTO_ORDER["cpu"] if dispatch.unavailable_reason(n, cpu) is None)
    assert dispatch.resolve("auto", cpu) is dispatch._LOADED[first][0]
    threeg_kernels.cov_pool(torch.randn(2, 4, 5))
    assert autoselect.selections() == []


# --- the choice ---------------------------------------------------------------------------------------


def test_fastest_agreeing_candidate_is_chosen(fake):
    fake.ms = {("triton", "ieee"): 3.0, ("triton", "tf32x3"): 2.0, ("ext", "ieee"): 1.5, ("torch", "ieee"): 4.0}
    fake.err = {("triton", "ieee"): 3e-7, ("triton", "tf32x3"): 8e-6, ("ext", "ieee"): 1e-7}
    assert fake.choose() == ("ext", "ieee")
    selection = _only()
    assert (selection["device"], selection["dtype"], selection["C"], selection["N"]) == ("cpu", "float32", 4, 6)
    assert (selection["iters"], selection["weighted"], selection["B"]) == (5, False, 8)
    assert (selection["backend"], selection["precision"], selection["fallback"]) == ("ext", "ieee", None)
    assert [(c["backend"], c["precision"], c["ms"]) for c in selection["candidates"]] == [
        (b, p, fake.ms[(b, p)]) for b, p in CUDA_CANDIDATES
    ]
    assert _outcome(selection, "triton", "tf32x3")["rel_err"] == pytest.approx(8e-6, rel=0.01)
    assert set(selection["versions"]) == {"threeg_kernels", "torch", "triton"}
    runs = len(fake.runs)
    assert fake.choose(b=15) == ("ext", "ieee")  # decided: nothing runs again
    assert len(fake.runs) == runs


def test_tf32x3_is_auto_s_choice_only_for_precision_ieee(fake):
    fake.ms = {("triton", "tf32x3"): 0.5}
    fake.err = {("triton", "tf32x3"): 9e-6}
    assert fake.choose(precision="ieee") == ("triton", "tf32x3")
    runs = len(fake.runs)
    for precision in ("tf32x3", "tf32", "bf16"):  # asked for by name: given, nothing measured
        assert fake.choose(c=9, precision=precision) == ("triton", precision)
    assert len(fake.runs) == runs
    # float64 runs in ieee only: tf32x3 is not a candidate
    assert fake.choose(dtype=torch.float64) == ("triton", "ieee")
    assert ("triton", "tf32x3") not in [
        (c["backend"], c["precision"]) for c in autoselect.selections()[-1]["candidates"]
    ]


def test_ties_go_to_the_fixed_order(fake):
    assert fake.choose() == ("triton", "ieee")  # every time 1.0
    fake.ms = {("triton", "ieee"): 2.0, ("triton", "tf32x3"): 2.0}
    assert fake.choose(c=5) == ("ext", "ieee")  # ext and torch tie at 1.0: ext comes first


def test_disagreeing_candidate_is_rejected(fake):
    fake.ms = {("ext", "ieee"): 0.1, ("triton", "tf32x3"): 0.2}
    fake.err = {("ext", "ieee"): 2e-5, ("triton", "tf32x3"): float("nan")}
    assert fake.choose() == ("triton", "ieee")
    selection = _only()
    ext = _outcome(selection, "ext", "ieee")
    assert "ms" not in ext and ext["rel_err"] == pytest.approx(2e-5, rel=0.01)
    assert ext["error"] == "disagrees with 'torch': max relative error 2.0e-05 > 1e-05"
    tf32x3 = _outcome(selection, "triton", "tf32x3")
    assert "ms" not in tf32x3 and "rel_err" not in tf32x3 and "nan" in tf32x3["error"]


def test_float64_bound_is_1e_12(fake):
    fake.ms = {("triton", "ieee"): 2.0, ("triton", "tf32x3"): 2.0}
    fake.err = {("ext", "ieee"): 1e-11}
    assert fake.choose(dtype=torch.float32) == ("ext", "ieee")
    assert fake.choose(dtype=torch.float64) == ("torch", "ieee")


def test_raising_candidate_is_skipped_with_its_reason(fake):
    fake.ms = {("ext", "ieee"): 2.0, ("torch", "ieee"): 2.0}
    fake.raises = {
        ("triton", "ieee"): RuntimeError("PTX compilation failed\nptxas: out of registers"),
        ("triton", "tf32x3"): ValueError(""),
    }
    assert fake.choose() == ("ext", "ieee")
    selection = _only()
    assert _outcome(selection, "triton", "ieee") == {
        "backend": "triton",
        "precision": "ieee",
        "error": "RuntimeError: PTX compilation failed",
    }
    assert _outcome(selection, "triton", "tf32x3")["error"] == "ValueError: "


def test_a_candidate_not_present_is_not_tried(fake):
    del fake.available["ext"]
    fake.ms = {("triton", "ieee"): 2.0, ("triton", "tf32x3"): 2.0}
    assert fake.choose() == ("torch", "ieee")
    assert "ext" not in {c["backend"] for c in _only()["candidates"]}


def test_failing_accuracy_reference_gives_the_fixed_order(fake):
    fake.raises = {("torch", "ieee"): RuntimeError("reference broken")}
    assert fake.choose() == ("triton", "ieee")
    selection = _only()
    assert selection["fallback"] == "the accuracy reference, backend 'torch', raised RuntimeError: reference broken"
    assert (selection["backend"], selection["precision"]) == ("triton", "ieee")


def test_no_candidate_agreeing_gives_the_fixed_order(fake, monkeypatch):
    monkeypatch.setitem(autoselect.CANDIDATES, "cpu", CUDA_CANDIDATES[:3])  # without torch
    fake.raises = {("triton", "ieee"): RuntimeError("no"), ("triton", "tf32x3"): RuntimeError("no")}
    fake.err = {("ext", "ieee"): 1e-3}
    assert fake.choose() == ("triton", "ieee")
    assert _only()["fallback"] == "no candidate ran and agreed with the reference"


# --- batch buckets ------------------------------------------------------------------------------------


def test_bucket_is_the_power_of_two_at_or_below():
    assert [autoselect.bucket(b) for b in (1, 2, 3, 4, 33, 60, 63, 64, 65, 128, 255)] == [
        1, 2, 2, 4, 32, 32, 32, 64, 64, 128, 128,
    ]  # fmt: skip


def test_batch_sizes_of_one_bucket_share_a_decision(fake):
    fake.choose(b=33)
    runs = len(fake.runs)
    fake.choose(b=60)
    assert len(fake.runs) == runs and [s["B"] for s in autoselect.selections()] == [32]
    fake.choose(b=65)
    assert len(fake.runs) > runs and [s["B"] for s in autoselect.selections()] == [32, 64]


def test_measurement_inputs_have_the_bucket_s_shape(fake, monkeypatch):
    shapes = []
    real_run = fake.run

    def spy(loaded, precision, inputs):
        shapes.append((tuple(inputs.x.shape), tuple(inputs.weight.shape), tuple(inputs.grad.shape)))
        return real_run(loaded, precision, inputs)

    monkeypatch.setattr(autoselect, "run", spy)
    fake.choose(b=60, c=4, n=6, weighted=True)
    assert set(shapes) == {((32, 4, 6), (32, 6), (32, 10))}


# --- the off switch and the fallbacks -----------------------------------------------------------------


def test_off_switch_gives_the_fixed_order(fake, monkeypatch):
    monkeypatch.setenv(autoselect.ENV_TUNE, "0")
    cpu = torch.device("cpu")
    assert not autoselect.measures(cpu)
    first = next(n for n in dispatch.AUTO_ORDER["cpu"] if dispatch.unavailable_reason(n, cpu) is None)
    assert dispatch.resolve("auto", cpu) is dispatch._LOADED[first][0]
    threeg_kernels.cov_pool(torch.randn(2, 4, 5))
    assert fake.runs == [] and autoselect.selections() == []
    monkeypatch.setenv(autoselect.ENV_TUNE, "1")
    assert dispatch.resolve("auto", cpu) is not dispatch._LOADED[first][0]


@pytest.mark.parametrize("where", ["cuda_graph_capture", "torch_compile"])
def test_no_measurement_where_nothing_can_be_timed(fake, monkeypatch, where):
    fake.ms = {("triton", "ieee"): 2.0}
    with monkeypatch.context() as m:
        if where == "cuda_graph_capture":
            m.setattr(torch.cuda, "is_initialized", lambda: True)
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        else:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fake.choose() == ("triton", "ieee")
        assert fake.runs == [] and autoselect.selections() == []  # not remembered
    assert fake.choose() == ("triton", "tf32x3")  # measured at the next eager call
    with monkeypatch.context() as m:  # a decided key is used there
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fake.choose() == ("triton", "tf32x3")


def test_out_of_memory_falls_back_to_the_fixed_order(fake, monkeypatch, tmp_path):
    cache = tmp_path / "auto.json"
    monkeypatch.setenv(autoselect.ENV_CACHE, str(cache))
    fake.ms = {("triton", "ieee"): 2.0}
    fake.raises = {("ext", "ieee"): torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")}
    assert fake.choose() == ("triton", "ieee")
    selection = _only()
    assert (
        selection["fallback"]
        == "out of memory while measuring (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)"
    )
    assert (selection["backend"], selection["precision"]) == ("triton", "ieee")
    runs = len(fake.runs)
    assert fake.choose() == ("triton", "ieee") and len(fake.runs) == runs  # kept for the process
    assert not cache.exists()  # but not written: a later process measures again


# --- the cache file -----------------------------------------------------------------------------------


def test_save_and_load_round_trip(fake, tmp_path):
    fake.ms = {("ext", "ieee"): 0.5}
    fake.err = {("ext", "ieee"): 1e-6}
    fake.choose()
    fake.choose(c=7, weighted=True, dtype=torch.float64)
    path = tmp_path / "auto.json"
    autoselect.save(str(path))
    saved = autoselect.selections()
    assert os.listdir(tmp_path) == ["auto.json"]  # the temporary file was renamed, not left behind
    autoselect.clear()
    assert autoselect.selections() == []
    assert autoselect.load(str(path)) == 2
    assert autoselect.selections() == saved
    runs = len(fake.runs)
    assert fake.choose() == ("ext", "ieee") and fake.choose(c=7, weighted=True, dtype=torch.float64)
    assert len(fake.runs) == runs


def test_cache_variable_loads_at_first_use_and_appends(fake, monkeypatch, tmp_path):
    path = tmp_path / "auto.json"
    monkeypatch.setenv(autoselect.ENV_CACHE, str(path))
    fake.ms = {("torch", "ieee"): 0.5}
    assert fake.choose() == ("torch", "ieee")
    assert [s["backend"] for s in json.loads(path.read_text())["selections"]] == ["torch"]
    autoselect.clear()  # as a new process
    runs = len(fake.runs)
    assert fake.choose() == ("torch", "ieee")
    assert len(fake.runs) == runs  # read from the file, not measured
    fake.choose(c=3)
    assert [s["C"] for s in json.loads(path.read_text())["selections"]] == [4, 3]
    assert os.listdir(tmp_path) == ["auto.json"]


def test_entries_of_other_versions_are_ignored(fake, tmp_path):
    fake.choose()
    path = tmp_path / "auto.json"
    autoselect.save(str(path))
    data = json.loads(path.read_text())
    data["selections"][0]["versions"]["torch"] = "1.0"
    path.write_text(json.dumps(data))
    autoselect.clear()
    assert autoselect.load(str(path)) == 0


def test_malformed_cache_file_is_named(fresh, tmp_path):
    path = tmp_path / "auto.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="auto.json is not JSON"):
        autoselect.load(str(path))
    path.write_text(json.dumps({"format": 1, "selections": [{"device": "cpu"}]}))
    with pytest.raises(ValueError, match="auto.json: selection 0 is malformed"):
        autoselect.load(str(path))
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a threeg_kernels autoselect file"):
        autoselect.load(str(path))


def test_unreadable_cache_variable_warns_and_measures(fake, monkeypatch, tmp_path):
    path = tmp_path / "auto.json"
    path.write_text("garbage")
    monkeypatch.setenv(autoselect.ENV_CACHE, str(path))
    with pytest.warns(UserWarning) as warned:
        fake.choose()
    messages = [str(w.message) for w in warned]
    assert any("not loaded" in m for m in messages) and any("unreadable, rewritten" in m for m in messages)
    assert fake.runs  # measured; the file is rewritten with the new decision
    assert len(json.loads(path.read_text())["selections"]) == 1


# --- the real measuring path, end to end on CPU ---------------------------------------------------------


def _cpu_timer(fn, device):
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


CPU_PRESENT = [n for n in dispatch.AUTO_ORDER["cpu"] if dispatch.unavailable_reason(n, "cpu") is None]


def test_end_to_end_on_cpu(fresh, monkeypatch):
    """cov_pool(backend='auto') with a CPU row in CANDIDATES: the real `run` on random inputs, a CPU timer.
    The user's call keeps its own autograd state (inference mode, saved-tensor hooks) and RNG state."""
    monkeypatch.setitem(autoselect.CANDIDATES, "cpu", tuple((n, "ieee") for n in CPU_PRESENT))
    monkeypatch.setattr(autoselect, "timer", _cpu_timer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 9, generator=gen, requires_grad=True)
    w = (torch.rand(5, 9, generator=gen) + 0.5).requires_grad_()

    rng = torch.get_rng_state()
    with torch.inference_mode():
        threeg_kernels.cov_pool(x.detach(), w.detach())  # measures: autograd runs in the worker thread
    assert torch.equal(torch.get_rng_state(), rng)
    selection = _only()
    assert (selection["B"], selection["C"], selection["N"], selection["weighted"]) == (4, 6, 9, True)
    assert selection["fallback"] is None
    assert [c["backend"] for c in selection["candidates"]] == CPU_PRESENT
    for c in selection["candidates"]:
        assert c["ms"] > 0 and c["rel_err"] <= 1e-5, c

    autoselect.clear()  # measure again, inside the user's saved-tensor hooks, with inputs that need gradients
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        out = threeg_kernels.cov_pool(x, w)
    assert torch.equal(torch.get_rng_state(), rng)
    chosen = _only()["backend"]
    packed_by_call = len(packed)
    packed.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        direct = threeg_kernels.cov_pool(x, w, backend=chosen)
    assert packed_by_call == len(packed)  # the hooks saw the call's own tensors only
    assert torch.equal(out, direct)
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (x, w), g)
    want = torch.autograd.grad(threeg_kernels.cov_pool(x, w, backend="reference"), (x, w), g)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_compiled_call_uses_a_decided_key(fake, monkeypatch):
    """torch.compile(fullgraph=True, dynamic=True) traces 'auto': a decided bucket runs its choice, an undecided
    one the fixed order, and neither measures while tracing."""
    if len(CPU_PRESENT) < 2:
        pytest.skip("needs two CPU backends")
    monkeypatch.setitem(autoselect.CANDIDATES, "cpu", tuple((n, "ieee") for n in CPU_PRESENT))
    last = CPU_PRESENT[-1]
    fake.available = {n: dispatch._LOADED[n][0] for n in CPU_PRESENT}
    fake._names = {id(loaded): n for n, loaded in fake.available.items()}
    fake.ms = {(last, "ieee"): 0.5}  # the fixed order's last is the fastest
    fake.choose(b=4, c=4, n=6)
    monkeypatch.setattr(autoselect, "run", _never)

    ran = []
    pools = {n: dispatch._LOADED[n][0].pool for n in CPU_PRESENT}
    for n in CPU_PRESENT:  # record which backend's pool runs (Loaded is frozen: swap in a recording copy)
        spy = (lambda name: lambda *a: ran.append(name) or pools[name](*a))(n)
        monkeypatch.setitem(dispatch._LOADED, n, (Loaded(spy, lambda d: None), None))
    dispatch._AUTO.clear()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: threeg_kernels.cov_pool(a), backend="eager", fullgraph=True, dynamic=True)
    try:
        compiled(torch.randn(5, 4, 6))  # bucket 4: decided
        compiled(torch.randn(9, 4, 6))  # bucket 8: not decided, the fixed order
    finally:
        dispatch._AUTO.clear()
        torch._dynamo.reset()
    assert ran[-2:] == [last, CPU_PRESENT[0]]
    assert [s["B"] for s in autoselect.selections()] == [4]
