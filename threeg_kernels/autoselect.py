"""backend="auto" on CUDA: the backend and matmul precision that run, measured per shape on the user's GPU.

On a device type listed in CANDIDATES (CUDA), `choose` decides what a cov_pool call with backend="auto" runs:

- The key of a decision is (device name, compute dtype, C, N, K, weighted, B rounded down to a power of two).
  The triangle order and eps do not change the speed and are not part of it. Rounding B down means a new
  batch size does not always measure again, and the measurement's inputs are never larger than the call's.
- The first call of a key runs, on random inputs of the key's shape (a private generator: the user's RNG
  state is untouched), forward and backward of the 'torch' backend (the accuracy reference), then of each
  candidate: ('triton', 'ieee'), ('triton', 'tf32x3') (float32 only), ('ext', 'ieee'), ('torch', 'ieee'),
  those present on the device, in the fixed order of dispatch.AUTO_ORDER. A candidate whose output or
  gradients (dx, dweight) are further than RTOL (max |a - b| / max |b|: 1e-5 in float32, 1e-12 in float64)
  from the reference's is rejected; the others are timed by `timer` (one warm-up run, then REPEATS runs
  timed with CUDA events; the median). The fastest is kept for the key for the life of the process (ties:
  the earlier in the fixed order). A candidate that raises (a Triton compilation failing, for example) or
  disagrees is skipped with its reason; `selections()` lists every decision with each candidate's time,
  error and reason.
- 'tf32x3' can be auto's choice only when the call asked for precision="ieee" (the default) and it was
  within the float32 bound above on the measured inputs. A call that names another precision gets it: only
  the 'triton' backend has those, and nothing is measured.
- The measurement runs in a worker thread, on the calling thread's CUDA stream: the caller's autograd
  state (grad mode, inference mode, saved-tensor hooks, the graph being built) and its RNG are untouched.
- torch.cuda.OutOfMemoryError while measuring: the key gets the fixed order for the rest of the process,
  with the reason recorded (not written to the cache file, so a later process measures again).
- Under torch.compile (torch.compiler.is_compiling()) and while a CUDA graph is being captured, a key that
  was never decided runs the fixed order and is not remembered (nothing can be timed there). Make one eager
  call of the shape first, or load a cache file: decided keys are used under both.
- THREEG_AUTO_TUNE=0 in the environment turns this off: 'auto' then runs the first backend present in the
  fixed order dispatch.AUTO_ORDER (dispatch.py does not call `choose`).
- THREEG_AUTO_CACHE=path: the decisions in that JSON file (written by `save` or by this variable) are loaded
  at the first call, and each new decision is added to it (written to a temporary file, then renamed over
  it). Entries measured with other versions of threeg_kernels, torch or Triton are ignored.

Triton's launch settings are tuned apart from this, per exact shape (triton_kernels/tuning.py), and run
inside the Triton candidates' calls here. Nothing in this module has run on a GPU yet: which backend wins
is measured at run time on the user's GPU (docs/autoselect.md).

Tests substitute `timer` and `run` (module attributes) and add a CPU row to CANDIDATES.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.metadata
import json
import math
import os
import statistics
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from .backends import Loaded

ENV_TUNE = "THREEG_AUTO_TUNE"
ENV_CACHE = "THREEG_AUTO_CACHE"
REPEATS = 5
FORMAT = 1  # of the cache file

# (backend, precision) tried per device type, in the fixed order of dispatch.AUTO_ORDER (the tie-break).
# 'reference' (autograd through plain ops) is left out on CUDA: it is the fixed order's last resort.
CANDIDATES = {
    "cuda": (("triton", "ieee"), ("triton", "tf32x3"), ("ext", "ieee"), ("torch", "ieee")),
}
ACCURACY_REFERENCE = "torch"
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # max |a - b| / max |b|: the fp32 / fp64 bounds
_EPS = 1e-7  # cov_pool's default; eps does not change the speed
_KEY_FIELDS = ("device", "dtype", "C", "N", "iters", "weighted", "B")


class Key(NamedTuple):
    """What a decision is kept for. device: the device's name ('NVIDIA H200'); dtype: 'float32' / 'float64';
    B: the batch size rounded down to a power of two."""

    device: str
    dtype: str
    C: int
    N: int
    iters: int
    weighted: bool
    B: int


class Candidate(NamedTuple):
    backend: str
    precision: str


@dataclass
class Selection:
    """One decision: its key, what each candidate did, and why the fixed order is used instead, if it is."""

    key: Key
    # Candidate -> {"ms": median ms of forward + backward, "rel_err": against the reference, "error": reason}
    results: dict = field(default_factory=dict)
    fallback: Optional[str] = None  # set: the fixed order runs for this key, for this reason
    fixed: Optional[str] = None  # with a fallback: the backend the fixed order gave
    versions: dict = field(default_factory=dict)
    # The candidates that agreed with the reference, fastest first (ties: the fixed order). Set once by `rank`:
    # torch.compile reads it while tracing, where sorting by float keys is not traceable.
    ranked: tuple = ()

    def rank(self) -> Selection:
        timed = [c for c, r in self.results.items() if "ms" in r]
        self.ranked = tuple(sorted(timed, key=lambda c: self.results[c]["ms"]))  # sorted is stable
        return self

    def as_dict(self) -> dict:
        if self.fallback is None and self.ranked:
            backend, precision = self.ranked[0]
        else:
            backend, precision = self.fixed, "ieee"
        return dict(
            self.key._asdict(),
            backend=backend,
            precision=precision,
            fallback=self.fallback,
            candidates=[dict(backend=c.backend, precision=c.precision, **r) for c, r in self.results.items()],
            versions=dict(self.versions),
        )


_SELECTED: dict[Key, Selection] = {}
_NAMES: dict[str, str] = {}  # str(device) -> device name
_LOCK = threading.Lock()
_ENV_LOADED = False


def enabled() -> bool:
    """False when THREEG_AUTO_TUNE=0."""
    return os.environ.get(ENV_TUNE, "1").strip() != "0"


def measures(device: torch.device) -> bool:
    """True when 'auto' on `device` is decided by measurement (its type has CANDIDATES and tuning is on)."""
    return device.type in CANDIDATES and enabled()


def bucket(b) -> int:
    """The largest power of two <= b. Comparisons only (no bit_length): under torch.compile(dynamic=True) a
    symbolic B gets range guards, so one graph serves a whole bucket."""
    out = 1
    while out * 2 <= b:
        out *= 2
    return out


@torch.compiler.assume_constant_result
def _device_name(device: str) -> str:
    """The name keying `device`'s decisions; the first call also loads THREEG_AUTO_CACHE. Marked constant so
    that torch.compile runs it while tracing (a file read cannot be traced) and keeps its result."""
    global _ENV_LOADED
    if not _ENV_LOADED:
        _ENV_LOADED = True
        path = os.environ.get(ENV_CACHE)
        if path and os.path.exists(path):
            try:
                load(path)
            except (OSError, ValueError) as exc:
                warnings.warn(f"threeg_kernels: {ENV_CACHE}={path!r} not loaded: {exc}", stacklevel=2)
    name = _NAMES.get(device)
    if name is None:
        dev = torch.device(device)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
        _NAMES[device] = name
    return name


def key_for(x: torch.Tensor, weight: Optional[torch.Tensor], iters: int) -> Key:
    """The key of a call with x (B, C, N) and weight (B, N) or None, in the compute dtype."""
    b, c, n = x.shape
    dtype = str(x.dtype).replace("torch.", "")
    return Key(_device_name(str(x.device)), dtype, c, n, iters, weight is not None, bucket(b))


def choose(
    x: torch.Tensor, weight: Optional[torch.Tensor], iters: int, precision: str, available: dict[str, Loaded]
) -> tuple[str, str]:
    """(backend, precision) for this call. `available`: the backends present on x's device, in the fixed order
    (dispatch.AUTO_ORDER), by name; the first is the fixed order's choice."""
    if precision != "ieee":  # the caller's choice stands: the first backend with that mode (triton)
        return next(name for name, loaded in available.items() if precision in loaded.precisions), precision
    fixed = next(iter(available))
    key = key_for(x, weight, iters)
    selection = _SELECTED.get(key)
    if selection is None:
        if not _can_measure():
            return fixed, "ieee"
        with _LOCK:
            selection = _SELECTED.get(key)
            if selection is None:
                selection = _measure(key, x.device, x.dtype, available)
                _SELECTED[key] = selection
                if selection.fallback is None:
                    _add_to_env_cache(selection)
                else:
                    selection.fixed = fixed
    if selection.fallback is None:
        for candidate in selection.ranked:
            loaded = available.get(candidate.backend)
            if loaded is not None and candidate.precision in loaded.precisions:
                return candidate
    return fixed, "ieee"


def _can_measure() -> bool:
    """False while torch.compile traces the call or a CUDA graph is being captured: nothing can be timed."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------------------------- measurement


@dataclass
class Inputs:
    """Random inputs of a key's shape, leaves that require grad, and one upstream gradient."""

    x: torch.Tensor  # (B, C, N)
    weight: Optional[torch.Tensor]  # (B, N) or None
    grad: torch.Tensor  # (B, C(C+1)/2)
    iters: int


def make_inputs(key: Key, device: torch.device, dtype: torch.dtype) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(key.B, key.C, key.N, device=device, dtype=dtype, generator=gen)
    w = torch.rand(key.B, key.N, device=device, dtype=dtype, generator=gen) + 0.5 if key.weighted else None
    grad = torch.randn(key.B, key.C * (key.C + 1) // 2, device=device, dtype=dtype, generator=gen)
    return Inputs(x.requires_grad_(), None if w is None else w.requires_grad_(), grad, key.iters)


def run(loaded: Loaded, precision: str, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """One forward and backward of a backend: (out, dx) or (out, dx, dweight)."""
    leaves = (inputs.x,) if inputs.weight is None else (inputs.x, inputs.weight)
    with torch.enable_grad():
        out = loaded.pool(inputs.x, inputs.weight, inputs.iters, _EPS, "3g", precision, loaded.keep_iterates)
        grads = torch.autograd.grad(out, leaves, inputs.grad)
    return (out.detach(), *grads)


def timer(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of REPEATS calls of fn() after one warm-up, timed with CUDA events on the current stream."""
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (the two maxima in the tensors' dtype, their ratio in double)."""
    with torch.no_grad():
        diff, scale = (got - want).abs().max().item(), want.abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _candidates(dtype: torch.dtype, device: torch.device, available: dict[str, Loaded]) -> list[Candidate]:
    """CANDIDATES of the device whose backend is present and has the precision; other modes in float32 only."""
    return [
        Candidate(name, precision)
        for name, precision in CANDIDATES.get(device.type, ())
        if name in available
        and precision in available[name].precisions
        and (precision == "ieee" or dtype == torch.float32)
    ]


def _measure(key: Key, device: torch.device, dtype: torch.dtype, available: dict[str, Loaded]) -> Selection:
    """Decides `key` (see the module docstring), in a worker thread on the caller's CUDA stream."""
    selection = Selection(key, versions=_versions())
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def work() -> bool:
        try:
            with contextlib.ExitStack() as on_stream:
                if stream is not None:  # the worker starts on the default stream of the current device
                    on_stream.enter_context(torch.cuda.device(device))
                    on_stream.enter_context(torch.cuda.stream(stream))
                _measure_candidates(selection, device, dtype, available)
        except torch.cuda.OutOfMemoryError as exc:
            # Caught here, where the traceback's frames (holding the measurement's tensors) end with `exc`.
            selection.fallback = f"out of memory while measuring ({_reason(exc)})"
            return True
        return False

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="threeg-autoselect") as pool:
        out_of_memory = pool.submit(work).result()
    if out_of_memory and device.type == "cuda":
        torch.cuda.empty_cache()  # the measurement's tensors are gone: hand their memory back
    return selection


def _measure_candidates(selection: Selection, device: torch.device, dtype, available: dict[str, Loaded]) -> None:
    tol = RTOL[dtype]
    reference = available.get(ACCURACY_REFERENCE)
    if reference is None:
        selection.fallback = f"the accuracy reference, backend {ACCURACY_REFERENCE!r}, is not available on {device}"
        return
    inputs = make_inputs(selection.key, device, dtype)
    try:
        want = run(reference, "ieee", inputs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - nothing can be checked without it: say why
        selection.fallback = f"the accuracy reference, backend {ACCURACY_REFERENCE!r}, raised {_reason(exc)}"
        return
    for candidate in _candidates(dtype, device, available):
        result = selection.results[candidate] = {}
        loaded = available[candidate.backend]
        try:
            got = run(loaded, candidate.precision, inputs)  # also compiles what the candidate needs
            err = max(_rel_err(g, w) for g, w in zip(got, want))
            if err == err:  # not NaN
                result["rel_err"] = err
            if not err <= tol:
                result["error"] = f"disagrees with {ACCURACY_REFERENCE!r}: max relative error {err:.1e} > {tol:.0e}"
                continue
            result["ms"] = float(timer(functools.partial(run, loaded, candidate.precision, inputs), device))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is skipped, with its reason
            result["error"] = _reason(exc)
    if not selection.rank().ranked:
        selection.fallback = "no candidate ran and agreed with the reference"


def _versions() -> dict:
    from . import __version__

    try:
        triton_version: Optional[str] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"threeg_kernels": __version__, "torch": torch.__version__, "triton": triton_version}


# ------------------------------------------------------------------------------------------ listing and files


def selections() -> list[dict]:
    """Every decision of this process (measured, loaded, or fallen back), as plain dicts: the key fields, the
    chosen backend and precision, `fallback` (why the fixed order runs, or None), each candidate's `ms`,
    `rel_err` and `error`, and the versions it was measured with."""
    return [s.as_dict() for s in _SELECTED.values()]


def clear() -> None:
    """Forgets every decision; the next call reads THREEG_AUTO_CACHE again and measures what it lacks."""
    global _ENV_LOADED
    _SELECTED.clear()
    _ENV_LOADED = False


def save(path: str) -> None:
    """Writes this process's measured (and loaded) decisions to the JSON file `path`, replacing it atomically."""
    _write(path, [s.as_dict() for s in _SELECTED.values() if s.fallback is None])


def load(path: str) -> int:
    """Takes the decisions of a JSON file written by `save` (or THREEG_AUTO_CACHE) measured with this
    process's versions of threeg_kernels, torch and Triton; they replace this process's for the same key.
    Returns how many were taken. ValueError names the file and the entry when it is malformed."""
    versions = _versions()
    taken = 0
    for i, entry in enumerate(_read(path)):
        try:
            selection = _from_dict(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: selection {i} is malformed ({type(exc).__name__}: {exc})") from None
        if selection.versions == versions:
            _SELECTED[selection.key] = selection
            taken += 1
    return taken


def _from_dict(entry: dict) -> Selection:
    kinds = dict(device=str, dtype=str, C=int, N=int, iters=int, weighted=bool, B=int)
    for name, kind in kinds.items():
        if type(entry[name]) is not kind:
            raise TypeError(f"{name} must be {kind.__name__}; got {entry[name]!r}")
    selection = Selection(Key(*(entry[f] for f in _KEY_FIELDS)), versions=dict(entry["versions"]))
    for c in entry["candidates"]:
        outcome = {k: c[k] for k in ("ms", "rel_err", "error") if k in c}
        if "ms" in outcome and not isinstance(outcome["ms"], (int, float)):
            raise TypeError(f"ms must be a number; got {outcome['ms']!r}")
        selection.results[Candidate(str(c["backend"]), str(c["precision"]))] = outcome
    if not selection.rank().ranked:
        raise ValueError("no candidate has a time")
    return selection


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("selections"), list):
        raise ValueError(f"{path} is not a threeg_kernels autoselect file (format {FORMAT})")
    return data["selections"]


def _write(path: str, entries: list[dict]) -> None:
    """Writes `entries` to `path` through a temporary file in the same folder renamed over it: a reader sees
    the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".autoselect-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "selections": entries}, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _add_to_env_cache(selection: Selection) -> None:
    """Adds a new decision to THREEG_AUTO_CACHE, if set: the file as it is now (another process may have added
    to it), that entry replaced or appended. Two processes writing at once can lose one's entry (measured
    again later); a file that cannot be written gives a warning, not an error."""
    path = os.environ.get(ENV_CACHE)
    if not path:
        return
    new = selection.as_dict()
    same = lambda e: isinstance(e, dict) and all(e.get(f) == new[f] for f in (*_KEY_FIELDS, "versions"))  # noqa: E731
    try:
        entries = [e for e in _read(path) if not same(e)] if os.path.exists(path) else []
    except (OSError, ValueError) as exc:
        warnings.warn(f"threeg_kernels: {ENV_CACHE}={path!r} unreadable, rewritten: {exc}", stacklevel=2)
        entries = []
    try:
        _write(path, [*entries, new])
    except OSError as exc:
        warnings.warn(f"threeg_kernels: could not write {ENV_CACHE}={path!r}: {exc}", stacklevel=2)
