"""Shared Triton pieces of the SPRM head: logit(x) = w2 . relu(W1 x + b1) + b2, split over the F = 2H features.

A program owns BLOCK_S rows and a column range [col_begin, col_end) of W1; it returns the partial logit of its
rows over that range. ReLU sits between the layers, so F is split and never H: every F tile sees the complete
pre-activation and its partial logits simply add across tiles. Which rows and columns a program owns is decided by
`program_tile` and `split_columns`: the plain-Python functions of schedule.py, compiled here as they are, so that
the launcher, the tests and the AOT tool's L2 model use the very same order.
"""

import triton
import triton.language as tl

from . import schedule

program_tile = triton.jit(schedule.program_tile)
split_columns = triton.jit(schedule.split_columns)

LOG_PROB_EPS = tl.constexpr(-23.025850929940457)  # log(1e-10), the clamp of the public implementation


@triton.jit
def head_partial_logit(
    hidden_ptr,
    row_offset,  # [BLOCK_S] int64 element offset of each row in `hidden`
    row_mask,  # [BLOCK_S] bool
    w1_ptr,
    stride_w1,  # row stride of W1 [F, H]
    b1_ptr,
    w2_ptr,
    col_begin,
    col_end,
    H,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its bf16 arithmetic is wrong, so compute in fp32 there
    FP32_INPUTS: tl.constexpr,  # fp32 operands: ask for IEEE fp32 products, not TF32
):
    partial = tl.zeros([BLOCK_S], dtype=tl.float32)
    for n0 in range(col_begin, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < col_end
        acc = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            x = tl.load(
                hidden_ptr + row_offset[:, None] + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            # W1 is [F, H]; read the tile transposed, [BLOCK_K, BLOCK_N], so that x @ w gives [BLOCK_S, BLOCK_N].
            w = tl.load(
                w1_ptr + cols[None, :].to(tl.int64) * stride_w1 + ks[:, None],
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if FP32_INPUTS:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        b1 = tl.load(b1_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        pre = acc + b1[None, :]
        # where(pre < 0, 0, pre) rather than maximum: NaN must propagate (maximum may drop it on GPUs).
        act = tl.where(pre < 0.0, 0.0, pre)
        w2 = tl.load(w2_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        partial += tl.sum(act * w2[None, :], axis=1)
    return partial


@triton.jit
def log1p_small(y):
    """log(1 + y) for y in [0, 1] from basic ops only (no libdevice): Goldberg's correction of log(1 + y)."""
    u = 1.0 + y
    exact = u == 1.0
    return tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, u - 1.0)))  # no 0/0 in the unused branch


@triton.jit
def clamped_log_sigmoid(z):
    """max(log sigmoid(z), log 1e-10), stable for any |z|; NaN stays NaN."""
    log_sig = tl.minimum(z, 0.0) - log1p_small(tl.exp(-tl.abs(z)))
    log_sig = tl.where(z != z, z, log_sig)
    return tl.where(log_sig < LOG_PROB_EPS, LOG_PROB_EPS, log_sig)


@triton.jit
def stable_sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def arrived_last(ticket_ptr, arrivals):
    """Takes a ticket; True in the program that arrives last of `arrivals`. The barrier and the acq_rel atomic
    order every thread's earlier stores before the ticket, so the last program sees what the others wrote."""
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == arrivals - 1


@triton.jit
def sum_split_partials(partial_ptr, rows, row_mask, S, num_splits, SPLIT_TILE: tl.constexpr, BLOCK_S: tl.constexpr):
    """sum_n partial[n, rows] over the num_splits column splits, read in [SPLIT_TILE, rows] tiles in a fixed
    order (the same bits whichever program adds them); `.cg` reads L2, never a stale L1 line."""
    acc = tl.zeros([SPLIT_TILE, BLOCK_S], dtype=tl.float32)
    for split0 in range(0, num_splits, SPLIT_TILE):
        split = split0 + tl.arange(0, SPLIT_TILE)
        acc += tl.load(
            partial_ptr + split[:, None].to(tl.int64) * S + rows[None, :],
            mask=(split[:, None] < num_splits) & row_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
    return tl.sum(acc, axis=0)


@triton.jit
def gathered_row_offsets(step_index_ptr, rows, row_mask, seq_len, stride_hb, stride_ht, GATHER: tl.constexpr):
    """Element offsets (int64) of the gathered rows: flat row r of a (B, T, H) tensor is (r // T, r % T). With
    GATHER False the rows are hidden's own rows 0..S-1 of an (N, H) tensor (no index is read)."""
    if GATHER:
        flat_row = tl.load(step_index_ptr + rows, mask=row_mask, other=0)
        return (flat_row // seq_len) * stride_hb + (flat_row % seq_len) * stride_ht
    else:
        return rows * stride_ht


@triton.jit
def complete_row_block(
    partial,
    partial_ptr,
    ticket_ptr,
    b2_ptr,
    pid_s,
    pid_n,
    rows,
    row_mask,
    S,
    num_splits,
    SPLIT_TILE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """(logits with b2, done): the partials go to the [num_splits, S] workspace and only the last split to arrive
    at row block `pid_s` gets done = True and the sum over all splits in split order (its `logits` are
    meaningless elsewhere). num_splits is a runtime integer, so one compiled kernel serves every split count; with
    one split the program that stores is also the last to arrive. The last arrival resets the ticket to zero (every
    split has taken its ticket by then), so a caller can reuse the counters for the next launch on the stream
    without zeroing them (no memset launch, no allocation)."""
    tl.store(partial_ptr + pid_n.to(tl.int64) * S + rows, partial, mask=row_mask)
    done = arrived_last(ticket_ptr + pid_s, num_splits)
    if done:
        tl.atomic_xchg(ticket_ptr + pid_s, 0)
        partial = sum_split_partials(partial_ptr, rows, row_mask, S, num_splits, SPLIT_TILE, BLOCK_S)
    return partial + tl.load(b2_ptr).to(tl.float32), done


@triton.jit
def any_row_active(is_step_ptr, want_ptr, B, BLOCK: tl.constexpr):
    """True when some row b < B has is_step[b] or want[b] set; every program computes the same answer."""
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        in_range = b < B
        flagged = tl.load(is_step_ptr + b, mask=in_range, other=0) != 0
        wanted = tl.load(want_ptr + b, mask=in_range, other=0) != 0
        found = tl.maximum(found, (flagged | wanted).to(tl.int32))
    return tl.max(found, axis=0) > 0
