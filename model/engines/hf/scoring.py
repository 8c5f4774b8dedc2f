"""Scoring on the HF engine (docs/method.md §3-4): sequences sorted by length, batched under a token budget, one
forward per batch that stops after layer L-2, the scored positions by §3 and the head by `sprm_score`."""

from __future__ import annotations

import itertools

import torch

from sprm_kernels import sprm_score, step_positions
from sprm_kernels.model.core.types import ScoreResult
from sprm_kernels.model.engines.hf.compat import masks_packed_sequences, uses_flash_attention

MAX_PADDING = 0.1  # share of a padded scoring batch's tokens that may be padding (see length_batches)


def length_batches(lengths: list[int], budget: int, packed: bool, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of the non-empty sequences, longest first, in batches of at most `budget` tokens: the sum of the
    lengths when packed, rows x longest when padded (one sequence over the budget gets a batch of its own).

    Padded batches also close before padding would exceed `max_padding` of their tokens: a padded position costs
    a forward as much as a real one, so one wide batch of mixed lengths can be slower than scoring the sequences
    one at a time (64 texts of 36-172 tokens padded to 2.3x their tokens: 0.6-0.7x the speed, on CPU)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batches, current, used, real = [], [], 0, 0
    for index in order:
        length = lengths[index]
        cost = used + length if packed else (len(current) + 1) * lengths[current[0] if current else index]
        too_padded = not packed and cost - (real + length) > max_padding * cost
        if current and (cost > budget or too_padded):
            batches.append(current)
            current, cost, real = [], length, 0
        current.append(index)
        used, real = cost, real + length
    return batches + ([current] if current else [])


def resolve_packed(model, packed: bool | None) -> bool:
    """`packed` checked against the model's attention; None: packed exactly when it runs flash-attention."""
    flash = uses_flash_attention(model)
    if packed is None:
        return flash
    if packed and not (flash or masks_packed_sequences()):
        raise ValueError(
            "packed: expected False with this transformers version and attention, which would let packed "
            "sequences attend to each other (needs transformers >= 4.53 or flash-attention)"
        )
    return bool(packed)


def score_sequences(
    rm, sequences: list[list[int]], *, return_all_scores: bool, batch_tokens: int, packed: bool, backend
) -> list[ScoreResult]:
    """One `ScoreResult` per sequence of `rm` (a `ReflectiveModel`), in order; empty sequences score 0."""
    results = [ScoreResult(0.0, [] if return_all_scores else None, [], []) for _ in sequences]
    for batch in length_batches([len(s) for s in sequences], batch_tokens, packed):
        batch_results = score_batch(rm, [sequences[i] for i in batch], packed, return_all_scores, backend)
        for index, result in zip(batch, batch_results, strict=True):
            results[index] = result
    return results


def score_batch(rm, sequences: list[list[int]], packed: bool, return_all_scores: bool, backend) -> list[ScoreResult]:
    """One forward over non-empty `sequences`: packed into one row [1, sum T] with restarting position ids, or
    right-padded to [B, max T] (causal attention keeps real tokens blind to the padding, which is never scored)."""
    lengths = [len(s) for s in sequences]
    rules = dict(step_token_ids=rm.step_token_ids, think_start_id=rm.think_start_id, think_end_id=rm.think_end_id)
    device = rm.device
    if packed:
        input_ids = torch.tensor([t for s in sequences for t in s], device=device)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], device=device)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).to(device)
        hidden = rm.penultimate_hidden_states(input_ids[None], position_ids=position_ids[None])[0]
        step_index, offsets = step_positions(input_ids, cu_seqlens=cu_seqlens, backend=backend, **rules)
        row_starts = cu_seqlens[:-1].tolist()
    else:
        width = max(lengths)
        input_ids = torch.tensor([s + [rm.pad_token_id] * (width - len(s)) for s in sequences], device=device)
        real = torch.arange(width, device=device) < torch.tensor(lengths, device=device)[:, None]
        hidden = rm.penultimate_hidden_states(input_ids)  # right padding needs no mask (see that method)
        step_index, offsets = step_positions(input_ids, attention_mask=real, backend=backend, **rules)
        row_starts = [row * width for row in range(len(sequences))]
    scores = sprm_score(
        hidden, step_index, offsets, *rm.head.kernel_weights(), return_step_scores=return_all_scores, backend=backend
    )
    values, offsets, step_index = scores.score.tolist(), offsets.tolist(), step_index.tolist()
    step_scores = scores.step_scores.tolist() if return_all_scores else None
    results = []
    for row, sequence in enumerate(sequences):
        lo, hi = offsets[row], offsets[row + 1]
        results.append(
            ScoreResult(
                value=values[row],
                all_scores=step_scores[lo:hi] if return_all_scores else None,
                token_ids=sequence,
                score_positions=[index - row_starts[row] for index in step_index[lo:hi]],
            )
        )
    return results


def step_probs_at(features: torch.Tensor, positions: list[int], head_weights: tuple, backend) -> dict[int, float]:
    """{t: step probability of `features[t]`} for the given positions of one sequence; `features` [T, H]."""
    if not positions:
        return {}
    step_index = torch.tensor(positions, device=features.device)
    offsets = torch.tensor([0, len(positions)], device=features.device)
    scores = sprm_score(features, step_index, offsets, *head_weights, return_step_scores=True, backend=backend)
    return dict(zip(positions, scores.step_scores.tolist(), strict=True))
