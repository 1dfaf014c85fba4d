# make demo  - set up (venv + dependencies + package) and run the main job
# make test  - set up and run the whole test suite
# A fresh machine needs only python3 (3.11) with venv; everything else is installed into $(VENV).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.threeg-installed

.PHONY: setup demo test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python requirements-dev.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m train --config train/configs/digits_demo.yaml --output-dir runs/demo --overwrite

test: setup
	$(PY) -m threeg_kernels
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info threeg_kernels/*.so
