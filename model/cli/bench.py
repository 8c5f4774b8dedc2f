"""`sprm bench`: the quick benchmarks, `python -m bench` in the source checkout (the package never imports bench/)."""

from __future__ import annotations

import argparse
import os
import sys

from sprm_kernels.model.cli.common import UsageError, positive_int

NAME = "bench"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="the quick benchmarks: python -m bench in the source checkout")
    parser.add_argument("--full", action="store_true", help="the full kernel and pipeline benchmarks")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads (default 1)")
    return parser


def source_checkout() -> str | None:
    """The source checkout this package runs from (an editable install: the folder holding model/ and bench/), or
    the current directory when it is one; None for a plain install, which has no benchmarks."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in (here, os.getcwd()):
        if os.path.isfile(os.path.join(folder, "bench", "__main__.py")) and os.path.isfile(
            os.path.join(folder, "pyproject.toml")
        ):
            return folder
    return None


def run(args) -> int:
    """`python -m bench` in the source checkout, as a child process (the package itself never imports `bench`)."""
    import subprocess

    checkout = source_checkout()
    if checkout is None:
        raise UsageError(
            "bench: the benchmarks live in the source checkout (bench/), which this install does not come from: "
            "clone the repository, pip install -e it, and run sprm bench (or python -m bench) there"
        )
    command = [sys.executable, "-m", "bench"] + (["--full"] if args.full else [])
    command += [] if args.threads is None else ["--threads", str(args.threads)]
    return subprocess.run(command, cwd=checkout).returncode
