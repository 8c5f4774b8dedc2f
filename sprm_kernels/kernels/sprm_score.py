"""score[b] = exp(mean_{s in steps(b)} log max(sigmoid(w2 . relu(W1 h[idx[s]] + b1) + b2), 1e-10)), in one launch.

Shapes: hidden (N, H) or (B, T, H) with any row strides; step_index (S,); offsets (B+1,); W1 (F, H), F = 2H.
Grid (NUM_SPLITS, cdiv(S, BLOCK_S)): program (n, s) computes the partial logits of rows block s over W1's
column split n and writes them to a [NUM_SPLITS, S] fp32 workspace; the [S, F] activations stay in registers.
The last program to arrive (an integer ticket counter, so no spin-wait) sums the partials in a fixed order,
takes the log-sigmoid, the per-candidate means and the per-group argmax: the same bits on every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .head import clamped_log_sigmoid, head_partial_logit, stable_sigmoid


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
    partial_ptr,  # [NUM_SPLITS, S] fp32 workspace
    ticket_ptr,  # int32 counter, zero on entry
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
    cols_per_split,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    WRITE_STEP_SCORES: tl.constexpr,
    COMPUTE_BEST: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_INPUTS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)

    # Phase 1: partial logits of BLOCK_S gathered rows over one split of W1's columns.
    rows = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    flat_row = tl.load(step_index_ptr + rows, mask=row_mask, other=0)
    row_offset = (flat_row // seq_len) * stride_hb + (flat_row % seq_len) * stride_ht
    col_begin = pid_n * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, F)
    partial = head_partial_logit(
        hidden_ptr, row_offset, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin, col_end, H,
        BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
    )  # fmt: skip
    tl.store(partial_ptr + pid_n.to(tl.int64) * S + rows, partial, mask=row_mask)

    # Every thread's stores are ordered before the ticket (acq_rel), so the last program sees all partials.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        # Phase 2: logits in a fixed split order, log-sigmoid; log p goes back into split 0 of the workspace.
        b2 = tl.load(b2_ptr).to(tl.float32)
        for r0 in range(0, S, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            r_mask = r < S
            logit = tl.zeros([BLOCK_R], dtype=tl.float32)
            split_ptr = partial_ptr + r  # pointer steps are 64-bit: no int32 product split * S
            for _ in range(NUM_SPLITS):
                logit += tl.load(split_ptr, mask=r_mask, other=0.0, cache_modifier=".cg")
                split_ptr += S
            logit += b2
            if WRITE_STEP_SCORES:
                tl.store(step_scores_ptr + r, stable_sigmoid(logit), mask=r_mask)
            tl.store(partial_ptr + r, clamped_log_sigmoid(logit), mask=r_mask)
        tl.debug_barrier()

        # Phase 3: per-candidate mean in CSR order, and the running argmax of each group of candidates.
        best_score = -1.0  # scores are >= 0, so any real score beats it; NaN never does
        best_index = tl.full([], -1, tl.int64)
        for b in range(0, B):
            lo = tl.load(offsets_ptr + b)
            hi = tl.load(offsets_ptr + b + 1)
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for row0 in range(lo, hi, BLOCK_R):
                row = row0 + tl.arange(0, BLOCK_R)
                acc += tl.load(partial_ptr + row, mask=row < hi, other=0.0, cache_modifier=".cg")
            count = hi - lo
            mean = tl.sum(acc, axis=0) / tl.maximum(count, 1).to(tl.float32)
            log_score = tl.where(count > 0, mean, float("-inf"))
            score = tl.where(count > 0, tl.exp(log_score), 0.0)
            tl.store(log_score_ptr + b, log_score)
            tl.store(score_ptr + b, score)
            tl.store(num_steps_ptr + b, count)
            if COMPUTE_BEST:
                member = b % group_size
                best_score = tl.where(member == 0, -1.0, best_score)
                best_index = tl.where(member == 0, -1, best_index)
                better = score > best_score  # strict: the lowest index keeps a tie; False for NaN
                best_score = tl.where(better, score, best_score)
                best_index = tl.where(better, member, best_index)
                if member == group_size - 1:
                    tl.store(best_ptr + b // group_size, best_index)


@dataclass(frozen=True)
class ScoreConfig:
    block_s: int
    block_n: int
    block_k: int
    num_splits: int
    cols_per_split: int
    num_warps: int
    num_stages: int
    block_r: int = 256


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
    best = torch.empty(num_candidates // group_size, dtype=torch.int64, device=device) if group_size else None
    partial = torch.empty(cfg.num_splits * max(num_rows, 1), dtype=torch.float32, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    stride_hb, stride_ht, seq_len = hidden_row_strides(hidden)
    grid = (cfg.num_splits, triton.cdiv(max(num_rows, 1), cfg.block_s))
    args = (
        hidden, stride_hb, stride_ht, seq_len,
        step_index, offsets,
        w1, w1.stride(0), b1, w2, b2,
        partial, ticket,
        step_scores if step_scores is not None else score,  # never written when not asked for
        log_score, score, num_steps,
        best if best is not None else num_steps,  # never written when not asked for
        num_rows, hidden_size, width, num_candidates, group_size or 1, cfg.cols_per_split,
    )  # fmt: skip
    meta = dict(
        NUM_SPLITS=cfg.num_splits,
        BLOCK_S=cfg.block_s,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=cfg.block_r,
        WRITE_STEP_SCORES=return_step_scores,
        COMPUTE_BEST=group_size is not None,
        UPCAST=interpreting(),
        FP32_INPUTS=hidden.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return (score, log_score, num_steps, step_scores, best), grid, args, meta


def launch_sprm_score(hidden, step_index, offsets, w1, b1, w2, b2, **options):
    """One launch of the fused kernel. Arguments are validated by the caller (ops.sprm_score)."""
    outputs, grid, args, meta = prepare_sprm_score(hidden, step_index, offsets, w1, b1, w2, b2, **options)
    sprm_score_kernel[grid](*args, **meta)
    return outputs
