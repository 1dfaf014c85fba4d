"""threeg_kernels/_precision.py: the float32 matmul setting of the caller is forced to IEEE inside the op bodies and
put back exactly as it was, whichever way the caller set it; autocast off. The effect on each backend's results is in
tests/test_backends.py (test_ieee_whatever_the_callers_matmul_setting, test_ops_called_in_an_autocast_region)."""

from __future__ import annotations

import pytest
import torch

import threeg_kernels
from threeg_kernels import _precision
from threeg_kernels._precision import LEGACY_SETTING, MATMUL_SETTINGS, ieee_matmul, no_autocast

from .helpers import fast_matmul, make_case, reset_matmul_settings


def _state() -> dict:
    """Everything a script can read back about its float32 matmul settings, errors included (after a mix of the
    legacy and the fp32_precision spellings torch refuses to answer the legacy getters)."""
    getters = {
        "allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cuda.matmul": lambda: torch.backends.cuda.matmul.fp32_precision,
        "mkldnn.matmul": lambda: torch.backends.mkldnn.matmul.fp32_precision,
        "generic": lambda: torch.backends.fp32_precision,
    }
    state = {}
    for name, get in getters.items():
        try:
            state[name] = get()
        except RuntimeError as exc:
            state[name] = f"RuntimeError: {str(exc)[:60]}"
    return state


def _allow_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True


def _generic_tf32():
    torch.backends.fp32_precision = "tf32"


def _both_tf32():
    torch.backends.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def _new_api_tf32():
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


# The ways a script allows faster float32 products.
SETTINGS = {
    "default": lambda: None,
    "allow_tf32": _allow_tf32,
    "precision_high": lambda: torch.set_float32_matmul_precision("high"),
    "precision_medium": lambda: torch.set_float32_matmul_precision("medium"),
    "fp32_precision": _new_api_tf32,
    "generic_tf32": _generic_tf32,
    "generic_and_cuda_tf32": _both_tf32,
}


@pytest.fixture(autouse=True)
def _fresh_settings():
    reset_matmul_settings()
    yield
    reset_matmul_settings()


@pytest.mark.parametrize("device_type", sorted(MATMUL_SETTINGS))
@pytest.mark.parametrize("how", sorted(SETTINGS))
def test_ieee_inside_callers_setting_after(device_type, how):
    SETTINGS[how]()
    before = _state()
    setting = MATMUL_SETTINGS[device_type]
    with ieee_matmul(device_type):
        assert setting.read() in setting.exact
    assert _state() == before


def test_restored_after_an_exception():
    _allow_tf32()
    before = _state()
    with pytest.raises(ZeroDivisionError), ieee_matmul("cuda"):
        assert MATMUL_SETTINGS["cuda"].read() == "ieee"
        _ = 1 / 0
    assert _state() == before


@pytest.mark.parametrize("how", ["allow_tf32", "precision_high", "precision_medium"])
def test_legacy_setting(monkeypatch, how):
    """torch < 2.9's one process-wide setting, exercised through the legacy spellings this torch still has (which
    here also write the fp32_precision settings: only what torch < 2.9 can read back is compared)."""
    monkeypatch.setattr(_precision, "MATMUL_SETTINGS", {"cuda": LEGACY_SETTING})
    SETTINGS[how]()
    legacy = ("allow_tf32", "float32_matmul_precision")
    before = {k: _state()[k] for k in legacy}
    with ieee_matmul("cuda"):
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32
    assert {k: _state()[k] for k in legacy} == before


def test_a_device_without_a_setting_is_left_alone():
    _allow_tf32()
    before = _state()
    with ieee_matmul("meta"):
        assert _state() == before
    assert _state() == before


def test_the_fast_settings_are_what_a_script_sets():
    """The setting ieee_matmul forces is the one the usual spellings flip (else forcing it would not help)."""
    _allow_tf32()
    assert MATMUL_SETTINGS["cuda"].read() == "tf32"
    reset_matmul_settings()
    torch.set_float32_matmul_precision("medium")
    assert MATMUL_SETTINGS["cpu"].read() == "bf16"


def test_no_autocast():
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with no_autocast("cpu"):
            assert (a @ a).dtype == torch.float32
    with no_autocast("meta"):  # no autocast there: nothing to turn off
        pass


@pytest.mark.slow
def test_ieee_under_torch_compile():
    """The setting is forced where the compiled graph runs the op (its body), not only while tracing: a compiled
    call under oneDNN's bf16 setting equals the eager call under the default setting (exactly, on CPU)."""
    x, w, _ = make_case(2, 64, 49, weighted=True, dtype=torch.float32)
    fn = lambda a, b: threeg_kernels.cov_pool(a, b, iters=5, backend="torch")  # noqa: E731
    want = fn(x, w)
    with fast_matmul("cpu"):
        got = torch.compile(fn, fullgraph=True)(x, w)
    assert torch.equal(got, want)
