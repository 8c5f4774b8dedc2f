# Targets assume the project's venv is active (see README: Quick start).
.PHONY: install check format test test-gpu aot bench bench-plot

install:
	python -m pip install torch==2.13.0 && python -m pip install -e ".[dev,serve]"

check:  ## lint and format check (ruff, line length 120)
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

test:  ## the test suite; on a machine without CUDA the kernels run under the Triton interpreter
	python -m pytest -q

aot:  ## compile every kernel configuration for sm_80 and sm_90 and report registers / spills
	env -u TRITON_INTERPRET python -m sprm_kernels.aot --arch 80 90

bench:  ## quick benchmarks (kernels and pipeline)
	python -m bench

bench-plot:
	python -m bench.plot
