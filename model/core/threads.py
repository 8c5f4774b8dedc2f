"""torch's CPU threads for a loaded model: one rule for the CLI, the evaluation and the Ray workers.

A small model's ops are too small to split across threads: on the shipped 0.79M-parameter model `sprm eval --n 20`
took 75 s on 1 thread and 1441 s on torch's default 2 on a busy 2-core machine (docs/performance.md). The 50M bound
itself is a judgment, not a measurement.
"""

from __future__ import annotations

import os

SMALL_MODEL_PARAMETERS = 50_000_000

THREADS_HELP = (
    "torch CPU threads (default: $OMP_NUM_THREADS if set, else 1 for a model under 50M parameters on CPU, whose ops "
    "are too small to share, else torch's default of one per core)"
)


def default_threads(device: str, num_parameters: int | None) -> int | None:
    """$OMP_NUM_THREADS when set -> None (torch already follows it); 1 on CPU for a model under
    SMALL_MODEL_PARAMETERS; else None (torch's default: one per physical core)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if not device.startswith("cpu") or num_parameters is None:
        return None
    return 1 if num_parameters < SMALL_MODEL_PARAMETERS else None


def set_threads(threads: int | None, *, device: str = "cpu", num_parameters: int | None = None) -> None:
    """`threads` when given, else `default_threads(device, num_parameters)` (nothing when that is None)."""
    import torch

    threads = threads if threads is not None else default_threads(device, num_parameters)
    if threads is not None:
        torch.set_num_threads(threads)
