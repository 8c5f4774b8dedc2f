"""score[b] = exp(mean_{s in steps(b)} log max(sigmoid(w2 . relu(W1 h[idx[s]] + b1) + b2), 1e-10)), in one launch.

Shapes: hidden (N, H) or (B, T, H) with any row strides; step_index (S,); offsets (B+1,); W1 (F, H), F = 2H.
Grid (NUM_SPLITS, cdiv(S, BLOCK_S)): program (n, s) computes the partial logits of row block s over W1's column
split n; the [S, F] activations stay in registers. With several splits the partials go to a [NUM_SPLITS, S] fp32
workspace and the last program to arrive at row block s (an integer ticket per row block; no spin-wait) adds
them in a fixed order. That program writes the block's log p; the last row block to finish (a second ticket)
computes the per-candidate means and the per-group argmax, both vectorised over candidates. No float atomics:
the same bits on every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .head import (
    arrived_last,
    clamped_log_sigmoid,
    complete_row_block,
    gathered_row_offsets,
    head_partial_logit,
    stable_sigmoid,
)

NO_INDEX = tl.constexpr(2**31 - 1)  # "no member" sentinel: group sizes are int32


@triton.jit
def candidate_means(
    log_prob_ptr, offsets_ptr, log_score_ptr, score_ptr, num_steps_ptr, B, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr
):
    """Per-candidate mean of log p over its CSR range, BLOCK_B candidates at a time, [BLOCK_B, BLOCK_J] tiles."""
    for cand0 in range(0, B, BLOCK_B):
        cand = cand0 + tl.arange(0, BLOCK_B)
        cand_mask = cand < B
        lo = tl.load(offsets_ptr + cand, mask=cand_mask, other=0)
        count = tl.load(offsets_ptr + cand + 1, mask=cand_mask, other=0) - lo
        acc = tl.zeros([BLOCK_B, BLOCK_J], dtype=tl.float32)
        for j0 in range(0, tl.max(count, axis=0), BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            acc += tl.load(
                log_prob_ptr + lo[:, None] + j[None, :],
                mask=j[None, :] < count[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
        mean = tl.sum(acc, axis=1) / tl.maximum(count, 1).to(tl.float32)
        log_score = tl.where(count > 0, mean, float("-inf"))
        tl.store(log_score_ptr + cand, log_score, mask=cand_mask)
        tl.store(score_ptr + cand, tl.where(count > 0, tl.exp(log_score), 0.0), mask=cand_mask)
        tl.store(num_steps_ptr + cand, count, mask=cand_mask)


@triton.jit
def group_argmax(score_ptr, best_ptr, num_groups, group_size, BLOCK_G: tl.constexpr, GROUP_TILE: tl.constexpr):
    """best[g] = argmax of score within group g; lowest index on ties; NaN never wins; -1 if all are NaN."""
    for group0 in range(0, num_groups, BLOCK_G):
        group = group0 + tl.arange(0, BLOCK_G)
        group_mask = group < num_groups
        best_score = tl.full([BLOCK_G], -1.0, dtype=tl.float32)  # scores are >= 0: any real score beats it
        best_index = tl.full([BLOCK_G], -1, dtype=tl.int64)
        for member0 in range(0, group_size, GROUP_TILE):
            member = member0 + tl.arange(0, GROUP_TILE)
            present = group_mask[:, None] & (member[None, :] < group_size)
            value = tl.load(
                score_ptr + group[:, None].to(tl.int64) * group_size + member[None, :],
                mask=present,
                other=float("nan"),
                cache_modifier=".cg",
            )
            real = present & (value == value)
            value = tl.where(real, value, -1.0)
            tile_best = tl.max(value, axis=1)
            tile_index = tl.min(tl.where(real & (value == tile_best[:, None]), member[None, :], NO_INDEX), axis=1)
            better = (tile_index != NO_INDEX) & (tile_best > best_score)  # strict: earlier tiles keep ties
            best_score = tl.where(better, tile_best, best_score)
            best_index = tl.where(better, tile_index, best_index)
        tl.store(best_ptr + group, best_index, mask=group_mask)


@triton.jit
def sprm_score_kernel(
    hidden_ptr,
    stride_hb,  # stride between sequences ((B, T, H) layout); 0 for (N, H)
    stride_ht,  # stride between rows of one sequence
    seq_len,  # T: flat row r is (r // T, r % T)
    step_index_ptr,
    offsets_ptr,
    w1_ptr,
    stride_w1,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    partial_ptr,  # [NUM_SPLITS, S] fp32 workspace (unused with one split)
    log_prob_ptr,  # [S] fp32 workspace: clamped log p of every step
    ticket_ptr,  # int32 [row blocks + 1], zero on entry: one ticket per row block, then one for the whole grid
    step_scores_ptr,
    log_score_ptr,
    score_ptr,
    num_steps_ptr,
    best_ptr,
    S,
    H,
    F,
    B,
    group_size,
    num_groups,
    cols_per_split,
    NUM_SPLITS: tl.constexpr,
    SPLIT_TILE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_TILE: tl.constexpr,
    WRITE_STEP_SCORES: tl.constexpr,
    COMPUTE_BEST: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_INPUTS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_row_blocks = tl.num_programs(1)

    # Phase 1: partial logits of BLOCK_S gathered rows over one split of W1's columns.
    rows = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    row_offset = gathered_row_offsets(step_index_ptr, rows, row_mask, seq_len, stride_hb, stride_ht)
    col_begin = pid_n * cols_per_split
    partial = head_partial_logit(
        hidden_ptr, row_offset, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin,
        tl.minimum(col_begin + cols_per_split, F), H, BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
    )  # fmt: skip

    # Phase 2: the program that completes row block s turns its logits into log p.
    logit, row_block_done = complete_row_block(
        partial, partial_ptr, ticket_ptr, b2_ptr, rows, row_mask, S, NUM_SPLITS, SPLIT_TILE, BLOCK_S
    )
    if row_block_done:
        if WRITE_STEP_SCORES:
            tl.store(step_scores_ptr + rows, stable_sigmoid(logit), mask=row_mask)
        tl.store(log_prob_ptr + rows, clamped_log_sigmoid(logit), mask=row_mask)

        # Phase 3: the last row block to finish reduces per candidate and per group.
        if arrived_last(ticket_ptr + num_row_blocks, num_row_blocks):
            candidate_means(log_prob_ptr, offsets_ptr, log_score_ptr, score_ptr, num_steps_ptr, B, BLOCK_B, BLOCK_J)
            if COMPUTE_BEST:
                tl.debug_barrier()  # the scores just stored by other threads of this program
                group_argmax(score_ptr, best_ptr, num_groups, group_size, BLOCK_G, GROUP_TILE)


@dataclass(frozen=True)
class ScoreConfig:
    block_s: int
    block_n: int
    block_k: int
    num_splits: int
    cols_per_split: int
    num_warps: int
    num_stages: int
    block_b: int = 16  # candidates per tile of the final means
    block_j: int = 128  # steps per tile of the final means


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None elsewhere (the interpreter's tiles are used)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def pick_score_config(num_rows: int, hidden_size: int, width: int, dtype: torch.dtype, num_sms: int | None):
    """Tiles by shape: small S (decode) spreads W1 over many column splits; large S is a plain row-tiled GEMM.

    `num_sms` is the GPU's SM count, or None for the interpreter, which gets small tiles (its numpy work per
    program stays small) and a target of 4 programs so that the multi-split path is exercised on CPU too.
    """
    block_k = 32 if dtype == torch.float32 else 64
    if num_rows <= 16:
        block_s, block_n, warps, stages = 16, 32, 4, 4
    elif num_rows <= 64:  # fp32 operands take twice the registers: a narrower tile avoids spills on sm_80
        block_s, block_n, warps, stages = 64, 64 if dtype != torch.float32 else 32, 4, 3
    else:
        block_s, block_n, warps, stages = 128, 128 if dtype != torch.float32 else 64, 8, 3
    if num_sms is None:
        block_s, block_n, block_k = min(block_s, 16), min(block_n, 32), min(block_k, 32)
    target_programs = 4 if num_sms is None else 2 * num_sms  # about two waves: W1's stream spread over all SMs
    row_blocks = triton.cdiv(max(num_rows, 1), block_s)
    col_tiles = triton.cdiv(width, block_n)
    splits = max(1, min(col_tiles, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)
    return ScoreConfig(block_s, block_n, block_k, splits, tiles_per_split * block_n, warps, stages)


def hidden_row_strides(hidden: torch.Tensor) -> tuple[int, int, int]:
    """(stride between sequences, stride between rows, rows per sequence) of a (N, H) or (B, T, H) tensor."""
    if hidden.dim() == 2:
        return 0, hidden.stride(0), max(hidden.shape[0], 1)
    return hidden.stride(0), hidden.stride(1), max(hidden.shape[1], 1)


def prepare_sprm_score(
    hidden, step_index, offsets, w1, b1, w2, b2, *, group_size, return_step_scores, config: ScoreConfig | None = None
):
    """Allocates outputs and workspace; returns (outputs, grid, args, meta) for one launch of the kernel."""
    device = hidden.device
    num_rows, hidden_size, width = step_index.numel(), hidden.shape[-1], w1.shape[0]
    num_candidates = offsets.numel() - 1
    cfg = config or pick_score_config(num_rows, hidden_size, width, hidden.dtype, device_sm_count(device))
    score = torch.empty(num_candidates, dtype=torch.float32, device=device)
    log_score = torch.empty_like(score)
    num_steps = torch.empty(num_candidates, dtype=torch.int64, device=device)
    step_scores = torch.empty(num_rows, dtype=torch.float32, device=device) if return_step_scores else None
    num_groups = num_candidates // group_size if group_size else 0
    best = torch.empty(num_groups, dtype=torch.int64, device=device) if group_size else None
    row_blocks = triton.cdiv(max(num_rows, 1), cfg.block_s)
    partial = torch.empty(cfg.num_splits * num_rows if cfg.num_splits > 1 else 1, dtype=torch.float32, device=device)
    log_prob = torch.empty(max(num_rows, 1), dtype=torch.float32, device=device)
    tickets = torch.zeros(row_blocks + 1, dtype=torch.int32, device=device)
    stride_hb, stride_ht, seq_len = hidden_row_strides(hidden)
    group_tile = min(triton.next_power_of_2(group_size or 1), 256)
    args = (
        hidden, stride_hb, stride_ht, seq_len,
        step_index, offsets,
        w1, w1.stride(0), b1, w2, b2,
        partial, log_prob, tickets,
        step_scores if step_scores is not None else log_prob,  # never written when not asked for
        log_score, score, num_steps,
        best if best is not None else num_steps,  # never written when not asked for
        num_rows, hidden_size, width, num_candidates, group_size or 1, num_groups, cfg.cols_per_split,
    )  # fmt: skip
    meta = dict(
        NUM_SPLITS=cfg.num_splits,
        SPLIT_TILE=min(triton.next_power_of_2(cfg.num_splits), max(1, 4096 // cfg.block_s)),
        BLOCK_S=cfg.block_s,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_B=cfg.block_b,
        BLOCK_J=cfg.block_j,
        BLOCK_G=max(1, 1024 // group_tile),
        GROUP_TILE=group_tile,
        WRITE_STEP_SCORES=return_step_scores,
        COMPUTE_BEST=group_size is not None,
        UPCAST=interpreting(),
        FP32_INPUTS=hidden.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return (score, log_score, num_steps, step_scores, best), grid_of(cfg, num_rows), args, meta


def grid_of(cfg: ScoreConfig, num_rows: int) -> tuple[int, int]:
    """(column splits, row blocks); one (all-masked) row block when there are no rows, so outputs are written."""
    return cfg.num_splits, triton.cdiv(max(num_rows, 1), cfg.block_s)


def launch_sprm_score(hidden, step_index, offsets, w1, b1, w2, b2, **options):
    """One launch of the fused kernel. Arguments are validated by the caller (ops.sprm_score)."""
    outputs, grid, args, meta = prepare_sprm_score(hidden, step_index, offsets, w1, b1, w2, b2, **options)
    sprm_score_kernel[grid](*args, **meta)
    return outputs
