# make demo       set up (venv + dependencies + package) and run the main job (the digits training demo)
# make test       set up and run the whole test suite (with Triton 3.6 beside the pinned Triton, for the compile check)
# make test-fast  the suite without the slow end-to-end tests (training runs, resume, DDP, torch.compile)
# make lint       ruff: lint and format check (line length 120; pyproject.toml)
# A fresh machine needs only python3 (>= 3.9) with venv; everything else is installed into $(VENV).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
# The demo needs the package and its [train] extra; the tests and lint need [dev] (timm, ONNX, pytest, ruff).
STAMP_TRAIN := $(VENV)/.threeg-installed-train
STAMP := $(VENV)/.threeg-installed
# Triton 3.6 (the version GPU machines may come with) beside the pinned one: the sm_90 compile check of
# tests/test_triton.py runs under both. Only its compiler is used (its interpreter fails with NumPy 2).
TRITON_36 := $(abspath $(VENV)/triton-3.6)
STAMP_TRITON_36 := $(VENV)/.threeg-triton-3.6

.PHONY: setup demo test test-fast lint format clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_TRAIN): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e ".[train]"
	touch $@

$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@ $(STAMP_TRAIN)

$(STAMP_TRITON_36): $(VENV)/bin/python
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(TRITON_36) triton==3.6.0
	touch $@

setup: $(STAMP)

demo: $(STAMP_TRAIN)
	$(PY) -m train --config train/configs/digits_demo.yaml --output-dir runs/demo --overwrite

test: setup $(STAMP_TRITON_36)
	$(PY) -m threeg_kernels
	THREEG_TRITON_36=$(TRITON_36) $(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf build *.egg-info threeg_kernels/*.so
