"""Launch-config tuning of the "triton" backend (threeg_kernels/triton_kernels/tuning.py).

On CPU: the choice logic with fake timings, the cache and its switches (a stand-in CUDA tensor: only
shape, device and dtype are read), and every GPU candidate config run under the interpreter against
reference.py (the interpreter ignores warps and stages but runs each tile shape). With a GPU: a real
tuning run on the full head.
"""

from __future__ import annotations

import types

import pytest
import torch

from .helpers import assert_close_to_reference, devices_for, make_case

triton_impl = pytest.importorskip("threeg_kernels.backends.triton_impl")
from threeg_kernels.triton_kernels import _tiles, tuning  # noqa: E402 - needs Triton, which the line above checks


def cfg(block, block_k=16, block_n=16, warps=4, stages=1):
    return _tiles.LaunchConfig(block, block_k, block_n, warps, stages, "ieee", False)


@pytest.fixture
def fresh_cache():
    tuning.clear()
    yield
    tuning.clear()


def test_choose_picks_the_fastest():
    configs = [cfg(64), cfg(32), cfg(128)]
    times = {configs[0]: 2.0, configs[1]: 1.5, configs[2]: 3.0}
    record = tuning.choose(("k",), configs, times.__getitem__)
    assert record.chosen == configs[1]
    assert record.times_ms == times and not record.errors


def test_choose_ties_keep_the_default():
    configs = [cfg(64), cfg(32)]
    assert tuning.choose(("k",), configs, lambda c: 1.0).chosen == configs[0]


def test_choose_skips_failing_configs_and_records_why():
    configs = [cfg(64), cfg(128)]

    def measure(c):
        if c.block == 128:
            raise RuntimeError("out of resource: shared memory, Required: 300000\nmore text")
        return 1.0

    record = tuning.choose(("k",), configs, measure)
    assert record.chosen == configs[0]
    assert record.errors == {configs[1]: "RuntimeError: out of resource: shared memory, Required: 300000"}
    assert [c["error"] for c in record.as_dict()["candidates"] if "error" in c] == [record.errors[configs[1]]]


def test_choose_raises_when_every_config_fails():
    def measure(c):
        raise ValueError(f"bad {c.block}")

    with pytest.raises(RuntimeError, match=r"every Triton launch config failed.*bad 64.*bad 32"):
        tuning.choose(("key",), [cfg(64), cfg(32)], measure)


@pytest.mark.parametrize("c, n", [(7, 5), (40, 33), (256, 196)])
@pytest.mark.parametrize(
    "dtype, precision", [(torch.float32, "ieee"), (torch.float32, "bf16"), (torch.float64, "tf32")]
)
def test_gpu_candidates_are_valid(monkeypatch, c, n, dtype, precision):
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(_tiles, "INTERPRET", False)
    configs = tuning.candidates(c, n, dtype, precision)
    assert configs[0] == _tiles.launch_config(c, n, dtype, precision)
    assert len(set(configs)) == len(configs) >= 1
    for config in configs:
        assert 16 <= config.block <= max(16, 2 ** (c - 1).bit_length())
        assert 16 <= config.block_k <= max(16, 2 ** (c - 1).bit_length())
        assert 16 <= config.block_n <= max(16, 2 ** (n - 1).bit_length())
        assert config.precision == ("ieee" if dtype == torch.float64 else precision)
        assert not config.emulate
    if c == 256 and dtype == torch.float32:
        assert len(configs) >= 4, "the full shape should have several tile shapes to choose from"


def test_interpreter_has_one_candidate():
    if not _tiles.INTERPRET:
        pytest.skip("the interpreter is not in use in this run")
    assert tuning.candidates(256, 196, torch.float32, "ieee") == [_tiles.launch_config(256, 196, torch.float32)]


def _fake_cuda_input(b=2, c=40, n=33):
    return types.SimpleNamespace(shape=(b, c, n), device=torch.device("cuda", 0), dtype=torch.float32)


@pytest.fixture
def fake_gpu(monkeypatch, fresh_cache):
    """tuning.config_for's GPU path with fake timings: counts the measurements made."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(_tiles, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv(tuning.ENV, raising=False)
    calls = []

    def fake_measure(b, c, n, iters, weighted, dtype, device):
        def measure(config):
            calls.append(config)
            return 1.0 if config.block == 32 else 2.0

        return measure

    monkeypatch.setattr(tuning, "_gpu_measure", fake_measure)
    return calls


def test_config_for_tunes_once_per_key(fake_gpu):
    x = _fake_cuda_input()
    chosen = tuning.config_for(x, None, 5, "ieee")
    assert chosen.block == 32
    n_candidates = len(tuning.candidates(40, 33, torch.float32, "ieee"))
    assert len(fake_gpu) == n_candidates
    assert tuning.config_for(x, None, 5, "ieee") == chosen
    assert len(fake_gpu) == n_candidates, "a second call of the same key must not time again"
    tuning.config_for(_fake_cuda_input(b=3), None, 5, "ieee")
    assert len(fake_gpu) == 2 * n_candidates, "a new batch size is a new key"
    (first, second) = tuning.tuned()
    assert first["B"] == "2" and second["B"] == "3" and first["chosen"]["block"] == 32
    assert len(first["candidates"]) == n_candidates and all("ms" in c for c in first["candidates"])


def test_config_for_off_switch(fake_gpu, monkeypatch):
    monkeypatch.setenv(tuning.ENV, "0")
    assert tuning.config_for(_fake_cuda_input(), None, 5, "ieee") == _tiles.launch_config(40, 33, torch.float32)
    assert not fake_gpu and not tuning.tuned()


def test_config_for_during_graph_capture_uses_the_default_uncached(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning.config_for(_fake_cuda_input(), None, 5, "ieee") == _tiles.launch_config(40, 33, torch.float32)
    assert not fake_gpu and not tuning.tuned()


def test_config_for_on_cpu_never_tunes(fresh_cache):
    x = torch.zeros(2, 40, 33)
    assert tuning.config_for(x, None, 5, "ieee") == _tiles.launch_config(40, 33, torch.float32)
    assert not tuning.tuned()


def _gpu_candidates(c, n, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(tuning, "INTERPRET", False)
        m.setattr(_tiles, "INTERPRET", False)
        return tuning.candidates(c, n, torch.float32, "ieee")


# CPU (interpreter) and CUDA, each skipped where Triton does not run; the CUDA case is selected by `pytest -m cuda`.
@pytest.mark.slow  # 7-10 s under the interpreter
@pytest.mark.parametrize("device", devices_for("triton"))
def test_every_gpu_candidate_matches_reference(monkeypatch, device):
    """Each tile shape the tuner may pick computes the head correctly (C = 40 spans 1 or 2 tiles a side
    depending on the candidate; N = 33 spans 1 or 2 N-tiles)."""
    configs = _gpu_candidates(40, 33, monkeypatch)
    assert len({(c.block, c.block_k, c.block_n) for c in configs}) >= 3
    x, w, g = make_case(2, 40, 33, weighted=True, dtype=torch.float32, seed=3, device=device)
    for config in configs:
        config = _tiles.LaunchConfig(
            config.block,
            config.block_k,
            config.block_n,
            config.num_warps,
            config.num_stages,
            config.precision,
            _tiles.INTERPRET,
        )
        monkeypatch.setattr(triton_impl, "config_for", lambda *args, _c=config: _c)
        assert_close_to_reference("triton", x, w, g, iters=3)


@pytest.mark.parametrize("device", devices_for("triton", ["cuda"]))
def test_tuning_on_the_gpu(fresh_cache, monkeypatch, device):
    """A real tuning run on the full channel count: every candidate timed or its failure recorded, the chosen
    config is the fastest, and the tuned head matches the reference."""
    monkeypatch.delenv(tuning.ENV, raising=False)
    x, w, g = make_case(8, 256, 196, weighted=True, dtype=torch.float32, seed=1, device=device)
    assert_close_to_reference("triton", x, w, g, iters=5)
    (record,) = tuning.tuned()
    timed = [c for c in record["candidates"] if "ms" in c]
    assert timed, record
    fastest = min(timed, key=lambda c: c["ms"])
    assert record["chosen"] == {k: v for k, v in fastest.items() if k != "ms"}
    assert len(record["candidates"]) == len(tuning.candidates(256, 196, torch.float32, "ieee"))
