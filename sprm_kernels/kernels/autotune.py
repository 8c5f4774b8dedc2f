"""Opt-in autotuning for GPU users: `SPRM_AUTOTUNE=1` wraps the head kernels in `triton.autotune`.

Off by default: the static picks of `pick_score_config` run, and nothing is timed. When on (compiled CUDA runs
only; never under the interpreter), each launch goes through a `triton.autotune` over a small list of
(BLOCK_K, num_warps, num_stages) candidates for its regime, keyed by (tune_key = the S bucket, H, F), so a
server times at most one sweep per bucket and head shape; the static pick is always among the candidates.
BLOCK_S and BLOCK_N stay the static ones, because the grid and the schedule's runtime integers depend on them.
Tickets are reset to zero before every timed run; StepScorer's running sums are restored after it.
NOT TESTED ON A GPU (none was available): only construction and the off-by-default switch are tested.
"""

from __future__ import annotations

import functools
import os

import triton

# (BLOCK_K, num_warps, num_stages): decode buckets stream W1 (deep pipelines); GEMM buckets trade K depth for
# stages. fp32 operands take twice the registers and shared memory, hence their own, smaller lists.
TUNE_CANDIDATES = {
    ("decode", False): [(128, 8, 4), (128, 8, 3), (64, 4, 6), (256, 4, 3), (64, 8, 4)],
    ("gemm", False): [(64, 8, 3), (32, 8, 4), (64, 4, 4), (32, 8, 5), (128, 8, 2)],
    ("decode", True): [(16, 8, 4), (16, 8, 3), (16, 8, 6), (32, 8, 4)],
    ("gemm", True): [(16, 8, 3), (16, 8, 4), (32, 8, 3)],
}
TUNED = ("BLOCK_K", "num_warps", "num_stages")


def autotune_enabled() -> bool:
    return os.environ.get("SPRM_AUTOTUNE", "0") == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _regime(bucket: int) -> str:
    return "decode" if bucket <= 1 else "gemm"


def _configs():
    configs = []
    for (regime, fp32), candidates in TUNE_CANDIDATES.items():
        for block_k, warps, stages in candidates:
            config = triton.Config({"BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
            config.sprm_regime = (regime, fp32)  # read by the pruner below
            configs.append(config)
    return configs


def _prune(configs, named_args, **kwargs):
    """Only the candidates of this launch's regime and operand width."""
    regime = (_regime(int(named_args["tune_key"])), bool(kwargs.get("FP32_INPUTS", False)))
    return [c for c in configs if getattr(c, "sprm_regime", None) == regime]


@functools.cache
def tuned_kernel(kernel, reset_to_zero: tuple[str, ...], restore_value: tuple[str, ...] = ()):
    """`kernel` wrapped in triton.autotune (built once per kernel)."""
    return triton.autotune(
        configs=_configs(),
        key=["tune_key", "H", "F"],
        prune_configs_by={"early_config_prune": _prune},
        reset_to_zero=list(reset_to_zero),
        restore_value=list(restore_value),
    )(kernel)


def maybe_autotuned(kernel, meta: dict, reset_to_zero: tuple[str, ...], restore_value: tuple[str, ...] = ()):
    """(kernel, meta) to launch: unchanged unless SPRM_AUTOTUNE=1, else the autotuned wrapper and the meta
    without the tuned fields."""
    if not autotune_enabled():
        return kernel, meta
    return tuned_kernel(kernel, reset_to_zero, restore_value), {k: v for k, v in meta.items() if k not in TUNED}
