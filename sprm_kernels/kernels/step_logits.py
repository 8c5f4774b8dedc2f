"""logit[s] = w2 . relu(W1 h[idx[s]] + b1) + b2 for every gathered step row: the forward of `sprm_step_logits`.

Shapes: hidden (N, H) or (B, T, H) with any row strides; step_index (S,); W1 (F, H), F = 2H; logits (S,) fp32.
A 1-D grid of cdiv(S, BLOCK_S) * num_splits programs mapped to (row block s, column split n) by the grouped order
of schedule.program_tile, tiles and schedule as in sprm_score: program (s, n) computes the partial logits of row
block s over W1's column split n; the [S, F] activations stay in registers. The partials go to a [num_splits, S]
workspace, and the last program to arrive at row block s (one integer ticket per row block, so no spin-wait)
adds them in split order and writes the logits: the same bits on every run. It also resets the ticket, so the
counters can be reused. `step_index=None` scores hidden's own rows 0..N-1 (no index tensor, no gather read), and
a `StepLogitsBuffers` given to the launcher supplies the output and workspace, for a caller that runs the head on
every forward (the vLLM head): no allocation and no memset per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import maybe_autotuned
from .head import complete_row_block, gathered_row_offsets, head_partial_logit, program_tile, split_columns
from .sprm_score import (
    ScoreConfig,
    device_gpu_info,
    grid_of,
    hidden_row_strides,
    interpreting,
    num_granules,
    pick_score_config,
    tickets_dropped_on_error,
    zeroed_tickets,
)

LOGITS_RUNTIME_INTS = (
    "seq_len", "S", "num_row_blocks", "num_splits", "num_granules", "granule", "group_splits", "tune_key",
)  # fmt: skip


@triton.jit(do_not_specialize=LOGITS_RUNTIME_INTS)
def step_logits_kernel(
    hidden_ptr,
    stride_hb,  # stride between sequences ((B, T, H) layout); 0 for (N, H)
    stride_ht,  # stride between rows of one sequence
    seq_len,  # T: flat row r is (r // T, r % T)
    step_index_ptr,  # [S] int64 flat rows; unused (hidden's rows 0..S-1 of an (N, H) tensor) when not GATHER
    w1_ptr,
    stride_w1,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    partial_ptr,  # [num_splits, S] fp32 workspace
    ticket_ptr,  # [cdiv(S, BLOCK_S)] int32 counters, zero on entry and reset to zero on exit
    logits_ptr,  # [S] fp32 output
    S,
    H,
    F,
    num_row_blocks,
    num_splits,
    num_granules,
    granule,
    group_splits,
    tune_key,  # the S bucket: only SPRM_AUTOTUNE=1 reads it (its cache key)
    SPLIT_TILE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_INPUTS: tl.constexpr,
    GATHER: tl.constexpr,
):
    pid_s, pid_n = program_tile(tl.program_id(0), num_row_blocks, num_splits, group_splits)
    rows = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    row_offset = gathered_row_offsets(step_index_ptr, rows, row_mask, seq_len, stride_hb, stride_ht, GATHER)
    col_begin, col_end = split_columns(pid_n.to(tl.int64), num_splits, num_granules, granule)
    partial = head_partial_logit(
        hidden_ptr, row_offset, row_mask, w1_ptr, stride_w1, b1_ptr, w2_ptr, col_begin,
        tl.minimum(col_end, F), H, BLOCK_S, BLOCK_N, BLOCK_K, UPCAST, FP32_INPUTS,
    )  # fmt: skip
    logit, row_block_done = complete_row_block(
        partial, partial_ptr, ticket_ptr, b2_ptr, pid_s, pid_n, rows, row_mask, S, num_splits, SPLIT_TILE, BLOCK_S
    )
    if row_block_done:
        tl.store(logits_ptr + rows, logit, mask=row_mask)


class StepLogitsBuffers:
    """The output and workspace of `launch_step_logits` kept between calls: grown (never shrunk) when a call
    needs more, so a caller with a bounded number of rows allocates only on its first, largest calls. The
    tickets are zeroed when allocated and the kernel leaves them at zero. The logits returned by a launch are a
    view of `logits`: valid until the next launch with the same buffers. One instance per stream."""

    def __init__(self):
        self.logits = self.partial = self.tickets = None

    @staticmethod
    def _at_least(buffer, count, dtype, device, fill):
        if buffer is None or buffer.numel() < count or buffer.device != device:
            size = max(count, 2 * buffer.numel() if buffer is not None else 0)
            with torch.inference_mode(False):  # usable in and out of inference_mode, as the ticket cache
                buffer = (torch.zeros if fill else torch.empty)(size, dtype=dtype, device=device)
        return buffer

    def take(self, num_rows: int, num_partials: int, row_blocks: int, device) -> tuple:
        """(logits [num_rows], partial [num_partials], tickets [row_blocks]) views of the kept buffers."""
        self.logits = self._at_least(self.logits, num_rows, torch.float32, device, False)
        self.partial = self._at_least(self.partial, num_partials, torch.float32, device, False)
        self.tickets = self._at_least(self.tickets, row_blocks, torch.int32, device, True)
        return self.logits[:num_rows], self.partial[:num_partials], self.tickets[:row_blocks]


def prepare_step_logits(
    hidden, step_index, w1, b1, w2, b2, *, config: ScoreConfig | None = None, buffers: StepLogitsBuffers | None = None
):
    """(logits, grid, args, meta) for one launch of the kernel, the output and workspace from `buffers` if given,
    else new (tickets from the per-stream cache of sprm_score). step_index None: hidden is (N, H) and its rows
    0..N-1 are scored in order."""
    device = hidden.device
    gather = step_index is not None
    if not gather and hidden.dim() != 2:
        raise ValueError(f"hidden: expected (N, H) when step_index is None, got shape {tuple(hidden.shape)}")
    num_rows, hidden_size, width = (step_index.numel() if gather else hidden.shape[0]), hidden.shape[-1], w1.shape[0]
    cfg = config or pick_score_config(num_rows, hidden_size, width, hidden.dtype, device_gpu_info(device))
    row_blocks = triton.cdiv(max(num_rows, 1), cfg.block_s)
    num_partials = max(cfg.num_splits * num_rows, 1)
    if buffers is not None:
        logits, partial, tickets = buffers.take(num_rows, num_partials, row_blocks, device)
    else:
        logits = torch.empty(num_rows, dtype=torch.float32, device=device)
        partial = torch.empty(num_partials, dtype=torch.float32, device=device)
        tickets = zeroed_tickets(device, row_blocks)
    stride_hb, stride_ht, seq_len = hidden_row_strides(hidden)
    grid = grid_of(cfg, num_rows)
    args = (
        hidden, stride_hb, stride_ht, seq_len,
        step_index if gather else logits,  # never read without GATHER
        w1, w1.stride(0), b1, w2, b2,
        partial, tickets, logits,
        num_rows, hidden_size, width,
        row_blocks, cfg.num_splits, num_granules(cfg, num_rows, width), cfg.granule, cfg.group_splits, cfg.bucket,
    )  # fmt: skip
    meta = dict(
        SPLIT_TILE=cfg.split_tile,
        BLOCK_S=cfg.block_s,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        UPCAST=interpreting(),
        FP32_INPUTS=hidden.dtype == torch.float32,
        GATHER=gather,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return logits, grid, args, meta


def launch_step_logits(
    hidden, step_index, w1, b1, w2, b2, *, config: ScoreConfig | None = None, buffers: StepLogitsBuffers | None = None
) -> torch.Tensor:
    """One launch (none for S == 0). Arguments are validated by the caller (grad.sprm_step_logits; the vLLM head
    passes step_index=None and its own `buffers`): W1 in hidden's dtype, b1 [F], w2 [F], b2 [1] contiguous."""
    logits, grid, args, meta = prepare_step_logits(hidden, step_index, w1, b1, w2, b2, config=config, buffers=buffers)
    if logits.numel():
        kernel, meta = maybe_autotuned(step_logits_kernel, meta, reset_to_zero=("ticket_ptr",))
        if buffers is None:
            with tickets_dropped_on_error(hidden.device):
                kernel[grid](*args, **meta)
        else:
            try:
                kernel[grid](*args, **meta)
            except BaseException:
                buffers.tickets = None  # may no longer be zero: fresh ones next time
                raise
    return logits
