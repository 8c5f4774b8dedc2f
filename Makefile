# `make demo` and `make test` create and install .venv the first time (then reuse it); every other target uses it too.
# TORCH: the torch to pin first (the CPU build of 2.13.0 here; on a GPU machine e.g. `make demo TORCH=torch`).
.PHONY: demo test check format test-gpu aot bench bench-plot layers clean-venv

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,serve]"
	touch $(STAMP)

demo: $(STAMP)  ## the main job: best-of-k reflective generation on the shipped model (seeded: the README's output)
	$(VENV)/bin/sprm generate "4+8+1+6+9+3=?" --k 8 --seed 0

test: $(STAMP)  ## the test suite; on a machine without CUDA the kernels run under the Triton interpreter
	$(PY) -m pytest -q

check: $(STAMP)  ## lint, format check (ruff, line length 120) and the layer rules of model/ (CONTRIBUTING)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layers.py

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test-gpu: $(STAMP)  ## only the tests that need CUDA
	$(PY) -m pytest -q -m cuda

aot: $(STAMP)  ## compile every kernel configuration for sm_80 and sm_90 and report registers / spills
	env -u TRITON_INTERPRET $(PY) -m sprm_kernels.aot --arch 80 90

bench: $(STAMP)  ## quick benchmarks (kernels and pipeline)
	$(PY) -m bench

bench-plot: $(STAMP)
	$(PY) -m bench.plot

clean-venv:
	rm -rf $(VENV)
