"""Benchmarks of sprm-kernels: `python -m bench.kernels` (kernel microbenchmark), `python -m bench.plot` (PNGs),
and `bench/test_benchmarks.py` (pytest-benchmark regression suite of the CPU paths). Not part of the package."""
