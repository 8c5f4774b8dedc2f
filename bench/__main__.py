"""All benchmarks: `python -m bench` runs the quick kernel benchmark and the quick pipeline benchmark (k = 2 and 8,
small budgets; about a minute on 2 CPU cores), `python -m bench --full` the full versions of both.

    python -m bench [--full] [--csv PATH] [--threads N]

Both append to the same CSV (see bench.common and the docstrings of bench.kernels and bench.pipeline).
"""

from __future__ import annotations

import argparse
import time

import torch

from sprm_kernels.dispatch import interpreter_enabled

from . import common, kernels, pipeline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full kernel and pipeline benchmarks")
    parser.add_argument("--csv", default=str(common.DEFAULT_CSV), help="CSV to append to (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU: torch.set_num_threads for both parts (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("python -m bench times compiled code: unset TRITON_INTERPRET")
    start = time.perf_counter()
    kernel_args = ["--csv", args.csv]
    if not torch.cuda.is_available():
        kernel_args += ["--threads", str(args.threads)]
    print("== kernels ==", flush=True)
    kernels.main(kernel_args + ([] if args.full else ["--quick"]))
    print(f"\n== pipeline ({time.perf_counter() - start:.0f} s so far) ==", flush=True)
    pipeline.main(["--csv", args.csv, "--threads", str(args.threads)] + ([] if args.full else ["--quick"]))
    print(f"\npython -m bench{' --full' if args.full else ''}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
