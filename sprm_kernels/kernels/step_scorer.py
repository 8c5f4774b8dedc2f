"""sum_log[b] += is_step[b] * log max(sigmoid(w2 . relu(W1 h[b] + b1) + b2), 1e-10); count[b] += is_step[b].

Shapes: hidden (B, H) with any row stride, is_step (B,) bool, running sum_log (B,) fp32 and count (B,) int64.
Fixed shapes and no host synchronisation, so a decode step that calls it can be captured in a CUDA graph.
Grid and schedule as in sprm_score (a 1-D grid mapped by schedule.program_tile; the decode buckets put one
program per SM); the last program to arrive at a row block adds the partials in split order, updates that
block's running sums and resets its ticket for the next call. Idle steps are free: with skip_idle, every program
first reads the [B] flags (is_step and the caller's `want` mask); when no row has either, no program touches W1,
the running sums stay as they are and step_prob is NaN for every row. The decision is made on the device, so
there is still no host synchronisation and the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import maybe_autotuned
from .head import (
    any_row_active,
    clamped_log_sigmoid,
    complete_row_block,
    head_partial_logit,
    program_tile,
    split_columns,
    stable_sigmoid,
)
from .sprm_score import interpreting, num_granules

SCORER_RUNTIME_INTS = (
    "B", "num_row_blocks", "num_splits", "num_granules", "granule", "group_splits", "tune_key", "skip_idle",
)  # fmt: skip
FLAG_TILE = 256  # flags read per step of the idle check


@triton.jit(do_not_specialize=SCORER_RUNTIME_INTS)
def step_scorer_kernel(
    hidden_ptr,
    stride_h,
    is_step_ptr,
    want_ptr,  # [B] bool: rows whose step probability the caller reads (read only when skip_idle)
    w1_ptr,
    stride_w1,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    partial_ptr,  # [num_splits, B] fp32 workspace
    ticket_ptr,  # int32 [row blocks]: zero on entry, reset to zero on exit
    sum_log_ptr,
    count_ptr,
    step_prob_ptr,  # [B] fp32: this call's step probability of every row (flagged or not); NaN on a skipped call
    B,
    H,
    F,
    num_row_blocks,
    num_splits,
    num_granules,
    granule,
    group_splits,
    tune_key,  # the B bucket: only SPRM_AUTOTUNE=1 reads it (its cache key)
    skip_idle,  # 1: skip the head unless some row is flagged or wanted; 0: always run it
    FLAG_TILE: tl.constexpr,
    SPLIT_TILE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_INPUTS: tl.constexpr,
):
    pid_s, pid_n = program_tile(tl.program_id(0), num_row_blocks, num_splits, group_splits)
    rows = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < B
    active = B > 0
    if skip_idle != 0:
        active = any_row_active(is_step_ptr, want_ptr, B, FLAG_TILE)
    if active:
        col_begin, col_end = split_columns(pid_n.to(tl.int64), num_splits, num_granules, granule)
        partial = head_partial_logit(
            hidden_ptr, rows * stride_h, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin,
            tl.minimum(col_end, F), H, BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
        )  # fmt: skip
        logit, row_block_done = complete_row_block(
            partial, partial_ptr, ticket_ptr, b2_ptr, pid_s, pid_n, rows, row_mask, B, num_splits, SPLIT_TILE, BLOCK_S
        )
        if row_block_done:  # (complete_row_block has reset the ticket for the next launch on this stream)
            flagged = tl.load(is_step_ptr + rows, mask=row_mask, other=0) != 0
            sum_log = tl.load(sum_log_ptr + rows, mask=row_mask, other=0.0)
            count = tl.load(count_ptr + rows, mask=row_mask, other=0)
            new_sum = tl.where(flagged, sum_log + clamped_log_sigmoid(logit), sum_log)
            tl.store(sum_log_ptr + rows, new_sum, mask=row_mask)
            tl.store(count_ptr + rows, tl.where(flagged, count + 1, count), mask=row_mask)
            tl.store(step_prob_ptr + rows, stable_sigmoid(logit), mask=row_mask)
    elif pid_n == 0:  # idle step: nothing to add; say so in step_prob
        tl.store(step_prob_ptr + rows, tl.full([BLOCK_S], float("nan"), tl.float32), mask=row_mask)


def prepare_step_scorer(hidden, is_step, want, w1, b1, w2, b2, partial, ticket, sum_log, count, step_prob, config):
    """(grid, args, meta) for one launch; the buffers belong to the StepScorer and never move. `want` None: every
    row's probability is wanted, so the head always runs (no idle check)."""
    batch, hidden_size = hidden.shape
    row_blocks = triton.cdiv(batch, config.block_s)
    grid = (config.num_splits * row_blocks,)
    args = (
        hidden, hidden.stride(0), is_step, is_step if want is None else want,
        w1, w1.stride(0), b1, w2, b2,
        partial, ticket, sum_log, count, step_prob,
        batch, hidden_size, w1.shape[0],
        row_blocks, config.num_splits, num_granules(config, batch, w1.shape[0]), config.granule, config.group_splits,
        config.bucket, int(want is not None),
    )  # fmt: skip
    meta = dict(
        FLAG_TILE=FLAG_TILE,
        SPLIT_TILE=config.split_tile,
        BLOCK_S=config.block_s,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        UPCAST=interpreting(),
        FP32_INPUTS=hidden.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grid, args, meta


def launch_step_scorer(*buffers) -> None:
    grid, args, meta = prepare_step_scorer(*buffers)
    kernel, meta = maybe_autotuned(
        step_scorer_kernel, meta, reset_to_zero=("ticket_ptr",), restore_value=("sum_log_ptr", "count_ptr")
    )
    kernel[grid](*args, **meta)
