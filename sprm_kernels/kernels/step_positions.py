"""scored(t) = step(x[t+1]) & !step(x[t]) & x[t] != <think> & start < t < end  (docs/method.md §3), as CSR rows.

Shapes: input_ids (B, T) with an optional attention_mask (B, T), or packed (N,) with cu_seqlens (B+1,).
One program per candidate. `step_positions_count_kernel` finds the marker bounds and counts the scored
positions; after an exclusive scan of the counts (and one host read of S to size the output),
`step_positions_write_kernel` writes each candidate's flat row indices into its CSR slot.
Step tokens are looked up in a byte table indexed by token id, so the Chinese rule's hundreds of ids cost
no more than the English single id.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BIG = tl.constexpr(2**62)


@triton.jit
def _row_extent(cu_seqlens_ptr, pid, seq_len, PACKED: tl.constexpr):
    """(flat start, length) of candidate `pid`."""
    if PACKED:
        start = tl.load(cu_seqlens_ptr + pid)
        length = tl.load(cu_seqlens_ptr + pid + 1) - start
    else:
        start = pid.to(tl.int64) * seq_len
        length = seq_len + 0 * start
    return start, length


@triton.jit
def _is_real(mask_ptr, flat, in_row, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return in_row & (tl.load(mask_ptr + flat, mask=in_row, other=0) != 0)
    return in_row


@triton.jit
def _is_step(table_ptr, table_size, token, valid):
    in_table = valid & (token >= 0) & (token < table_size)
    return tl.load(table_ptr + token, mask=in_table, other=0) != 0


@triton.jit
def _scored_chunk(
    ids_ptr, mask_ptr, table_ptr, table_size, start, length, t, think_start_id, lower, upper, HAS_MASK: tl.constexpr
):
    """Which positions t of one chunk are scored, given the bounds lower < t < upper."""
    in_row = t < length
    next_in_row = (t + 1) < length
    token = tl.load(ids_ptr + start + t, mask=in_row, other=-1)
    next_token = tl.load(ids_ptr + start + t + 1, mask=next_in_row, other=-1)
    real = _is_real(mask_ptr, start + t, in_row, HAS_MASK)
    next_real = _is_real(mask_ptr, start + t + 1, next_in_row, HAS_MASK)
    return (
        real
        & next_real
        & _is_step(table_ptr, table_size, next_token, next_real)
        & ~_is_step(table_ptr, table_size, token, real)
        & (token != think_start_id)
        & (t > lower)
        & (t < upper)
    )


@triton.jit
def step_positions_count_kernel(
    ids_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    table_ptr,
    table_size,
    seq_len,
    think_start_id,
    think_end_id,
    bounds_ptr,  # [B, 2] int64: (start, end) of the scored span
    counts_ptr,  # [B] int64
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    start, length = _row_extent(cu_seqlens_ptr, pid, seq_len, PACKED)
    zeros = tl.zeros([BLOCK_T], dtype=tl.int64)
    n_open = zeros
    n_close = zeros
    first_open = zeros + BIG
    first_close = zeros + BIG
    first_real = zeros + BIG
    last_real = zeros - 1
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        in_row = t < length
        token = tl.load(ids_ptr + start + t, mask=in_row, other=-1)
        real = _is_real(mask_ptr, start + t, in_row, HAS_MASK)
        is_open = real & (token == think_start_id)
        is_close = real & (token == think_end_id)
        n_open += is_open.to(tl.int64)
        n_close += is_close.to(tl.int64)
        first_open = tl.minimum(first_open, tl.where(is_open, t, BIG))
        first_close = tl.minimum(first_close, tl.where(is_close, t, BIG))
        first_real = tl.minimum(first_real, tl.where(real, t, BIG))
        last_real = tl.maximum(last_real, tl.where(real, t, -1))
    any_real = tl.max(last_real, axis=0) >= 0
    # A marker counts only if it occurs exactly once; otherwise the span is the whole (real) sequence.
    lower = tl.where(
        tl.sum(n_open, axis=0) == 1, tl.min(first_open, axis=0), tl.where(any_real, tl.min(first_real, axis=0), 0)
    )
    upper = tl.where(tl.sum(n_close, axis=0) == 1, tl.min(first_close, axis=0), tl.max(last_real, axis=0) + 1)

    count = tl.zeros([BLOCK_T], dtype=tl.int64)
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        scored = _scored_chunk(
            ids_ptr, mask_ptr, table_ptr, table_size, start, length, t, think_start_id, lower, upper, HAS_MASK
        )
        count += scored.to(tl.int64)
    tl.store(bounds_ptr + 2 * pid, lower)
    tl.store(bounds_ptr + 2 * pid + 1, upper)
    tl.store(counts_ptr + pid, tl.sum(count, axis=0))


@triton.jit
def step_positions_write_kernel(
    ids_ptr,
    mask_ptr,
    cu_seqlens_ptr,
    table_ptr,
    table_size,
    seq_len,
    think_start_id,
    bounds_ptr,
    offsets_ptr,
    step_index_ptr,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    start, length = _row_extent(cu_seqlens_ptr, pid, seq_len, PACKED)
    lower = tl.load(bounds_ptr + 2 * pid)
    upper = tl.load(bounds_ptr + 2 * pid + 1)
    out = tl.load(offsets_ptr + pid)
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        scored = _scored_chunk(
            ids_ptr, mask_ptr, table_ptr, table_size, start, length, t, think_start_id, lower, upper, HAS_MASK
        )
        rank = tl.cumsum(scored.to(tl.int32), axis=0)  # 1-based slot of each scored position in this chunk
        tl.store(step_index_ptr + out + rank - 1, start + t, mask=scored)
        out += tl.sum(scored.to(tl.int64), axis=0)


@functools.lru_cache(maxsize=16)
def step_token_table(step_token_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Byte table with table[id] = 1 for the step tokens (ids >= 0); cached: the zh rule has hundreds of ids."""
    ids = torch.as_tensor(step_token_ids, dtype=torch.int64)
    table = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.uint8)
    table[ids] = 1
    return table.to(device)


def launch_step_positions(input_ids, step_token_ids, think_start_id, think_end_id, attention_mask, cu_seqlens):
    """Two launches and one host read of S. Arguments are validated by the caller."""
    device = input_ids.device
    packed = cu_seqlens is not None
    num_candidates = cu_seqlens.numel() - 1 if packed else input_ids.shape[0]
    seq_len = 0 if packed else input_ids.shape[1]
    ids = input_ids.contiguous()
    mask = attention_mask.contiguous() if attention_mask is not None else ids  # dummy pointer when absent
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    cu = cu_seqlens if packed else ids  # dummy pointer when padded
    table = step_token_table(tuple(step_token_ids), device)
    bounds = torch.empty((num_candidates, 2), dtype=torch.int64, device=device)
    counts = torch.empty(num_candidates, dtype=torch.int64, device=device)
    offsets = torch.zeros(num_candidates + 1, dtype=torch.int64, device=device)
    if num_candidates == 0:
        return torch.empty(0, dtype=torch.int64, device=device), offsets
    longest = seq_len if not packed else ids.numel()  # an upper bound for packed rows, without a host read
    block_t = min(1024, max(16, triton.next_power_of_2(max(longest, 1))))
    common = dict(PACKED=packed, HAS_MASK=attention_mask is not None, BLOCK_T=block_t)
    step_positions_count_kernel[(num_candidates,)](
        ids, mask, cu, table, table.numel(), seq_len, think_start_id, think_end_id, bounds, counts, **common
    )
    torch.cumsum(counts, 0, out=offsets[1:])
    num_steps = int(offsets[-1])  # host read: the output size depends on the data
    step_index = torch.empty(num_steps, dtype=torch.int64, device=device)
    step_positions_write_kernel[(num_candidates,)](
        ids, mask, cu, table, table.numel(), seq_len, think_start_id, bounds, offsets, step_index, **common
    )
    return step_index, offsets
