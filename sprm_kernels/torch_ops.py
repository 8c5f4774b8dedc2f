"""The fast PyTorch path, taken for CPU tensors when the Triton interpreter is off.

Unlike the references it is vectorised (no Python loop over tokens) and runs the head in fp32 on the gathered
rows only, with the stable log-sigmoid of the kernels, so its numbers match the Triton path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import LOG_PROB_EPS, gather_rows, group_argmax


def _flatten_rows(input_ids, attention_mask, cu_seqlens):
    """Flat ids, their candidate, their position within the candidate and the padding mask, for both layouts."""
    device = input_ids.device
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        candidate = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        position = torch.arange(input_ids.numel(), device=device) - cu_seqlens[:-1][candidate]
        return input_ids, candidate, position, torch.ones_like(input_ids, dtype=torch.bool), lengths.numel()
    batch, length = input_ids.shape
    candidate = torch.arange(batch, device=device).repeat_interleave(length)
    position = torch.arange(length, device=device).repeat(batch)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return input_ids.reshape(-1), candidate, position, real.reshape(-1), batch


def _reduce_positions(where, candidate, position, num_candidates, fill, reduce):
    """Per candidate, the min or max ("amin"/"amax") position where `where` holds; `fill` if it never does."""
    out = torch.full((num_candidates,), fill, dtype=torch.int64, device=position.device)
    return out.scatter_reduce(0, candidate[where], position[where], reduce=reduce)


def step_positions_torch(input_ids, step_token_ids, think_start_id, think_end_id, attention_mask, cu_seqlens):
    ids, candidate, position, real, num_candidates = _flatten_rows(input_ids, attention_mask, cu_seqlens)
    device = ids.device
    step_ids = torch.as_tensor(list(step_token_ids), dtype=ids.dtype, device=device)
    is_step = torch.isin(ids, step_ids) & real
    same_row_next = torch.zeros_like(real)
    same_row_next[:-1] = (candidate[1:] == candidate[:-1]) & real[1:] & real[:-1]
    next_is_step = torch.zeros_like(real)
    next_is_step[:-1] = is_step[1:]

    is_open = real & (ids == think_start_id)
    is_close = real & (ids == think_end_id)
    big = torch.iinfo(torch.int64).max
    n_open = torch.bincount(candidate[is_open], minlength=num_candidates)
    n_close = torch.bincount(candidate[is_close], minlength=num_candidates)
    first_real = _reduce_positions(real, candidate, position, num_candidates, big, "amin")
    last_real = _reduce_positions(real, candidate, position, num_candidates, -1, "amax")
    first_real = torch.where(last_real >= 0, first_real, 0)
    first_open = _reduce_positions(is_open, candidate, position, num_candidates, big, "amin")
    first_close = _reduce_positions(is_close, candidate, position, num_candidates, big, "amin")
    # A marker counts only if it occurs exactly once; otherwise the span is the whole (real) sequence.
    lower = torch.where(n_open == 1, first_open, first_real)
    upper = torch.where(n_close == 1, first_close, last_real + 1)

    scored = (
        same_row_next
        & next_is_step
        & ~is_step
        & (ids != think_start_id)
        & (position > lower[candidate])
        & (position < upper[candidate])
    )
    step_index = torch.nonzero(scored).flatten()
    offsets = torch.zeros(num_candidates + 1, dtype=torch.int64, device=device)
    torch.cumsum(torch.bincount(candidate[scored], minlength=num_candidates), 0, out=offsets[1:])
    return step_index, offsets


def head_logits_fp32(rows, w1, b1, w2, b2) -> torch.Tensor:
    """w2 . relu(W1 x + b1) + b2 with fp32 operands and accumulation, [S, H] -> [S]."""
    hidden = F.linear(rows.float(), w1.float(), b1.float()).relu_()  # in place: one [S, 2H] buffer, not two
    return F.linear(hidden, w2.reshape(1, -1).float(), b2.reshape(1).float()).squeeze(-1)


def clamped_log_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """max(log sigmoid(z), log 1e-10) in log space (stable for any |z|); NaN stays NaN."""
    return F.logsigmoid(logits).clamp_min_(LOG_PROB_EPS)  # NaN stays NaN (clamp propagates it)


def segment_mean_and_best(log_probs: torch.Tensor, offsets: torch.Tensor, group_size: int | None):
    """The reference's segment_mean_and_best, bit for bit, in half the ATen calls (they dominate at decode sizes):
    one CSR segment sum (on CPU it adds each segment in order from 0, as the reference's index_add_ does, with no
    repeat_interleave and its host synchronisation), no clamp of the divisor, and exp(-inf) = 0 for empty
    candidates instead of a second where."""
    num_steps = offsets[1:] - offsets[:-1]
    sums = torch.segment_reduce(log_probs, "sum", offsets=offsets, unsafe=True)  # offsets checked by the caller
    log_score = torch.where(num_steps > 0, sums / num_steps, float("-inf"))
    score = torch.exp(log_score)
    best = None if group_size is None else group_argmax(score, group_size)
    return score, log_score, num_steps, best


def sprm_score_torch(hidden, step_index, offsets, w1, b1, w2, b2, group_size, return_step_scores):
    logits = head_logits_fp32(gather_rows(hidden, step_index), w1, b1, w2, b2)
    score, log_score, num_steps, best = segment_mean_and_best(clamped_log_sigmoid(logits), offsets, group_size)
    return score, log_score, num_steps, torch.sigmoid(logits) if return_step_scores else None, best


def step_scorer_update_torch(hidden, is_step, w1, b1, w2, b2, sum_log, count, step_prob, want_prob=None) -> None:
    """The StepScorer contract on the torch route; an idle call (want_prob given, no row flagged or wanted) leaves
    the sums alone and returns NaN probabilities, decided without a host synchronisation."""
    logits = head_logits_fp32(hidden, w1, b1, w2, b2)
    sum_log.add_(torch.where(is_step, clamped_log_sigmoid(logits), 0.0))
    count.add_(is_step.to(count.dtype))
    probs = torch.sigmoid(logits)
    if want_prob is not None:
        probs = torch.where((is_step | want_prob).any(), probs, float("nan"))
    step_prob.copy_(probs)
