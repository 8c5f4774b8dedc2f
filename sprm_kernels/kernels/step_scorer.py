"""sum_log[b] += is_step[b] * log max(sigmoid(w2 . relu(W1 h[b] + b1) + b2), 1e-10); count[b] += is_step[b].

Shapes: hidden (B, H) with any row stride, is_step (B,) bool, running sum_log (B,) fp32 and count (B,) int64.
Fixed shapes and no host synchronisation, so a decode step that calls it can be captured in a CUDA graph.
Grid (NUM_SPLITS, cdiv(B, BLOCK_S)) as in sprm_score; the last program to arrive at a row block adds the
partials in a fixed order, updates that block's running sums and resets its ticket for the next call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .head import clamped_log_sigmoid, complete_row_block, head_partial_logit, stable_sigmoid
from .sprm_score import interpreting


@triton.jit
def step_scorer_kernel(
    hidden_ptr,
    stride_h,
    is_step_ptr,
    w1_ptr,
    stride_w1,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    partial_ptr,  # [NUM_SPLITS, B] fp32 workspace (unused with one split)
    ticket_ptr,  # int32 [row blocks]: zero on entry, reset to zero on exit
    sum_log_ptr,
    count_ptr,
    step_prob_ptr,  # [B] fp32: this call's step probability of every row (flagged or not)
    B,
    H,
    F,
    cols_per_split,
    NUM_SPLITS: tl.constexpr,
    SPLIT_TILE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_INPUTS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < B
    col_begin = pid_n * cols_per_split
    partial = head_partial_logit(
        hidden_ptr, rows * stride_h, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin,
        tl.minimum(col_begin + cols_per_split, F), H, BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
    )  # fmt: skip
    logit, row_block_done = complete_row_block(
        partial, partial_ptr, ticket_ptr, b2_ptr, rows, row_mask, B, NUM_SPLITS, SPLIT_TILE, BLOCK_S
    )
    if row_block_done:
        if NUM_SPLITS > 1:
            tl.atomic_xchg(ticket_ptr + pid_s, 0)  # ready for the next launch on this stream
        flagged = tl.load(is_step_ptr + rows, mask=row_mask, other=0) != 0
        sum_log = tl.load(sum_log_ptr + rows, mask=row_mask, other=0.0)
        count = tl.load(count_ptr + rows, mask=row_mask, other=0)
        tl.store(sum_log_ptr + rows, tl.where(flagged, sum_log + clamped_log_sigmoid(logit), sum_log), mask=row_mask)
        tl.store(count_ptr + rows, tl.where(flagged, count + 1, count), mask=row_mask)
        tl.store(step_prob_ptr + rows, stable_sigmoid(logit), mask=row_mask)


def prepare_step_scorer(hidden, is_step, w1, b1, w2, b2, partial, ticket, sum_log, count, step_prob, config):
    """(grid, args, meta) for one launch; the buffers belong to the StepScorer and never move."""
    batch, hidden_size = hidden.shape
    grid = (config.num_splits, triton.cdiv(batch, config.block_s))
    args = (
        hidden, hidden.stride(0), is_step,
        w1, w1.stride(0), b1, w2, b2,
        partial, ticket, sum_log, count, step_prob,
        batch, hidden_size, w1.shape[0], config.cols_per_split,
    )  # fmt: skip
    meta = dict(
        NUM_SPLITS=config.num_splits,
        SPLIT_TILE=min(triton.next_power_of_2(config.num_splits), max(1, 4096 // config.block_s)),
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
    step_scorer_kernel[grid](*args, **meta)
