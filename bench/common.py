"""Shared benchmark plumbing: timers (CUDA and CPU), peak memory, roofline floors and the tidy CSV."""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import sprm_kernels

CSV_COLUMNS = "kernel provider dtype S H metric p50 p20 p80 device_name timestamp version".split()
DEFAULT_CSV = Path(__file__).parent / "results" / "kernels.csv"
REPO_ROOT = Path(__file__).resolve().parent.parent

# docs/method.md §9: measured on an H100 of this workplace (device copy, bf16 GEMM).
H100_COPY_BYTES_PER_S = 3.0e12
H100_GEMM_FLOPS_PER_S = 798e12


# ---------------------------------------------------------------------------------------------------------------
# Identification


def version_string() -> str:
    """sprm_kernels.__version__ plus the short git sha ("-dirty" when sprm_kernels/ has uncommitted changes)."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "sprm_kernels")
    except (OSError, subprocess.CalledProcessError):
        return sprm_kernels.__version__
    return f"{sprm_kernels.__version__}+g{sha}{'-dirty' if dirty else ''}"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    p50: float
    p20: float
    p80: float


def time_cuda(fn: Callable[[], object]) -> Timing:
    """triton.testing.do_bench (L2 flushed between calls) medians with the 20th and 80th percentiles."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return Timing(p50, p20, p80)


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]], *, budget_s: float, min_repeats: int = 3, max_repeats: int = 100
) -> dict[str, Timing]:
    """Wall-clock percentiles of each callable, timed in turns (rotating the order every round) for about
    `budget_s` seconds after one warm-up call each, so that load from other processes hits them all alike."""
    names = list(fns)
    first = {}
    for name in names:
        start = time.perf_counter()
        fns[name]()
        first[name] = time.perf_counter() - start
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(sum(first.values()), 1e-6))))
    samples = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    timings = {}
    for name, seconds in samples.items():
        p50, p20, p80 = np.percentile(np.array(seconds) * 1e3, [50, 20, 80])
        timings[name] = Timing(float(p50), float(p20), float(p80))
    return timings


class OtherLoad:
    """Share of the machine's CPU time that other processes used while timing (Linux /proc; None elsewhere).

    Wrap each timed section in `with load.measuring():`; `percent()` covers all of them together.
    """

    def __init__(self):
        self.total = self.other = 0

    @contextlib.contextmanager
    def measuring(self):
        start = self._sample()
        yield
        end = self._sample()
        if start is not None and end is not None:
            total, busy, own = (b - a for a, b in zip(start, end, strict=True))
            self.total += total
            self.other += max(0, busy - own)

    @staticmethod
    def _sample() -> tuple[int, int, int] | None:
        """(all jiffies, busy jiffies, this process's jiffies)."""
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
            with open("/proc/self/stat") as own:
                utime, stime = (int(v) for v in own.read().rsplit(")", 1)[1].split()[11:13])
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), sum(fields) - idle, utime + stime

    def percent(self) -> float | None:
        return 100.0 * self.other / self.total if self.total else None


def wait_until_quiet(max_wait_s: float, *, busy_pct: float = 5.0, window_s: float = 2.0) -> float | None:
    """Waits (at most `max_wait_s`) until other processes use less than `busy_pct` of the CPUs over a `window_s`
    window; returns the last window's share, or None where /proc cannot tell."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = OtherLoad()
        with load.measuring():
            time.sleep(window_s)
        share = load.percent()
        if share is None or share < busy_pct or time.monotonic() >= deadline:
            return share


# ---------------------------------------------------------------------------------------------------------------
# Peak memory


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated by one call beyond what was allocated before it (outputs included), in MB.

    CUDA: torch.cuda.max_memory_allocated delta. CPU: the running total of the CPU allocator's events recorded
    by torch.profiler(profile_memory=True); both count tensor memory only, not allocator caches or the heap.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak / 1e6


@contextlib.contextmanager
def _stderr_silenced():
    """Drops what native code writes to fd 2 (kineto logs two lines per profile), restoring it afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------------------------
# Roofline


def head_flops(rows: int, hidden_size: int) -> float:
    """docs/method.md §9: 4*S*H^2 (the two layers' small terms left out)."""
    return 4.0 * rows * hidden_size**2


def head_min_bytes(rows: int, hidden_size: int, element_size: int) -> float:
    """docs/method.md §9: the gathered rows plus W1, read once: S*H*elt + 2*H^2*elt."""
    return float(rows * hidden_size * element_size + 2 * hidden_size**2 * element_size)


@dataclass(frozen=True)
class Roofline:
    """The machine's copy bandwidth and GEMM rate, and where they came from."""

    bytes_per_s: float
    flops_per_s: float
    source: str  # "spec9" (the H100 figures of docs/method.md §9) or "calibrated" (measured here at start-up)

    def floor_s(self, flops: float, nbytes: float) -> float:
        return max(nbytes / self.bytes_per_s, flops / self.flops_per_s)


SPEC9_H100 = Roofline(H100_COPY_BYTES_PER_S, H100_GEMM_FLOPS_PER_S, "spec9")


def calibrate_cpu_roofline(dtype: torch.dtype = torch.float32) -> Roofline:
    """Best of a few runs of a 256 MB copy and a 2048^3 GEMM on this CPU: the floors of the CPU rows."""
    source = torch.empty(64 * 2**20, dtype=torch.float32)
    target = torch.empty_like(source)
    copy_s = _best_of(lambda: target.copy_(source), repeats=5)
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    gemm_s = _best_of(lambda: torch.mm(a, b), repeats=3)
    return Roofline(2 * source.numel() * source.element_size() / copy_s, 2 * n**3 / gemm_s, "calibrated")


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---------------------------------------------------------------------------------------------------------------
# Results


def append_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Appends `rows` (dicts keyed by `columns`, CSV_COLUMNS by default) to the CSV at `path`, writing the header
    for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS if columns is None else columns)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def format_table(headers: list[str], lines: list[list[str]]) -> str:
    """Plain fixed-width table, right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *lines, strict=True)]
    render = lambda cells: "  ".join(str(cell).rjust(width) for cell, width in zip(cells, widths, strict=True))
    return "\n".join([render(headers), render(["-" * w for w in widths]), *(render(line) for line in lines)])


def cuda_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]
