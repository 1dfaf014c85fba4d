"""GPU validation in two commands, each meant to finish within 8 minutes on one H200 with a cold Triton cache.

    bash benchmarks/gpu_check.sh correctness OUT_DIR [--dry] [--budget SECONDS]
    bash benchmarks/gpu_check.sh speed OUT_DIR [--dry] [--budget SECONDS]
    python -m benchmarks.gpu_check summary OUT_DIR     # summary.md again, from the files of OUT_DIR

Both use the Python that runs them (gpu_check.sh: $PYTHON, else python3 when it imports torch, else
.venv/bin/python); nothing is installed or fetched. Each stage runs in processes of its own with a time
limit, so a crash or a hang costs that stage only, and every result is appended to OUT_DIR as a JSON line
the moment it exists: a run cut short keeps what it did. Each stage's status, wall time and budget go to
status.jsonl; summary.md is written at the end. Launch-config tuning is off (THREEG_TRITON_AUTOTUNE=0)
except where a stage says otherwise.

correctness (budget 450 s; stage budgets on an H200, cold Triton cache):
  env          30 s  env.txt: date, git, nvidia-smi, versions, `python -m threeg_kernels`
  build       180 s  the extension for the GPU's architecture only, in the background (build.log), from a
                     copy of setup.py and csrc/ (no install); skipped when the built one matches the sources;
                     if it fails, 'ext' is missing and the results say so
  backends    240 s  correctness.jsonl: every backend and precision mode against the float64 reference,
                     output, dL/dx and dL/dweight, at (B, C, N) = (64, 256, 196) and the odd shapes (2, 7, 5),
                     (3, 100, 49), (2, 33, 50), K = 5, weighted; also recompute, unweighted, 'mpncov', K = 1
                     and 2, float64. One process per backend (per precision mode for triton), all at once
  tests_cuda  rest   `pytest -m cuda` (tests_cuda.log, -n 8 when pytest-xdist is there), started once the
                     build is done, alongside the backend checks
speed (budget 450 s):
  env          30 s  as above
  hbm          20 s  hbm.jsonl: device-to-device copy bandwidth (1 GiB)
  build       180 s  as above, in the background during hbm and warm; the timings start once it is over
  warm        150 s  warm.jsonl: each triton precision mode's first forward+backward in a process of its own,
                     all at once (the compile time per mode, cold cache), so later stages time warm kernels
  pool_speed  240 s  speed.jsonl, timings.txt: `python -m benchmarks.pool_speed` fwd, bwd, fwd+bwd at
                     B = 32 and 256, C = 256, N = 196, K = 5 for every backend and triton precision mode,
                     keep and recompute; one process per (backend, mode)
  profile      60 s  profile.jsonl: torch.profiler per kernel at B = 256 (triton in each mode, keep), with
                     each kernel's FLOPs and bytes from benchmarks/flops.py: achieved TFLOP/s and GB/s
  cold_start  120 s  cold_start.jsonl: THREEG_TRITON_AUTOTUNE=1, first call (compiles and tunes) against
                     the calls after, with an empty Triton cache and again with the cache it filled
  baselines    30 s  speed.jsonl: the isqrt-style, autograd-style and eigh baselines at B = 32 and 256
A stage that would start with less than 15 s left is skipped and recorded as such.

--dry (or THREEG_GPU_CHECK_DRY=1): every stage's plumbing on CPU with tiny shapes, triton under
TRITON_INTERPRET=1 (pool_speed leaves it out on CPU; profile and cold_start run 'ieee' only); no build (the
stage records whether the extension imports); 2 processes at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("reference", "torch", "ext", "triton")
# threeg_kernels._validate.PRECISION_BOUNDS, restated: this driver does not import torch or the package in its
# own process (each stage runs in a child process, so a crash there cannot take the driver down);
# tests/test_gpu_check.py checks that the two agree.
BOUND = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 5e-3, "bf16": 5e-2}
PRECISIONS = tuple(BOUND)
BOUND_FLOAT64 = 1e-12
MIN_STAGE_S = 15
BUILD_BUDGET_S = 180
DEFAULT_BUDGET_S = 450
DRY_BUDGET_S = 300

# --- shapes: (B, C, N) -------------------------------------------------------------------------------
MAIN_SHAPE = (64, 256, 196)
ODD_SHAPES = ((2, 7, 5), (3, 100, 49), (2, 33, 50))
SPEED = dict(B=(32, 256), C=256, N=196, K=5)
DRY_MAIN_SHAPE = (2, 16, 12)
DRY_ODD_SHAPES = ((2, 7, 5), (1, 33, 20))
DRY_SPEED = dict(B=(2, 4), C=16, N=12, K=5)


# ================================================================================= results on disk


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line, written and flushed at once (several processes may append to the same file)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a killed writer is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


# ==================================================================================== the driver


@dataclass
class Run:
    """One command's run: where it writes, how long it may take, and the environment of its processes."""

    out: Path
    dry: bool
    budget_s: float
    python: str = sys.executable
    start: float = field(default_factory=time.monotonic)
    build: Optional[Build] = None  # the background extension build, while it runs
    ext_ok: bool = False  # whether the 'ext' backend can run (set by the build stage)
    build_note: str = ""

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        env["THREEG_TRITON_AUTOTUNE"] = "0"
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env.pop("TRITON_INTERPRET", None)
        env.update(extra)
        return env

    def status(self, stage: str, status: str, seconds: float, budget: float, note: str = "") -> None:
        record = dict(stage=stage, status=status, seconds=round(seconds, 1), budget_s=round(budget), note=note)
        append_jsonl(self.out / "status.jsonl", record)
        print(f"[gpu_check] {stage}: {status} in {seconds:.1f} s (budget {budget:.0f} s) {note}".rstrip(), flush=True)


def run_stage(run: Run, name: str, budget: float, fn: Callable[[float], tuple[str, str]]) -> str:
    """Runs fn(limit) -> (status, note) with limit = min(budget, time left); records it in status.jsonl.
    Skipped when less than MIN_STAGE_S (or its whole budget, if smaller) would be left for it."""
    limit = min(budget, run.left())
    if limit < min(budget, MIN_STAGE_S):
        run.status(name, "skipped", 0.0, budget, f"out of time ({max(run.left(), 0):.0f} s left)")
        return "skipped"
    t0 = time.monotonic()
    try:
        status, note = fn(limit)
    except Exception as exc:  # noqa: BLE001 - a broken stage is recorded and the next one runs
        status, note = "failed", f"{type(exc).__name__}: {exc}"
    run.status(name, status, time.monotonic() - t0, budget, note)
    return status


def _kill(proc: subprocess.Popen) -> None:
    """Ends a process this script started, with the children it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


_CHILDREN: list[subprocess.Popen] = []  # every process started here, ended with the driver (_on_signal)


def spawn(cmd: list[str], log: Path, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    """Starts cmd in a process group of its own (so that a timeout ends its children too), its stdout and
    stderr appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


def _on_signal(signum, frame) -> None:
    """SIGTERM / SIGINT of the driver: end the processes it started, then exit."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            _kill(proc)
    sys.exit(128 + signum)


def wait(procs: dict, deadline: float) -> dict:
    """{name: return code, or 'timeout'} for the processes {name: Popen}; those still running at the
    deadline (time.monotonic()) are ended."""
    results = {}
    while len(results) < len(procs):
        for name, proc in procs.items():
            if name not in results and proc.poll() is not None:
                results[name] = proc.returncode
        if len(results) < len(procs):
            if time.monotonic() >= deadline:
                for name, proc in procs.items():
                    if name not in results:
                        _kill(proc)
                        results[name] = "timeout"
            else:
                time.sleep(0.2)
    return results


def run_one(cmd: list[str], log: Path, env: dict, limit: float) -> object:
    """Return code of cmd, or 'timeout' once it ran `limit` seconds (it is then ended)."""
    return wait({"cmd": spawn(cmd, log, env)}, time.monotonic() + limit)["cmd"]


def run_pool(
    jobs: list[tuple[str, list[str], Path, dict]],
    limit: float,
    parallel: int,
    ready: Optional[Callable[[str], bool]] = None,
) -> dict:
    """Runs the jobs (name, cmd, log, env), at most `parallel` at a time, all ended at `limit` seconds.
    A job waits while ready(name) is False (e.g. the 'ext' checks until the build is done).
    Returns {name: return code | 'timeout' | 'not started'}."""
    deadline = time.monotonic() + limit
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        for job in list(pending):
            if len(running) >= parallel:
                break
            if ready is None or ready(job[0]):
                pending.remove(job)
                running[job[0]] = spawn(job[1], job[2], job[3])
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                results[name] = proc.returncode
                del running[name]
        if time.monotonic() >= deadline:
            for name, proc in running.items():
                _kill(proc)
                results[name] = "timeout"
            results.update({job[0]: "not started" for job in pending})
            break
        time.sleep(0.2)
    return results


def _outcome(results: dict) -> tuple[str, str]:
    bad = {k: v for k, v in results.items() if v != 0}
    return ("ok" if not bad else "failed"), ", ".join(f"{k}: {v}" for k, v in bad.items())


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check", *args]


# ----------------------------------------------------------------------------------------- stages


def stage_env(run: Run, limit: float) -> tuple[str, str]:
    path = run.out / "env.txt"
    lines = [f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", f"host: {platform.platform()}"]
    lines.append(f"python: {run.python} {platform.python_version()}; dry: {run.dry}")
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        lines.append(
            f"git: {sha.stdout.strip() or 'not a git checkout'}, {len(dirty.stdout.splitlines())} changed files"
        )
    except (OSError, subprocess.SubprocessError):
        lines.append("git: not available")
    path.write_text("\n".join(lines) + "\n")
    if not run.dry and shutil.which("nvidia-smi"):
        run_one(["nvidia-smi"], path, run.env(), min(20, limit))
    rc = run_one([run.python, "-m", "threeg_kernels"], path, run.env(), max(5, limit - 20))
    return ("ok" if rc == 0 else "failed"), f"python -m threeg_kernels: rc={rc}"


def _sources_key(python: str) -> str:
    """What the built extension depends on: setup.py, csrc/ and the interpreter it was built for."""
    h = hashlib.sha256(python.encode())
    for path in [ROOT / "setup.py"] + sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


STAMP = ROOT / "build" / "gpu_check_ext.stamp"
IMPORT_EXT = "from threeg_kernels import _C; print('cuda kernels built' if _C.cuda_built() else 'cpu only')"


@dataclass
class Build:
    """The extension build running in the background."""

    proc: subprocess.Popen
    tmp: Path  # the copy it builds in
    key: str  # _sources_key of what it builds
    t0: float


def _ext_state(run: Run) -> str:
    """'cuda kernels built', 'cpu only', or why threeg_kernels._C does not import."""
    proc = subprocess.run(
        [run.python, "-c", IMPORT_EXT], cwd=ROOT, env=run.env(), capture_output=True, text=True, timeout=120
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[-1] if lines else f"rc={proc.returncode}"


def _ext_usable(run: Run, state: str) -> bool:
    return state == "cuda kernels built" or (run.dry and state == "cpu only")


def start_build(run: Run) -> None:
    """Starts the extension build in the background, or records why none is needed (run.ext_ok)."""
    t0 = time.monotonic()
    if run.dry:
        state = _ext_state(run)
        run.ext_ok, run.build_note = _ext_usable(run, state), f"not built in dry mode; threeg_kernels._C: {state}"
        run.status("build", "skipped", time.monotonic() - t0, 0, run.build_note)
        return
    key = _sources_key(run.python)
    if STAMP.is_file() and STAMP.read_text() == key and _ext_state(run) == "cuda kernels built":
        run.ext_ok, run.build_note = True, "the extension built earlier matches the sources"
        run.status("build", "cached", time.monotonic() - t0, 0, run.build_note)
        return
    for old in (ROOT / "threeg_kernels").glob("_C*.so"):
        old.unlink()
    # A copy of setup.py and csrc/ without pyproject.toml: a preinstalled setuptools too old for the
    # project's metadata still builds the extension, and the tree gets no build/ or egg-info.
    tmp = Path(tempfile.mkdtemp(prefix="threeg-build-"))
    shutil.copy2(ROOT / "setup.py", tmp / "setup.py")
    shutil.copytree(ROOT / "csrc", tmp / "csrc")
    (tmp / "threeg_kernels").mkdir()
    capability = subprocess.run(
        [run.python, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
        capture_output=True,
        text=True,
        timeout=120,
        env=run.env(),
    )
    env = run.env(
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", capability.stdout.strip() or "9.0"),
        MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
    )
    proc = spawn([run.python, "setup.py", "build_ext", "--inplace"], run.out / "build.log", env, cwd=tmp)
    run.build = Build(proc, tmp, key, t0)


def finish_build(run: Run, budget: float, wait_s: Optional[float] = None) -> bool:
    """Waits for the background build (until `budget` seconds after its start, at most `wait_s` more, and
    not past the run's end), records it, and returns run.ext_ok: whether 'ext' can run."""
    build = run.build
    if build is None:
        return run.ext_ok
    run.build = None
    deadline = min(build.t0 + budget, time.monotonic() + max(run.left(), 0))
    if wait_s is not None:
        deadline = min(deadline, time.monotonic() + wait_s)
    rc = wait({"build": build.proc}, deadline)["build"]
    built = list((build.tmp / "threeg_kernels").glob("_C*.so"))
    if rc == 0 and built:
        shutil.copy2(built[0], ROOT / "threeg_kernels" / built[0].name)
    state = _ext_state(run)
    run.ext_ok = _ext_usable(run, state)
    if run.ext_ok:
        STAMP.parent.mkdir(exist_ok=True)
        STAMP.write_text(build.key)
    shutil.rmtree(build.tmp, ignore_errors=True)
    run.build_note = f"rc={rc}; threeg_kernels._C: {state}" + (
        "" if run.ext_ok else f"; backend 'ext' missing on {run.device}"
    )
    run.status("build", "ok" if run.ext_ok else "failed", time.monotonic() - build.t0, budget, run.build_note)
    return run.ext_ok


def correctness_jobs(run: Run) -> list[tuple[str, list[str], Path, dict]]:
    jobs = []
    for backend in BACKENDS:
        # triton: one process per precision mode (each compiles its own kernels); one for the others' few cases
        groups = [*PRECISIONS, "extras", "float64"] if backend == "triton" else ["ieee+extras+float64"]
        for group in groups:
            name = f"{backend}-{group}"
            cmd = _worker("check", "--backend", backend, "--group", group, "--out", str(run.out / "correctness.jsonl"))
            jobs.append((name, cmd + ["--dry"] * run.dry, run.out / "logs" / f"check-{name}.log", run.env()))
    return jobs


def _importable(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120).returncode == 0


def tests_cuda_cmd(run: Run) -> list[str]:
    # a test file that cannot be imported here (a missing training dependency) must not stop the others
    cmd = [run.python, "-m", "pytest", "-m", "cuda", "tests", "-p", "no:cacheprovider", "-v", "--durations=15"]
    cmd += ["--continue-on-collection-errors"]
    cmd += [f"--junitxml={run.out / 'tests_cuda.xml'}"]
    if not run.dry and _importable(run.python, "xdist"):
        cmd += ["-n", "8"]
    if _importable(run.python, "pytest_timeout"):
        cmd += ["-o", "timeout=240"]
    return cmd


def command_correctness(run: Run) -> None:
    run_stage(run, "env", 30, lambda limit: stage_env(run, limit))
    start_build(run)
    jobs = correctness_jobs(run)
    tests: dict = {}  # the pytest process, once started

    def ready(name: str) -> bool:
        """Starts pytest once the build is over (alongside the checks on a GPU); 'ext' checks wait for it."""
        if run.build is not None and (
            run.build.proc.poll() is not None or time.monotonic() - run.build.t0 > BUILD_BUDGET_S
        ):
            finish_build(run, BUILD_BUDGET_S)
        if run.build is None and not tests and not run.dry:
            tests["proc"] = spawn(tests_cuda_cmd(run), run.out / "tests_cuda.log", run.env())
        return not name.startswith("ext-") or run.build is None

    run_stage(run, "backends", 240, lambda limit: _outcome(run_pool(jobs, limit, 2 if run.dry else len(jobs), ready)))
    finish_build(run, BUILD_BUDGET_S)

    def stage_tests(limit: float) -> tuple[str, str]:
        proc = tests.get("proc") or spawn(tests_cuda_cmd(run), run.out / "tests_cuda.log", run.env())
        rc = wait({"pytest": proc}, time.monotonic() + limit)["pytest"]
        lines = [ln for ln in (run.out / "tests_cuda.log").read_text().splitlines() if ln.startswith("=")]
        return ("ok" if rc == 0 else "failed"), f"rc={rc}; {lines[-1].strip('= ') if lines else ''}"

    run_stage(run, "tests_cuda", 10_000, stage_tests)


def speed_units(run: Run) -> list[tuple[str, list[str]]]:
    """(name, pool_speed arguments) per process: one per backend, one per triton precision mode."""
    shape = DRY_SPEED if run.dry else SPEED
    common = ["--device", run.device, "--B", *map(str, shape["B"]), "--C", str(shape["C"]), "--N", str(shape["N"])]
    common += ["--iters", str(shape["K"]), "--modes", "fwd", "bwd", "full", "--baselines", "--no-progress"]
    if run.dry:
        common += ["--repeats", "1", "--warmup", "0"]
    units = [("reference", common + ["--backends", "reference"])]
    units += [
        (f"triton-{p}", common + ["--backends", "triton", "--precision", p, "--iterates", "keep", "recompute"])
        for p in PRECISIONS
    ]
    units += [(b, common + ["--backends", b, "--iterates", "keep", "recompute"]) for b in ("torch", "ext")]
    return units


def _pool_speed(run: Run, name: str, argv: list[str], limit: float) -> tuple[str, str]:
    """One pool_speed process; its records appended to speed.jsonl, its tables to timings.txt."""
    unit_json = run.out / "pool_speed" / f"{name}.json"
    unit_json.parent.mkdir(exist_ok=True)
    rc = run_one(
        [run.python, "-m", "benchmarks.pool_speed", *argv, "--json", str(unit_json)],
        run.out / "timings.txt",
        run.env(),
        limit,
    )
    records = json.loads(unit_json.read_text()) if unit_json.is_file() else []
    for r in records:
        append_jsonl(run.out / "speed.jsonl", dict(r, unit=name))
    return ("ok" if rc == 0 and records else "failed"), f"rc={rc}, {len(records)} records"


def command_speed(run: Run) -> None:
    run_stage(run, "env", 30, lambda limit: stage_env(run, limit))
    run_stage(run, "hbm", 20, lambda limit: _worker_stage(run, ["hbm"], "hbm", limit))
    start_build(run)
    shape = DRY_SPEED if run.dry else SPEED

    def warm(limit: float) -> tuple[str, str]:
        jobs = [
            (
                p,
                _worker("warm", "--precision", p, "--out", str(run.out / "warm.jsonl"), *["--dry"] * run.dry),
                run.out / "logs" / f"warm-{p}.log",
                run.env(),
            )
            for p in PRECISIONS
        ]
        return _outcome(run_pool(jobs, limit, 2 if run.dry else len(jobs)))

    run_stage(run, "warm", 150, warm)
    # No timing while the compiler keeps the CPUs busy (Triton's launches are host work): the build ends first.
    finish_build(run, BUILD_BUDGET_S)
    # One pool_speed process per unit, all within the stage's 240 s.
    pool_end = time.monotonic() + min(240, run.left())
    for name, argv in speed_units(run):
        stage = f"pool_speed:{name}"
        if run.dry and name.startswith("triton"):
            run.status(stage, "skipped", 0.0, 0, "pool_speed does not time triton on CPU")
        elif name == "ext" and not run.ext_ok:
            run.status(stage, "skipped", 0.0, 0, f"no usable extension ({run.build_note})")
        else:
            left = pool_end - time.monotonic()
            run_stage(run, stage, min(90, left), lambda limit, n=name, a=argv: _pool_speed(run, n, a, limit))
    run_stage(run, "profile", 60, lambda limit: _worker_stage(run, ["profile"], "profile", limit))
    run_stage(run, "cold_start", 120, lambda limit: stage_cold_start(run, limit))

    def baselines(limit: float) -> tuple[str, str]:
        argv = ["--device", run.device, "--B", *map(str, shape["B"]), "--C", str(shape["C"]), "--N", str(shape["N"])]
        argv += ["--iters", str(shape["K"]), "--modes", "full", "--backends", "reference", "--no-progress"]
        argv += ["--baselines", "isqrt-style", "autograd-style", "eigh"] + ["--repeats", "1"] * run.dry
        return _pool_speed(run, "baselines", argv, limit)

    run_stage(run, "baselines", 30, baselines)


def _worker_stage(run: Run, args: list[str], name: str, limit: float, **env: str) -> tuple[str, str]:
    out = run.out / f"{name}.jsonl"
    cmd = _worker(*args, "--out", str(out), *["--dry"] * run.dry)
    rc = run_one(cmd, run.out / "logs" / f"{name}.log", run.env(**env), limit)
    return ("ok" if rc == 0 else "failed"), f"rc={rc}"


def stage_cold_start(run: Run, limit: float) -> tuple[str, str]:
    """Per precision mode while time is left: a process with tuning on and an empty Triton cache, then one
    with the cache the first filled."""
    end = time.monotonic() + limit
    notes = []
    for precision in PRECISIONS[:1] if run.dry else PRECISIONS:
        cache = Path(tempfile.mkdtemp(prefix="threeg-triton-cache-"))
        try:
            for state in ("empty", "filled"):
                if end - time.monotonic() < MIN_STAGE_S:
                    note = "; ".join(f"{k}: rc={v}" for k, v in notes)
                    return _outcome(dict(notes))[0], note + "; then out of time"
                cmd = _worker(
                    "cold-start",
                    "--precision",
                    precision,
                    "--cache",
                    state,
                    "--out",
                    str(run.out / "cold_start.jsonl"),
                    *["--dry"] * run.dry,
                )
                env = run.env(THREEG_TRITON_AUTOTUNE="1", TRITON_CACHE_DIR=str(cache))
                rc = run_one(cmd, run.out / "logs" / "cold_start.log", env, end - time.monotonic())
                notes.append((f"{precision} {state}", rc))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return _outcome(dict(notes))[0], "; ".join(f"{k}: rc={v}" for k, v in notes)


# ==================================================================================== the workers
# Each runs in a process of its own (python -m benchmarks.gpu_check <worker> ...) and imports torch there.


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _grads(backend: str, x, weight, grad, iters: int, **options):
    """(out, dL/dx, dL/dweight or None) of cov_pool on fresh leaves."""
    import torch

    import threeg_kernels

    x = x.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    out = threeg_kernels.cov_pool(x, weight, iters=iters, backend=backend, **options)
    leaves = [x] + ([weight] if weight is not None else [])
    got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return (out, *got, *([None] if weight is None else []))


@dataclass(frozen=True)
class Case:
    shape: tuple
    precision: str = "ieee"
    dtype: str = "float32"
    weighted: bool = True
    keep: Optional[bool] = None
    order: str = "3g"
    K: int = 5


def correctness_cases(backend: str, group: str, dry: bool) -> list[Case]:
    """The cases of one check process. group: a precision mode, 'extras' (recompute, unweighted, 'mpncov',
    K = 1 and 2), 'float64', or several joined by '+' ('ieee+extras+float64')."""
    main, odd = (DRY_MAIN_SHAPE, DRY_ODD_SHAPES) if dry else (MAIN_SHAPE, ODD_SHAPES)
    small = odd[-1]
    cases = []
    for part in group.split("+"):
        if part in PRECISIONS:
            cases += [Case(s, precision=part) for s in (main, *odd)]
        elif part == "extras":
            if backend != "reference":  # the reference differentiates with autograd: no keep_iterates
                cases += [Case(main, keep=False), Case(small, keep=False), Case(small, keep=True)]
            cases += [Case(small, weighted=False), Case(small, order="mpncov"), Case(small, K=1), Case(small, K=2)]
        elif part == "float64":
            cases += [Case(s, dtype="float64") for s in (odd if dry else (*odd, (4, 256, 196)))]
        else:
            raise ValueError(f"group must be precision modes, 'extras' or 'float64' joined by '+'; got {group!r}")
    return cases


def worker_check(args: argparse.Namespace) -> None:
    """Every case of (backend, group) against the float64 reference; one JSON line per case."""
    import torch

    from benchmarks.common import make_inputs, rel_err
    from threeg_kernels import dispatch

    device = torch.device("cpu" if args.dry else "cuda")
    out = Path(args.out)
    base = dict(kind="correctness", backend=args.backend, group=args.group, device=str(device))
    reason = dispatch.unavailable_reason(args.backend, device)
    if reason is not None:
        append_jsonl(out, dict(base, status="unavailable", error=reason))
        return
    supported = dispatch.resolve(args.backend, device).precisions
    for case in correctness_cases(args.backend, args.group, args.dry):
        b, c, n = case.shape
        record = dict(
            base,
            B=b,
            C=c,
            N=n,
            K=case.K,
            precision=case.precision,
            dtype=case.dtype,
            weighted=case.weighted,
            keep_iterates=case.keep,
            order=case.order,
        )
        if case.precision not in supported:
            append_jsonl(out, dict(record, status="unsupported", error=f"precisions: {supported}"))
            continue
        t0 = time.perf_counter()
        try:
            x, w, g = make_inputs(b, c, n, getattr(torch, case.dtype), device, seed=b * 1000 + c + n)
            w = w if case.weighted else None
            opts = dict(order=case.order)
            want = _grads("reference", x.double(), None if w is None else w.double(), g.double(), case.K, **opts)
            got = _grads(args.backend, x, w, g, case.K, precision=case.precision, keep_iterates=case.keep, **opts)
            _sync(device)
            errs = [rel_err(a, e) for a, e in zip(got, want) if e is not None]
            if case.dtype == "float32":
                ref32 = max(
                    rel_err(a, e) for a, e in zip(_grads("reference", x, w, g, case.K, **opts), want) if e is not None
                )
                bound = max(BOUND[case.precision], 10 * ref32)
            else:
                ref32, bound = None, BOUND_FLOAT64
            record.update(
                err_out=errs[0],
                err_dx=errs[1],
                err_dw=errs[2] if len(errs) > 2 else None,
                err_max=max(errs),
                ref32_err=ref32,
                bound=bound,
                status="pass" if max(errs) <= bound else "FAIL",
            )
        except Exception as exc:  # noqa: BLE001 - recorded; the next case still runs
            record.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
        record["seconds"] = round(time.perf_counter() - t0, 2)
        append_jsonl(out, record)
        print(json.dumps(record), flush=True)


def worker_warm(args: argparse.Namespace) -> None:
    """The first forward+backward of one triton precision mode, keep then recompute: compiles its kernels."""
    import torch

    from benchmarks.common import make_inputs

    device = torch.device("cpu" if args.dry else "cuda")
    shape = DRY_SPEED if args.dry else SPEED
    x, w, g = make_inputs(2, shape["C"], shape["N"], torch.float32, device)
    for keep in (True, False):
        t0 = time.perf_counter()
        _grads("triton", x, w, g, shape["K"], precision=args.precision, keep_iterates=keep)
        _sync(device)
        append_jsonl(
            Path(args.out),
            dict(
                kind="warm",
                precision=args.precision,
                keep_iterates=keep,
                C=shape["C"],
                N=shape["N"],
                seconds=round(time.perf_counter() - t0, 2),
            ),
        )


def worker_hbm(args: argparse.Namespace) -> None:
    """Device-to-device copy bandwidth: 2 x bytes (read + write) / p50 time of one copy."""
    import torch

    from benchmarks.common import percentiles, time_ms

    device = torch.device("cpu" if args.dry else "cuda")
    n = 2**24 if args.dry else 2**28  # 64 MiB / 1 GiB of float32
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    samples = time_ms(lambda: b.copy_(a), device, warmup=3, repeats=5 if args.dry else 20)
    p20, p50, p80 = percentiles(samples)
    append_jsonl(
        Path(args.out),
        dict(
            kind="hbm",
            device=str(device),
            bytes=2 * a.nbytes,
            ms_p20=p20,
            ms_p50=p50,
            ms_p80=p80,
            gb_s=2 * a.nbytes / (p50 * 1e-3) / 1e9,
        ),
    )


def _kernel_times(prof, iters: int) -> dict:
    """{kernel name: (launches per iteration, microseconds per iteration)} of the device kernels profiled."""
    from torch.autograd import DeviceType

    times: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            count, us = times.get(e.name, (0, 0.0))
            times[e.name] = (count + 1, us + e.time_range.elapsed_us())
    return {k: (count / iters, us / iters) for k, (count, us) in times.items()}


def worker_profile(args: argparse.Namespace) -> None:
    """torch.profiler per kernel of the triton backend's forward+backward, each precision mode (keep), with
    the FLOPs and bytes of benchmarks/flops.py for the launch config that ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import make_inputs, percentiles, time_ms
    from benchmarks.flops import HBM_NOMINAL, PEAKS, floors, totals, triton_launches
    from threeg_kernels import dispatch
    from threeg_kernels.triton_kernels import tuning

    device = torch.device("cpu" if args.dry else "cuda")
    out = Path(args.out)
    b, c, n, k = (2, 16, 12, 5) if args.dry else (256, 256, 196, 5)
    reason = dispatch.unavailable_reason("triton", device)
    if reason is not None:
        append_jsonl(out, dict(kind="profile", status="unavailable", error=reason))
        return
    x, w, g = make_inputs(b, c, n, torch.float32, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    iters = 2 if args.dry else 5
    for precision in PRECISIONS[:1] if args.dry else PRECISIONS:

        def step(p=precision):
            return _grads("triton", x, w, g, k, precision=p, keep_iterates=True)

        for _ in range(1 if args.dry else 3):
            step()
        wall = percentiles(time_ms(step, device, warmup=0, repeats=iters))[1]
        with profile(activities=activities) as prof:
            for _ in range(iters):
                step()
            _sync(device)
        cfg = tuning.config_for(x, w, k, precision)
        launches = triton_launches(
            b, c, n, k, weighted=True, keep=True, block=cfg.block, block_k=cfg.block_k, block_n=cfg.block_n
        )
        model: dict = {}
        for a in launches:
            f, by, cnt = model.get(a.kernel, (0, 0, 0))
            model[a.kernel] = (f + a.flops, by + a.bytes, cnt + 1)
        measured = _kernel_times(prof, iters)
        base = dict(
            kind="profile",
            backend="triton",
            precision=precision,
            B=b,
            C=c,
            N=n,
            K=k,
            keep_iterates=True,
            block=cfg.block,
            block_k=cfg.block_k,
            block_n=cfg.block_n,
        )
        for name, (calls, us) in sorted(measured.items(), key=lambda kv: -kv[1][1]):
            f, by, cnt = model.get(name, (None, None, None))
            append_jsonl(
                out,
                dict(
                    base,
                    kernel=name,
                    calls=calls,
                    model_launches=cnt,
                    us=us,
                    model_flops=f,
                    model_bytes=by,
                    tflops=f / us / 1e6 if f and us else None,
                    gb_s=by / us / 1e3 if by and us else None,
                    peak_fraction=f / us / 1e-6 / PEAKS[precision] if f and us else None,
                    hbm_fraction=by / us / 1e-6 / HBM_NOMINAL if by and us else None,
                ),
            )
        full = totals(launches)["full"]
        append_jsonl(
            out,
            dict(
                base,
                kernel="(all)",
                us=sum(us for _, us in measured.values()),
                wall_ms=wall,
                model_flops=full["flops"],
                model_bytes=full["bytes"],
                floor_ms=floors(launches, HBM_NOMINAL, PEAKS[precision])["full"]["roofline"] * 1e3,
                device_kernels=len(measured),
            ),
        )
        if not measured:  # CPU (dry run): no device kernels; the host ops that ran instead
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:5]
            append_jsonl(out, dict(base, kernel="(cpu ops)", top=[(e.key, e.self_cpu_time_total) for e in top]))


def worker_cold_start(args: argparse.Namespace) -> None:
    """First call of the triton backend with tuning on (THREEG_TRITON_AUTOTUNE=1, set by the driver) against
    the calls after it, fwd+bwd at B = 256 (the driver gives this process an empty or a filled Triton cache)."""
    import torch

    from benchmarks.common import make_inputs, percentiles, time_ms
    from threeg_kernels.triton_kernels import tuning

    device = torch.device("cpu" if args.dry else "cuda")
    b, c, n, k = (2, 16, 12, 5) if args.dry else (256, 256, 196, 5)
    x, w, g = make_inputs(b, c, n, torch.float32, device)

    def step():
        return _grads("triton", x, w, g, k, precision=args.precision)

    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    p20, p50, p80 = percentiles(time_ms(step, device, warmup=1, repeats=3 if args.dry else 10))
    append_jsonl(
        Path(args.out),
        dict(
            kind="cold_start",
            precision=args.precision,
            triton_cache=args.cache,
            B=b,
            C=c,
            N=n,
            K=k,
            tuning=tuning.enabled(),
            first_call_s=first,
            after_ms_p20=p20,
            after_ms_p50=p50,
            after_ms_p80=p80,
            tuned=tuning.tuned(),
        ),
    )


# ======================================================================================= summary


def _fmt(v, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec)


def _md(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def _floor_ms(r: dict) -> Optional[float]:
    """The floor of benchmarks/flops.py (default launch settings, HBM 4.8 TB/s) for a triton row, or None."""
    if r["backend"] != "triton" or r["dtype"] != "float32":
        return None
    from benchmarks.flops import HBM_NOMINAL, PEAKS, floors, triton_launches

    try:
        launches = triton_launches(r["B"], r["C"], r["N"], r["K"], keep=r["iterates"] != "recompute")
    except ImportError:  # no Triton where the summary is written
        return None
    return floors(launches, HBM_NOMINAL, PEAKS[r["precision"]])[r["mode"]]["roofline"] * 1e3


def speed_table(records: list[dict]) -> str:
    """One row per method (backend, precision, iterates), one column per (B, mode): ms p50; then the
    largest max rel err, the TFLOP/s and, for triton, the floor (benchmarks/flops.py) at the largest B."""
    # the baselines run times 'reference' again, next to them: its own unit's rows stand for it
    records = [r for r in records if not (r.get("unit") == "baselines" and r["kind"] == "backend")] or records
    methods = list(dict.fromkeys((r["backend"], r["kind"], r["precision"], r["iterates"]) for r in records))
    columns = list(dict.fromkeys((r["B"], r["mode"]) for r in sorted(records, key=lambda r: r["B"])))
    big = max(r["B"] for r in records)
    rows = []
    for backend, kind, precision, iterates in methods:
        mine = [
            r
            for r in records
            if (r["backend"], r["kind"], r["precision"], r["iterates"]) == (backend, kind, precision, iterates)
        ]
        at = {(r["B"], r["mode"]): r for r in mine}
        full = at.get((big, "full"))
        floor = _floor_ms(full) if full else None
        rows.append(
            [backend + ("" if kind == "backend" else " *"), precision or "", iterates or ""]
            + [_fmt(at[c]["ms_p50"]) if c in at else "" for c in columns]
            + [_fmt(max(r["max_rel_err"] for r in mine), ".1e"), _fmt(full["tflops"]) if full else ""]
            + [_fmt(floor), _fmt(full["ms_p50"] / floor, ".2f") if floor else ""]
        )
    head = ["method", "precision", "iterates"] + [f"B={b} {m}" for b, m in columns]
    head += ["max rel err", f"TFLOP/s B={big} full", f"floor ms B={big} full", "x floor"]
    return _md(head, rows)


def summary(out: Path) -> str:
    """summary.md of OUT_DIR from its JSON-lines files (whatever of them exists)."""
    parts = [f"# gpu_check results: {out.name}"]
    env = out / "env.txt"
    if env.is_file():
        parts.append("```\n" + "\n".join(env.read_text().splitlines()[:4]) + "\n```")
    status = read_jsonl(out / "status.jsonl")
    if status:
        parts.append(
            _md(
                ["stage", "status", "s", "budget s", "note"],
                [[s["stage"], s["status"], _fmt(s["seconds"], ".1f"), str(s["budget_s"]), s["note"]] for s in status],
            )
        )
    checks = read_jsonl(out / "correctness.jsonl")
    if checks:
        rows = []
        for r in checks:
            shape = f"{r.get('B')}x{r.get('C')}x{r.get('N')}" if "B" in r else ""
            what = (
                [
                    r.get("dtype"),
                    r.get("precision"),
                    "w" if r.get("weighted") else "unweighted",
                    {None: "", True: "keep", False: "recompute"}[r.get("keep_iterates")],
                    r.get("order"),
                    f"K={r.get('K')}",
                ]
                if "B" in r
                else []
            )
            rows.append(
                [
                    r["backend"],
                    shape,
                    " ".join(str(v) for v in what if v),
                    r["status"],
                    _fmt(r.get("err_max"), ".1e"),
                    _fmt(r.get("bound"), ".0e"),
                    r.get("error") or "",
                ]
            )
        n_fail = sum(r["status"] in ("FAIL", "error") for r in checks)
        parts.append(f"## Correctness against the float64 reference ({len(checks)} records, {n_fail} FAIL/error)")
        parts.append(_md(["backend", "BxCxN", "case", "status", "max rel err", "bound", "error"], rows))
    tests = out / "tests_cuda.log"
    if tests.is_file():
        tail = [ln for ln in tests.read_text().splitlines() if ln.startswith("=") and " in " in ln]
        parts.append(f"## pytest -m cuda\n\n{tail[-1] if tail else '(no final line: cut short; see tests_cuda.log)'}")
    hbm = read_jsonl(out / "hbm.jsonl")
    for r in hbm:
        parts.append(
            f"Copy bandwidth ({r['device']}): {r['gb_s']:.0f} GB/s (p50 of a {r['bytes'] / 2**30:.2f} GiB copy)"
        )
    warm = read_jsonl(out / "warm.jsonl")
    if warm:
        parts.append(
            "## First call per triton mode (compile, cold cache)\n\n"
            + _md(
                ["precision", "iterates", "s"],
                [
                    [r["precision"], "keep" if r["keep_iterates"] else "recompute", _fmt(r["seconds"], ".1f")]
                    for r in warm
                ],
            )
        )
    speed = read_jsonl(out / "speed.jsonl")
    if speed:
        parts.append("## Speed (pool_speed: ms p50; TFLOP/s against the minimal FLOP count)")
        parts.append(speed_table(speed))
    prof = read_jsonl(out / "profile.jsonl")
    if prof:
        rows = [
            [
                r.get("precision", ""),
                r.get("kernel", r.get("status", "")),
                _fmt(r.get("calls"), ".0f"),
                _fmt(r.get("us"), ".1f"),
                _fmt(r.get("tflops")),
                _fmt(r.get("gb_s"), ".0f"),
                _fmt(r.get("peak_fraction"), ".0%"),
                _fmt(r.get("hbm_fraction"), ".0%"),
                _fmt(r.get("wall_ms")),
                _fmt(r.get("floor_ms")),
            ]
            for r in prof
            if r.get("kernel") != "(cpu ops)"
        ]
        parts.append("## Per kernel (torch.profiler; FLOPs and bytes of benchmarks/flops.py)")
        parts.append(
            _md(
                [
                    "precision",
                    "kernel",
                    "calls",
                    "us / fwd+bwd",
                    "TFLOP/s",
                    "GB/s",
                    "of peak",
                    "of 4.8 TB/s",
                    "wall ms",
                    "floor ms",
                ],
                rows,
            )
        )
    cold = read_jsonl(out / "cold_start.jsonl")
    if cold:
        parts.append(
            "## Launch-config tuning, cold start (THREEG_TRITON_AUTOTUNE=1)\n\n"
            + _md(
                ["precision", "Triton cache", "first call s", "after: ms p50", "chosen"],
                [
                    [
                        r["precision"],
                        r["triton_cache"],
                        _fmt(r["first_call_s"], ".2f"),
                        _fmt(r["after_ms_p50"]),
                        json.dumps(r["tuned"][0]["chosen"]) if r["tuned"] else "(no tuning)",
                    ]
                    for r in cold
                ],
            )
        )
    return "\n\n".join(parts) + "\n"


def write_summary(out: Path) -> None:
    (out / "summary.md").write_text(summary(out))
    print(f"[gpu_check] wrote {out / 'summary.md'}", flush=True)


# ========================================================================================== main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("correctness", "speed"):
        s = sub.add_parser(name)
        s.add_argument("out_dir")
        s.add_argument("--dry", action="store_true", help="CPU plumbing run with tiny shapes (THREEG_GPU_CHECK_DRY=1)")
        s.add_argument("--budget", type=float, help=f"seconds for the whole command (default {DEFAULT_BUDGET_S})")
    s = sub.add_parser("summary")
    s.add_argument("out_dir")
    for name in ("check", "warm", "hbm", "profile", "cold-start"):  # workers, started by the commands
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--dry", action="store_true")
        if name == "check":
            s.add_argument("--backend", choices=BACKENDS, required=True)
            s.add_argument("--group", required=True)
        if name in ("warm", "cold-start"):
            s.add_argument("--precision", choices=PRECISIONS, required=True)
        if name == "cold-start":
            s.add_argument("--cache", choices=("empty", "filled"), required=True)
    args = p.parse_args(argv)
    if getattr(args, "dry", None) is False and os.environ.get("THREEG_GPU_CHECK_DRY", "0") not in ("", "0"):
        args.dry = True
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    workers = dict(check=worker_check, warm=worker_warm, hbm=worker_hbm, profile=worker_profile)
    workers["cold-start"] = worker_cold_start
    if args.command in workers:
        workers[args.command](args)
        return
    out = Path(args.out_dir).resolve()
    if args.command == "summary":
        write_summary(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (DRY_BUDGET_S if args.dry else DEFAULT_BUDGET_S)
    run = Run(out=out, dry=args.dry, budget_s=budget)
    print(
        f"[gpu_check] {args.command}{' (dry)' if args.dry else ''}: results in {out}, budget {budget:.0f} s", flush=True
    )
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        (command_correctness if args.command == "correctness" else command_speed)(run)
    finally:
        finish_build(run, 0)  # a build still running at the end is ended and recorded
        write_summary(out)
    print(f"[gpu_check] done in {time.monotonic() - run.start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
