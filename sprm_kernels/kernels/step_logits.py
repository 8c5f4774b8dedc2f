"""logit[s] = w2 . relu(W1 h[idx[s]] + b1) + b2 for every gathered step row: the forward of `sprm_step_logits`.

Shapes: hidden (N, H) or (B, T, H) with any row strides; step_index (S,); W1 (F, H), F = 2H; logits (S,) fp32.
Grid (NUM_SPLITS, cdiv(S, BLOCK_S)) as in sprm_score: program (n, s) computes the partial logits of row block s
over W1's column split n; the [S, F] activations stay in registers. With one split a program writes its logits
directly. With several, the partials go to a [NUM_SPLITS, S] workspace, and the last program to arrive at row
block s (one integer ticket per row block, so no spin-wait) adds them in split order: the same bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .head import complete_row_block, gathered_row_offsets, head_partial_logit
from .sprm_score import ScoreConfig, device_sm_count, hidden_row_strides, interpreting, pick_score_config


@triton.jit
def step_logits_kernel(
    hidden_ptr,
    stride_hb,  # stride between sequences ((B, T, H) layout); 0 for (N, H)
    stride_ht,  # stride between rows of one sequence
    seq_len,  # T: flat row r is (r // T, r % T)
    step_index_ptr,
    w1_ptr,
    stride_w1,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    partial_ptr,  # [NUM_SPLITS, S] fp32 workspace (unused with one split)
    ticket_ptr,  # [cdiv(S, BLOCK_S)] int32 counters, zero on entry (unused with one split)
    logits_ptr,  # [S] fp32 output
    S,
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
    row_mask = rows < S
    row_offset = gathered_row_offsets(step_index_ptr, rows, row_mask, seq_len, stride_hb, stride_ht)
    col_begin = pid_n * cols_per_split
    partial = head_partial_logit(
        hidden_ptr, row_offset, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin,
        tl.minimum(col_begin + cols_per_split, F), H, BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
    )  # fmt: skip
    logit, row_block_done = complete_row_block(
        partial, partial_ptr, ticket_ptr, b2_ptr, rows, row_mask, S, NUM_SPLITS, SPLIT_TILE, BLOCK_S
    )
    if row_block_done:
        tl.store(logits_ptr + rows, logit, mask=row_mask)


def prepare_step_logits(hidden, step_index, w1, b1, w2, b2, *, config: ScoreConfig | None = None):
    """Allocates the output and workspace; returns (logits, grid, args, meta) for one launch of the kernel."""
    device = hidden.device
    num_rows, hidden_size, width = step_index.numel(), hidden.shape[-1], w1.shape[0]
    cfg = config or pick_score_config(num_rows, hidden_size, width, hidden.dtype, device_sm_count(device))
    logits = torch.empty(num_rows, dtype=torch.float32, device=device)
    row_blocks = triton.cdiv(max(num_rows, 1), cfg.block_s)
    if cfg.num_splits > 1:
        partial = torch.empty(cfg.num_splits * num_rows, dtype=torch.float32, device=device)
        tickets = torch.zeros(row_blocks, dtype=torch.int32, device=device)
    else:  # never touched: NUM_SPLITS == 1 writes the logits directly
        partial, tickets = logits, torch.empty(1, dtype=torch.int32, device=device)
    stride_hb, stride_ht, seq_len = hidden_row_strides(hidden)
    grid = (cfg.num_splits, row_blocks)
    args = (
        hidden, stride_hb, stride_ht, seq_len,
        step_index,
        w1, w1.stride(0), b1, w2, b2,
        partial, tickets, logits,
        num_rows, hidden_size, width, cfg.cols_per_split,
    )  # fmt: skip
    meta = dict(
        NUM_SPLITS=cfg.num_splits,
        SPLIT_TILE=min(triton.next_power_of_2(cfg.num_splits), max(1, 4096 // cfg.block_s)),
        BLOCK_S=cfg.block_s,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        UPCAST=interpreting(),
        FP32_INPUTS=hidden.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return logits, grid, args, meta


def launch_step_logits(hidden, step_index, w1, b1, w2, b2, *, config: ScoreConfig | None = None) -> torch.Tensor:
    """One launch (none for S == 0). Arguments are validated by the caller (grad.sprm_step_logits)."""
    logits, grid, args, meta = prepare_step_logits(hidden, step_index, w1, b1, w2, b2, config=config)
    if logits.numel():
        step_logits_kernel[grid](*args, **meta)
    return logits
