# `make demo` trains the built-in demo scene; `make test` runs the test suite.
# Both create the virtual environment (.venv) with torch and the requirements when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m encoder.hashgrid_cpp  # the hash grid's C++ CPU kernels, built once per machine (not fatal)
	touch $@

.PHONY: venv test demo dtu bench
venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) run.py --config confs/neus-demo.yaml --train

dtu: venv
	$(PY) run.py --config confs/neus-dtu-wmask-cpu.yaml --train dataset.root_dir=../shared/data/dtu_scan24

bench: venv
	$(PY) scripts/benchmark.py --config confs/neus-dtu-wmask-cpu.yaml dataset.root_dir=../shared/data/dtu_scan24
