"""score[b] = exp(mean_{s in steps(b)} log max(sigmoid(w2 . relu(W1 h[idx[s]] + b1) + b2), 1e-10)), in one launch.

Shapes: hidden (N, H) or (B, T, H) with any row strides; step_index (S,); offsets (B+1,); W1 (F, H), F = 2H.
A 1-D grid of cdiv(S, BLOCK_S) * num_splits programs; `program_tile` (schedule.py) maps program p to a row block
s and a column split n in grouped order (L2 reuse of X and W1), and `split_columns` gives split n's range of W1
columns. Program (s, n) computes the partial logits of row block s over split n; the [S, F] activations stay in
registers. The partials go to a [num_splits, S] fp32 workspace and the last program to arrive at row block s (an
integer ticket per row block; no spin-wait) adds them in split order. That program writes the block's log p; the
last row block to finish (a second ticket) computes the per-candidate means and the per-group argmax, both
vectorised over candidates. No float atomics: the same bits on every run. Everything that depends on S, B, T or
the split count is a runtime integer that the JIT does not specialise on (`do_not_specialize`), and the tiles
come from four buckets of S (`pick_score_config`), so a server compiles at most four variants per head shape.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .autotune import maybe_autotuned
from .head import (
    arrived_last,
    clamped_log_sigmoid,
    complete_row_block,
    gathered_row_offsets,
    head_partial_logit,
    program_tile,
    split_columns,
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


# Runtime integers that vary with S, B, T or the split count: never specialised (no recompiles as they change).
SCORE_RUNTIME_INTS = (
    "seq_len", "S", "B", "group_size", "num_groups",
    "num_row_blocks", "num_splits", "num_granules", "granule", "group_splits", "tune_key",
)  # fmt: skip


@triton.jit(do_not_specialize=SCORE_RUNTIME_INTS)
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
    partial_ptr,  # [num_splits, S] fp32 workspace
    log_prob_ptr,  # [S] fp32 workspace: clamped log p of every step
    ticket_ptr,  # int32 [row blocks + 1], zero on entry and reset to zero on exit: one per row block, one for the grid
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
    num_row_blocks,
    num_splits,
    num_granules,  # W1's columns in granules of `granule` (schedule.split_columns); 0 skips the head (S = 0)
    granule,
    group_splits,  # column splits per group of the grouped order (schedule.program_tile)
    tune_key,  # the S bucket: only SPRM_AUTOTUNE=1 reads it (its cache key)
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
    pid_s, pid_n = program_tile(tl.program_id(0), num_row_blocks, num_splits, group_splits)

    # Phase 1: partial logits of BLOCK_S gathered rows over one split of W1's columns.
    rows = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    row_offset = gathered_row_offsets(step_index_ptr, rows, row_mask, seq_len, stride_hb, stride_ht, True)
    col_begin, col_end = split_columns(pid_n.to(tl.int64), num_splits, num_granules, granule)
    partial = head_partial_logit(
        hidden_ptr, row_offset, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin,
        tl.minimum(col_end, F), H, BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
    )  # fmt: skip

    # Phase 2: the program that completes row block s turns its logits into log p.
    logit, row_block_done = complete_row_block(
        partial, partial_ptr, ticket_ptr, b2_ptr, pid_s, pid_n, rows, row_mask, S, num_splits, SPLIT_TILE, BLOCK_S
    )
    if row_block_done:
        if WRITE_STEP_SCORES:
            tl.store(step_scores_ptr + rows, stable_sigmoid(logit), mask=row_mask)
        tl.store(log_prob_ptr + rows, clamped_log_sigmoid(logit), mask=row_mask)

        # Phase 3: the last row block to finish reduces per candidate and per group.
        if arrived_last(ticket_ptr + num_row_blocks, num_row_blocks):
            tl.atomic_xchg(ticket_ptr + num_row_blocks, 0)  # every row block has arrived: ready for the next launch
            candidate_means(log_prob_ptr, offsets_ptr, log_score_ptr, score_ptr, num_steps_ptr, B, BLOCK_B, BLOCK_J)
            if COMPUTE_BEST:
                tl.debug_barrier()  # the scores just stored by other threads of this program
                group_argmax(score_ptr, best_ptr, num_groups, group_size, BLOCK_G, GROUP_TILE)


@dataclass(frozen=True)
class ScoreConfig:
    """Tiles and schedule of one launch. The constexpr part (block sizes, warps, stages, split_tile) is fixed per
    S bucket; num_splits, granule and group_splits are runtime integers."""

    block_s: int
    block_n: int
    block_k: int
    num_splits: int  # column splits of W1 (schedule.split_columns)
    granule: int  # columns per granule of the split boundaries
    group_splits: int  # column splits per group of the grouped program order (schedule.program_tile)
    num_warps: int
    num_stages: int
    split_tile: int = 1  # splits summed per step of the ticket reduction
    bucket: int = 0  # which S bucket chose the tiles (ROW_BUCKETS)
    block_b: int = 16  # candidates per tile of the final means
    block_j: int = 128  # steps per tile of the final means


@dataclass(frozen=True)
class GpuInfo:
    """What the schedule needs to know about a GPU: SMs, L2 bytes, compute capability (e.g. 90)."""

    sms: int
    l2_bytes: int
    arch: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_gpu_info(device: torch.device) -> GpuInfo | None:
    """SM count, L2 size and arch of a CUDA device, read from the device; None elsewhere (interpreter tiles)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(props.multi_processor_count, props.L2_cache_size, 10 * props.major + props.minor)


def device_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None elsewhere."""
    info = device_gpu_info(device)
    return None if info is None else info.sms


# S buckets: S <= 16 and S <= 64 are decode-sized (one row block, W1 spread over one program per SM); above, a
# grouped GEMM over (row block, BLOCK_N tile). The bucket is the only thing about S that picks constexprs.
ROW_BUCKETS = (16, 64, 4096)
GRANULE = 8  # decode: split boundaries fall on multiples of 8 columns, so the splits stay within 8 of each other
L2_GROUP_FRACTION = 0.85  # share of L2 for a group's W1 columns plus the row blocks of X that run at once
# (BLOCK_S, BLOCK_N, BLOCK_K, num_warps, num_stages) per bucket, 16-bit and fp32 operands (fp32 operands take twice
# the registers and shared memory per element; their dot is IEEE fp32 on the FMA units, whose operands sit in
# registers: BLOCK_K = 16 keeps them under 128 registers per thread at 8 warps, where ptxas caps them on sm_90).
# The smallest bucket takes 8 warps: at 4 warps triton 3.6.0 compiled sprm_score there at 168 registers with 16
# bytes of spills (sm_80 and sm_90; newer tritons did not spill); 8 warps halve each thread's share of the
# [16, 128] tile and of the loads in flight (same tiles, stages and bytes in flight; 0 spills on both tritons).
# The GEMM buckets likewise: triton 3.6.0 put (64, 128, 64, 4 warps, 3) and (128, 128, 64, 8, 3) on sm_80 at the
# 255-register cap; 8 warps with BLOCK_K = 32 and 4 stages keep every head kernel (step_logits without an index,
# the vLLM head's launch, included: (64, 128, 64, 8, 3) spilled 36 bytes there with triton 3.9 on sm_80) at
# <= 225 registers and 0 spills on triton 3.6.0 and 3.9.0, sm_80 and sm_90 (python -m sprm_kernels.aot).
GPU_TILES = {
    (0, False): (16, 128, 128, 8, 4),
    (1, False): (64, 128, 128, 8, 3),
    (2, False): (64, 128, 32, 8, 4),
    (3, False): (128, 128, 32, 8, 4),
    (0, True): (16, 128, 16, 8, 4),
    (1, True): (64, 64, 16, 8, 3),
    (2, True): (64, 64, 16, 8, 3),
    (3, True): (64, 64, 16, 8, 3),
}
# Per-arch replacements. sm_90, large bucket: BLOCK_K = 64 with 3 stages (96 KiB of shared memory) halves the K steps
# of a 128 x 128 tile, and with them the per-step pipeline overhead that the performance model charges (modeled
# 6.27 -> 5.46 ms at S = 32768, H = 5120 on H100, same DRAM bytes; docs/performance.md): 223-225 registers on
# triton 3.9.0 and 195-206 on 3.6.0, 0 spills (sprm_score, step_logits with and without an index). On sm_80 the
# same tile sat at the 255-register cap on triton 3.6.0 (mma.sync holds the operand fragments in registers).
# 128 x 256 tiles fit on triton 3.6.0 (203-205 registers) but take 254-255 on 3.9.0, over the 240 bound.
# sm_90, medium bucket: the same K step for the 64 x 128 tile (72 KiB of shared memory; modeled 124 -> 98 us at
# S = 512, H = 5120 on H100): 119-120 registers on 3.9.0, so two CTAs per SM as before; on 3.6.0 sprm_score takes
# 115 (two per SM) and step_logits 133-139 (one per SM: its prologue and epilogue are then exposed, modeled 5%
# slower than before at H = 1536, 9-13% faster at H = 3584 and 5120).
ARCH_TILES = {
    (90, 2, False): (64, 128, 64, 8, 3),
    (90, 3, False): (128, 128, 64, 8, 3),
}
INTERPRETER_TILES = (16, 16, 32, 4, 1)  # small numpy work per program
INTERPRETER_GROUP_SPLITS, INTERPRETER_PROGRAMS = 2, 4  # grouped order (partial groups) and split reduction on CPU


def gemm_splits(row_blocks: int, width: int, block_n: int, sms: int, bucket: int) -> tuple[int, int]:
    """(splits, granule) of a GEMM bucket: one BLOCK_N tile per split, except in the medium bucket when splits
    of at most BLOCK_N columns (granule 8) can make the CTA count an exact multiple of the SMs without adding a
    round of CTAs: then the last round is full (e.g. S = 512, H = 3584 on H100: 66 splits, 528 CTAs = 4 x 132,
    instead of 56 splits, 448 CTAs = 3.4 rounds). Masked columns cost compute, never DRAM bytes."""
    tiles = triton.cdiv(width, block_n)
    if bucket == 2:
        rounds = triton.cdiv(row_blocks * tiles, sms)
        step = sms // math.gcd(row_blocks, sms)
        splits = triton.cdiv(tiles, step) * step
        if row_blocks * splits <= rounds * sms and splits <= triton.cdiv(width, GRANULE):
            return splits, GRANULE
    return tiles, block_n


def gemm_group_splits(splits: int, block_s: int, block_n: int, row_bytes: int, gpu: GpuInfo) -> int:
    """Splits per group: the most whose W1 tiles (block_n rows of W1 each), plus the row blocks of X that one SM
    round touches (sms / group of them, plus 2 for the rounds that overlap), fit in L2_GROUP_FRACTION of L2;
    then evened out over the groups that makes (H100, H = 5120: at most 28, so 80 splits become 27 + 27 + 26)."""
    budget = L2_GROUP_FRACTION * gpu.l2_bytes
    best = 1
    for group in range(1, splits + 1):
        if group * block_n * row_bytes + (gpu.sms // group + 2) * block_s * row_bytes <= budget:
            best = group
    groups = triton.cdiv(splits, best)
    return triton.cdiv(splits, groups)


def gpu_tiles(bucket: int, fp32: bool, arch: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_S, BLOCK_N, BLOCK_K, num_warps, num_stages) of a bucket on a GPU arch: ARCH_TILES, else GPU_TILES."""
    return ARCH_TILES.get((arch, bucket, fp32), GPU_TILES[(bucket, fp32)])


def row_bucket(num_rows: int) -> int:
    """0, 1, 2 or 3: the bucket of S that picks the constexpr tiles (at most four compiled variants)."""
    return sum(num_rows > bound for bound in ROW_BUCKETS)


def pick_score_config(num_rows: int, hidden_size: int, width: int, dtype: torch.dtype, gpu: GpuInfo | None):
    """Tiles by S bucket, schedule by shape and GPU.

    Decode buckets (S <= 64: one row block) split W1's F columns over one program per SM (a multiple of the SM
    count), in splits that differ by at most one granule of 8 columns; each program streams its split once, all
    of it in one BLOCK_N tile when F / SMs <= BLOCK_N. GEMM buckets give each program one BLOCK_N tile of one row
    block and visit them in grouped order (schedule.program_tile): groups of `group_splits` tiles of W1 stay in
    L2 while all row blocks stream past, so W1 is read from DRAM once and X once per group. `gpu` None means the
    interpreter, which gets small tiles, about four programs and groups of two splits.
    """
    bucket = row_bucket(num_rows)
    fp32 = dtype == torch.float32
    if gpu is None:
        block_s, block_n, block_k, warps, stages = INTERPRETER_TILES
    else:
        block_s, block_n, block_k, warps, stages = gpu_tiles(bucket, fp32, gpu.arch)
    row_blocks = triton.cdiv(max(num_rows, 1), block_s)
    if num_rows == 0:  # nothing to score: one program, no columns (no W1 traffic), writes the empty results
        splits, granule, granules, group_splits = 1, block_n, 0, 1
    elif gpu is None:
        granule, group_splits = GRANULE, INTERPRETER_GROUP_SPLITS
        granules = triton.cdiv(width, granule)
        splits = max(1, min(granules, triton.cdiv(INTERPRETER_PROGRAMS, row_blocks)))
    elif bucket <= 1:
        granule, group_splits = GRANULE, 1
        granules = triton.cdiv(width, granule)
        splits = max(1, min(granules, gpu.sms // row_blocks))
    else:
        splits, granule = gemm_splits(row_blocks, width, block_n, gpu.sms, bucket)
        granules = triton.cdiv(width, granule)
        group_splits = gemm_group_splits(splits, block_s, block_n, hidden_size * dtype.itemsize, gpu)
    # The split reduction's tile: fixed per bucket (2048 partials per step), so it never adds a variant.
    split_tile = max(1, 2048 // block_s)
    return ScoreConfig(block_s, block_n, block_k, splits, granule, group_splits, warps, stages, split_tile, bucket)


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
    cfg = config or pick_score_config(num_rows, hidden_size, width, hidden.dtype, device_gpu_info(device))
    score = torch.empty(num_candidates, dtype=torch.float32, device=device)
    log_score = torch.empty_like(score)
    num_steps = torch.empty(num_candidates, dtype=torch.int64, device=device)
    step_scores = torch.empty(num_rows, dtype=torch.float32, device=device) if return_step_scores else None
    num_groups = num_candidates // group_size if group_size else 0
    best = torch.empty(num_groups, dtype=torch.int64, device=device) if group_size else None
    row_blocks = triton.cdiv(max(num_rows, 1), cfg.block_s)
    partial = torch.empty(max(cfg.num_splits * num_rows, 1), dtype=torch.float32, device=device)
    log_prob = torch.empty(max(num_rows, 1), dtype=torch.float32, device=device)
    tickets = zeroed_tickets(device, row_blocks + 1)
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
        num_rows, hidden_size, width, num_candidates, group_size or 1, num_groups,
        row_blocks, cfg.num_splits, num_granules(cfg, num_rows, width), cfg.granule, cfg.group_splits, cfg.bucket,
    )  # fmt: skip
    meta = dict(
        SPLIT_TILE=cfg.split_tile,
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


def num_granules(cfg: ScoreConfig, num_rows: int, width: int) -> int:
    """W1's columns in granules of cfg.granule; 0 when there are no rows (the programs then skip the head)."""
    return triton.cdiv(width, cfg.granule) if num_rows > 0 else 0


def grid_of(cfg: ScoreConfig, num_rows: int) -> tuple[int]:
    """One program per (row block, column split); one (all-masked) row block when there are no rows, so that the
    outputs are written."""
    return (cfg.num_splits * triton.cdiv(max(num_rows, 1), cfg.block_s),)


def launch_sprm_score(hidden, step_index, offsets, w1, b1, w2, b2, **options):
    """One launch of the fused kernel. Arguments are validated by the caller (ops.sprm_score)."""
    outputs, grid, args, meta = prepare_sprm_score(hidden, step_index, offsets, w1, b1, w2, b2, **options)
    kernel, meta = maybe_autotuned(sprm_score_kernel, meta, reset_to_zero=("ticket_ptr",))
    with tickets_dropped_on_error(hidden.device):
        kernel[grid](*args, **meta)
    return outputs


# Ticket counters shared by the launches of one (device, stream): zeroed once when allocated (or grown), and left
# at zero by every kernel that takes them (complete_row_block resets each row block's ticket after its last
# arrival, sprm_score its grid ticket), so a launch needs neither a torch.zeros allocation nor a memset. Launches
# on one stream run in order, so they never share a counter at the same time; another stream gets its own.
_TICKETS: dict = {}


def _ticket_key(device: torch.device):
    if device.type == "cuda":
        return device, torch.cuda.current_stream(device).cuda_stream
    return device, None


def zeroed_tickets(device: torch.device, count: int) -> torch.Tensor:
    """`count` int32 counters at zero for the current stream of `device`, from the cache (allocated only when a
    launch needs more than any launch before it: twice as many, at least 64)."""
    key = _ticket_key(device)
    buffer = _TICKETS.get(key)
    if buffer is None or buffer.numel() < count:
        size = max(count, 64, 2 * buffer.numel() if buffer is not None else 0)
        with torch.inference_mode(False):  # a normal tensor: one made under inference_mode (an HF engine's decode)
            buffer = _TICKETS[key] = torch.zeros(size, dtype=torch.int32, device=device)  # could not be reset outside
    return buffer[:count]


class tickets_dropped_on_error:
    """Around a launch: if it raises (a compile error, the interpreter failing part-way), the cached counters of
    the stream may no longer be zero, so they are dropped and the next launch starts from fresh zeros."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            _TICKETS.pop(_ticket_key(self.device), None)
        return False
