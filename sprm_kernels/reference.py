"""Eager PyTorch references: the ground truth for tests and the baseline for benchmarks.

They follow docs/method.md §3 and §4 line by line and favour readability over speed:
`step_positions_reference` loops over tokens in Python, `sprm_score_reference` runs the head in the
hidden states' own dtype (as the public implementation's `nn.Sequential` does) and casts its output to
float before the sigmoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The public implementation clamps probabilities at this value before the log.
PROB_EPS = 1e-10
LOG_PROB_EPS = math.log(PROB_EPS)


@dataclass
class SPRMScores:
    """Per-candidate results of SPRM scoring (B candidates, S scored steps, G = B // group_size groups).

    score:       [B] fp32 geometric mean of the step probabilities; 0 for a candidate with no steps.
    log_score:   [B] fp32 mean log probability (clamped at log 1e-10); -inf for a candidate with no steps,
                 so that score == exp(log_score) everywhere. NaN if any step of the candidate is NaN.
    num_steps:   [B] int64 number of scored steps.
    step_scores: [S] fp32 step probabilities (unclamped sigmoid), or None.
    best:        [G] int64 argmax of `score` within each group (lowest index on ties); NaN scores never win,
                 and a group whose candidates are all NaN gets -1. None when no group size was given.
    """

    score: torch.Tensor
    log_score: torch.Tensor
    num_steps: torch.Tensor
    step_scores: torch.Tensor | None = None
    best: torch.Tensor | None = None


def _row_segments(input_ids, attention_mask, cu_seqlens):
    """Yield (flat_positions, token_ids, real) per candidate: the row's flat indices, ids and padding mask."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            yield list(range(lo, hi)), input_ids[lo:hi].tolist(), [True] * (hi - lo)
        return
    batch, length = input_ids.shape
    for b in range(batch):
        real = [True] * length if attention_mask is None else attention_mask[b].bool().tolist()
        yield [b * length + t for t in range(length)], input_ids[b].tolist(), real


def step_positions_reference(
    input_ids: torch.Tensor,
    *,
    step_token_ids,
    think_start_id: int,
    think_end_id: int,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md §3, one token at a time. Returns (step_index [S] int64, offsets [B+1] int64).

    Padding (attention_mask == 0) is never scored and never serves as the step token after a position;
    the defaults for a missing or repeated marker are the first real position and one past the last
    real position (for left or right padding this is exactly the rule applied to the real tokens).
    """
    step_ids = {int(i) for i in step_token_ids}
    step_index, offsets = [], [0]
    for flat, x, real in _row_segments(input_ids, attention_mask, cu_seqlens):
        real_positions = [t for t in range(len(x)) if real[t]]
        starts = [t for t in real_positions if x[t] == think_start_id]
        ends = [t for t in real_positions if x[t] == think_end_id]
        # start = index of <think> if it occurs exactly once, else the beginning of the sequence
        start = starts[0] if len(starts) == 1 else (real_positions[0] if real_positions else 0)
        # end = index of </think> if it occurs exactly once, else the length of the sequence
        end = ends[0] if len(ends) == 1 else (real_positions[-1] + 1 if real_positions else 0)
        for t in range(len(x) - 1):
            if not (real[t] and real[t + 1]):
                continue
            if (
                x[t + 1] in step_ids  # 1. the next token is a step token
                and x[t] not in step_ids  # 2. only the first token of a run of step tokens counts
                and x[t] != think_start_id  # 3. not the <think> marker itself
                and start < t < end  # 4. strictly inside the thinking span
            ):
                step_index.append(flat[t])
        offsets.append(len(step_index))
    device = input_ids.device
    return (
        torch.tensor(step_index, dtype=torch.int64, device=device),
        torch.tensor(offsets, dtype=torch.int64, device=device),
    )


def gather_rows(hidden: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """Rows of `hidden` ([N, H] or [B, T, H]) at flat indices `step_index` ([S]) -> [S, H]."""
    if hidden.dim() == 2:
        return hidden.index_select(0, step_index)
    seq_len = hidden.shape[1]
    return hidden[step_index // seq_len, step_index % seq_len]


def segment_mean_and_best(
    log_probs: torch.Tensor, offsets: torch.Tensor, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-candidate mean of `log_probs` over CSR `offsets`, its exp, the counts and the group argmax."""
    num_candidates = offsets.numel() - 1
    num_steps = offsets[1:] - offsets[:-1]
    candidate_of_step = torch.repeat_interleave(torch.arange(num_candidates, device=offsets.device), num_steps)
    sums = torch.zeros(num_candidates, dtype=log_probs.dtype, device=log_probs.device)
    sums.index_add_(0, candidate_of_step, log_probs)
    has_steps = num_steps > 0
    log_score = torch.where(has_steps, sums / num_steps.clamp(min=1), float("-inf"))
    score = torch.where(has_steps, torch.exp(log_score), 0.0)
    best = None if group_size is None else group_argmax(score, group_size)
    return score, log_score, num_steps, best


def group_argmax(score: torch.Tensor, group_size: int) -> torch.Tensor:
    """Argmax within consecutive groups of `group_size`; lowest index on ties; NaN never wins; all-NaN -> -1."""
    grouped = score.view(-1, group_size)
    is_nan = torch.isnan(grouped)
    # torch.argmax returns the first maximal index, and would pick NaN: push NaN below every real score (>= 0).
    best = torch.argmax(torch.where(is_nan, float("-inf"), grouped), dim=1)
    return torch.where(is_nan.all(dim=1), -1, best)


def sprm_score_reference(
    hidden: torch.Tensor,
    step_index: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    group_size: int | None = None,
    return_step_scores: bool = False,
) -> SPRMScores:
    """docs/method.md §4 in eager PyTorch: head on the gathered rows, sigmoid in fp32, clamp, log, mean, exp, argmax."""
    rows = gather_rows(hidden, step_index)
    logits = F.linear(F.relu(F.linear(rows, w1, b1)), w2, b2).squeeze(-1)  # the head, in the input dtype
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # "cast to float" (fp64 stays fp64)
    probs = torch.sigmoid(logits)
    log_probs = torch.log(torch.clamp(probs, min=PROB_EPS))
    score, log_score, num_steps, best = segment_mean_and_best(log_probs, offsets, group_size)
    return SPRMScores(score, log_score, num_steps, probs if return_step_scores else None, best)
