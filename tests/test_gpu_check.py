"""benchmarks/gpu_check.sh and its driver benchmarks/gpu_check.py: the stage runner, the check cases, the
results files and summary, and both commands end to end in dry mode (CPU, tiny shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import Run, append_jsonl, correctness_cases, read_jsonl, run_one, run_pool, run_stage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, budget=60.0) -> Run:
    return Run(out=tmp_path, dry=True, budget_s=budget)


# ------------------------------------------------------------------------------------------ the runner


def test_stages_record_status_time_and_skip_when_out_of_time(tmp_path):
    run = _run(tmp_path)
    assert run_stage(run, "fine", 10, lambda limit: ("ok", f"limit {limit:.0f}")) == "ok"
    assert run_stage(run, "broken", 10, lambda limit: 1 / 0) == "failed"
    run.budget_s = 0
    assert run_stage(run, "late", 10, lambda limit: ("ok", "")) == "skipped"
    status = read_jsonl(tmp_path / "status.jsonl")
    assert [(s["stage"], s["status"]) for s in status] == [("fine", "ok"), ("broken", "failed"), ("late", "skipped")]
    assert status[0]["note"] == "limit 10" and status[0]["budget_s"] == 10
    assert "ZeroDivisionError" in status[1]["note"] and "out of time" in status[2]["note"]


def test_a_process_past_its_limit_is_ended_with_its_children(tmp_path):
    log = tmp_path / "log.txt"
    t0 = time.monotonic()
    # the child shell starts a grandchild that would outlive it; both are in the process group that is ended
    script = "sleep 30 & echo started $!; wait"
    assert run_one(["bash", "-c", script], log, dict(os.environ), limit=1.0) == "timeout"
    assert time.monotonic() - t0 < 15
    grandchild = int(log.read_text().rsplit("started ", 1)[1].split()[0])
    time.sleep(0.2)
    assert not _running(grandchild)
    assert run_one([sys.executable, "-c", "raise SystemExit(3)"], log, dict(os.environ), limit=10) == 3


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for its parent to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_pool_runs_jobs_when_ready_and_reports_the_rest(tmp_path):
    env = dict(os.environ)
    quick = [sys.executable, "-c", "pass"]
    jobs = [(name, quick, tmp_path / f"{name}.log", env) for name in ("a", "b", "c")]
    waiting = {"c"}
    results = run_pool(jobs, limit=30, parallel=2, ready=lambda name: name not in waiting or waiting.clear())
    assert results == {"a": 0, "b": 0, "c": 0}
    results = run_pool(jobs[:1] + [("slow", ["sleep", "30"], tmp_path / "s.log", env)], limit=1.0, parallel=1)
    assert results == {"a": 0, "slow": "timeout"}
    assert run_pool(jobs[:1], limit=0.5, parallel=1, ready=lambda name: False) == {"a": "not started"}


def test_jsonl_appends_and_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, dict(a=1))
    append_jsonl(path, dict(a=2, p=Path("x")))
    with open(path, "a") as f:
        f.write('{"a": 3, "cut')  # a writer killed mid-line
    assert read_jsonl(path) == [dict(a=1), dict(a=2, p="x")]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


# ------------------------------------------------------------------------------------------- the cases


def test_correctness_cases_cover_the_shapes_modes_and_variants():
    cases = correctness_cases("triton", "tf32", dry=False)
    assert [c.shape for c in cases] == [(64, 256, 196), (2, 7, 5), (3, 100, 49), (2, 33, 50)]
    assert {(c.precision, c.dtype, c.weighted, c.K) for c in cases} == {("tf32", "float32", True, 5)}
    everything = correctness_cases("torch", "ieee+extras+float64", dry=False)
    assert {c.keep for c in everything} == {None, True, False}
    assert {c.order for c in everything} == {"3g", "mpncov"} and {c.K for c in everything} == {1, 2, 5}
    assert {c.dtype for c in everything} == {"float32", "float64"} and {c.weighted for c in everything} == {True, False}
    # the reference differentiates with autograd: no keep / recompute cases
    assert {c.keep for c in correctness_cases("reference", "extras", dry=False)} == {None}
    assert max(c.shape[1] for c in correctness_cases("triton", "ieee+extras+float64", dry=True)) <= 33
    with pytest.raises(ValueError, match="group"):
        correctness_cases("torch", "ieee+fp8", dry=False)


def test_each_backend_and_triton_mode_gets_a_process(tmp_path):
    names = [job[0] for job in gpu_check.correctness_jobs(_run(tmp_path))]
    assert names[:3] == ["reference-ieee+extras+float64", "torch-ieee+extras+float64", "ext-ieee+extras+float64"]
    assert names[3:] == [f"triton-{g}" for g in ("ieee", "tf32x3", "tf32", "bf16", "extras", "float64")]
    units = dict(gpu_check.speed_units(Run(out=tmp_path, dry=False, budget_s=1)))
    assert set(units) == {"reference", "torch", "ext", "triton-ieee", "triton-tf32x3", "triton-tf32", "triton-bf16"}
    argv = units["triton-tf32"]
    assert argv[argv.index("--B") + 1 : argv.index("--C")] == ["32", "256"]
    assert argv[argv.index("--iterates") + 1 :] == ["keep", "recompute"] and "--device" in argv


def test_dry_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("THREEG_GPU_CHECK_DRY", "1")
    assert gpu_check.parse_args(["speed", "out"]).dry
    monkeypatch.setenv("THREEG_GPU_CHECK_DRY", "0")
    assert not gpu_check.parse_args(["speed", "out"]).dry


def test_script_usage(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "fast", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "usage: bash benchmarks/gpu_check.sh {correctness|speed}" in run.stderr


def test_kernel_times_per_iteration_from_profiler_events():
    from torch.autograd import DeviceType

    def event(name, us, device=DeviceType.CUDA):
        return types.SimpleNamespace(
            name=name, device_type=device, time_range=types.SimpleNamespace(elapsed_us=lambda: us)
        )

    events = [event("ns_t_kernel", 10.0), event("ns_t_kernel", 30.0), event("aten::mm", 99.0, DeviceType.CPU)]
    events += [event("ns_step_kernel", 8.0)]
    prof = types.SimpleNamespace(events=lambda: events)
    assert gpu_check._kernel_times(prof, iters=2) == {"ns_t_kernel": (1.0, 20.0), "ns_step_kernel": (0.5, 4.0)}


# ----------------------------------------------------------------------------------------- the summary


def _speed_record(backend, kind, precision, iterates, b, mode, ms, unit):
    return dict(
        backend=backend,
        kind=kind,
        precision=precision,
        iterates=iterates,
        B=b,
        C=256,
        N=196,
        K=5,
        mode=mode,
        dtype="float32",
        ms_p50=ms,
        tflops=1.0,
        peak_mb=1.0,
        max_rel_err=1e-7,
        unit=unit,
    )


def test_summary_tables_from_the_results(tmp_path):
    append_jsonl(tmp_path / "status.jsonl", dict(stage="env", status="ok", seconds=1.0, budget_s=30, note=""))
    append_jsonl(
        tmp_path / "correctness.jsonl", dict(kind="correctness", backend="ext", status="unavailable", error="not built")
    )
    for b in (32, 256):
        for mode in ("fwd", "bwd", "full"):
            append_jsonl(
                tmp_path / "speed.jsonl", _speed_record("triton", "backend", "tf32", "keep", b, mode, 2.0, "t")
            )
    append_jsonl(
        tmp_path / "speed.jsonl", _speed_record("reference", "backend", "ieee", "default", 256, "full", 9, "b")
    )
    append_jsonl(tmp_path / "speed.jsonl", _speed_record("eigh", "baseline", None, None, 256, "full", 5.0, "b"))
    text = gpu_check.summary(tmp_path)
    assert "| env | ok | 1.0 | 30 |  |" in text
    assert "| ext |  |  | unavailable |  |  | not built |" in text
    assert "| method | precision | iterates | B=32 fwd | B=32 bwd | B=32 full | B=256 fwd |" in text
    row = next(line for line in text.splitlines() if line.startswith("| triton | tf32 | keep |"))
    floor = float(row.split("|")[-3])  # benchmarks/flops.py: memory-bound in tf32, ~1.37 ms at 4.8 TB/s
    assert 1.3 < floor < 1.45
    assert "| eigh * |  |  |" in text and "(no final line" not in text


# ------------------------------------------------------------------------------------- end to end, CPU


@pytest.mark.slow  # ~100 s on 2 cores
def test_correctness_dry_run(tmp_path):
    out = _dry(tmp_path, "correctness")
    stages = {s["stage"]: s["status"] for s in read_jsonl(out / "status.jsonl")}
    assert stages == {"env": "ok", "build": "skipped", "backends": "ok", "tests_cuda": "ok"}
    checks = read_jsonl(out / "correctness.jsonl")
    assert {r["backend"] for r in checks} == {"reference", "torch", "ext", "triton"} - _missing()
    assert all(r["status"] == "pass" for r in checks), [r for r in checks if r["status"] != "pass"]
    assert {r["precision"] for r in checks if r["backend"] == "triton"} == {"ieee", "tf32x3", "tf32", "bf16"}
    assert "skipped" in (out / "tests_cuda.log").read_text() and (out / "summary.md").is_file()


@pytest.mark.slow  # ~130 s on 2 cores
def test_speed_dry_run(tmp_path):
    out = _dry(tmp_path, "speed")
    stages = {s["stage"]: s["status"] for s in read_jsonl(out / "status.jsonl")}
    expected = {"env", "hbm", "build", "warm", "profile", "cold_start", "baselines"}
    assert expected <= set(stages) and all(stages[s] in ("ok", "skipped") for s in expected), stages
    assert stages["pool_speed:reference"] == "ok" and stages["pool_speed:triton-ieee"] == "skipped"
    assert {r["precision"] for r in read_jsonl(out / "warm.jsonl")} == {"ieee", "tf32x3", "tf32", "bf16"}
    speed = read_jsonl(out / "speed.jsonl")
    assert {"reference", "torch", "isqrt-style"} <= {r["backend"] for r in speed}
    assert {(r["mode"], r["B"]) for r in speed if r["backend"] == "torch"} == {
        (m, b) for m in ("fwd", "bwd", "full") for b in (2, 4)
    }
    assert {r["iterates"] for r in speed if r["backend"] == "torch"} == {"keep", "recompute"}
    assert read_jsonl(out / "hbm.jsonl")[0]["gb_s"] > 0
    assert any(r["kernel"] == "(all)" for r in read_jsonl(out / "profile.jsonl"))
    assert {r["triton_cache"] for r in read_jsonl(out / "cold_start.jsonl")} == {"empty", "filled"}
    assert "## Speed" in (out / "summary.md").read_text()


def _missing() -> set:
    from threeg_kernels import dispatch

    return {b for b in ("ext",) if dispatch.unavailable_reason(b, "cpu") is not None}


def _dry(tmp_path, command: str) -> Path:
    out = tmp_path / command
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", str(SCRIPT), command, str(out), "--dry"], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for line in run.stdout.splitlines():
        print(line)  # the stage times, for -s
    return out


def test_driver_bounds_are_the_librarys():
    from threeg_kernels._validate import PRECISION_BOUNDS

    assert gpu_check.BOUND == PRECISION_BOUNDS
