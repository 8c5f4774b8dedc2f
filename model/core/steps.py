"""Which positions are scored (docs/method.md §3), once for every engine: offline on final sequences, and as tokens
arrive while generating or searching.

Position t of the ids x[0..L) is scored iff
  1. x[t+1] is a step token, 2. x[t] is not one, 3. x[t] is not `<think>`,
  4. start < t < end (start: the single `<think>`, else 0; end: the single `</think>`, else L).

Offline (`scored_positions`) the rule runs on whole sequences through `sprm_kernels.step_positions`. Streaming,
rules 1-3 are known as soon as x[t+1] is sampled (`could_score`, `is_scorable_pair`), and rule 4 with the markers
written so far (`ThinkSpan`; an unfinished row has end = its length). Engines recompute the final positions with
`scored_positions` so that reported scores equal scoring the final ids afresh.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import torch

from sprm_kernels import step_positions


def is_scorable_pair(token: int, successor: int, step_ids: Collection[int], think_start_id: int) -> bool:
    """Rules 1-3 for x[t] = `token`, x[t+1] = `successor` (pure Python; `step_ids` best a set)."""
    return successor in step_ids and token not in step_ids and token != think_start_id


def prompt_step_positions(prompt_ids: Sequence[int], step_token_ids: Collection[int], think_start_id: int) -> list[int]:
    """Positions t of the prompt, 1 <= t < len - 1, where rules 1-3 hold: the only prompt positions a final rule can
    score (rule 4 depends on markers the rows have not written yet; t = 0 is never inside the span). Usually empty:
    the prompt precedes `<think>`."""
    step_ids = set(step_token_ids)
    return [
        t
        for t in range(1, len(prompt_ids) - 1)
        if is_scorable_pair(prompt_ids[t], prompt_ids[t + 1], step_ids, think_start_id)
    ]


def could_score(
    token: torch.Tensor, previous: torch.Tensor, writing: torch.Tensor, step_ids: torch.Tensor, think_start_id: int
) -> torch.Tensor:
    """[B] bool: rows in `writing` where rules 1-3 hold for x[t] = `previous`, x[t+1] = `token` (both [B] long;
    `step_ids` [S] long, on their device). Rule 4 is `ThinkSpan.contains`."""
    return (
        writing
        & torch.isin(token, step_ids)  # rule 1: x[t+1] is a step token
        & ~torch.isin(previous, step_ids)  # rule 2: first of a run
        & (previous != think_start_id)  # rule 3: not <think> itself
    )


class ThinkSpan:
    """Rule 4 as tokens arrive: per row, how often `<think>` / `</think>` occurred in prompt + tokens so far and
    where each first occurred. All tensors [B] long on `device`; `select` keeps or forks rows (search)."""

    def __init__(self, prompt_ids: Sequence[int], rows: int, think_start_id: int, think_end_id: int, device):
        self.start_id, self.end_id = think_start_id, think_end_id
        prompt_ids = list(prompt_ids)

        def full(value: int) -> torch.Tensor:
            return torch.full((rows,), value, dtype=torch.long, device=device)

        starts, ends = prompt_ids.count(think_start_id), prompt_ids.count(think_end_id)
        self.start_count, self.start_first = full(starts), full(prompt_ids.index(think_start_id) if starts else 0)
        self.end_count, self.end_first = full(ends), full(prompt_ids.index(think_end_id) if ends else 0)

    def contains(self, position: int | torch.Tensor) -> torch.Tensor:
        """[B] bool: start < position < end, with start = the single `<think>` else 0 and end = the single `</think>`
        else unbounded (the sequence is not over yet). `position`: an int, or [B] long (one per row)."""
        start = torch.where(self.start_count == 1, self.start_first, 0)
        end = torch.where(self.end_count == 1, self.end_first, torch.iinfo(torch.long).max)
        return (start < position) & (position < end)

    def observe(self, token: torch.Tensor, position: int | torch.Tensor, writing: torch.Tensor) -> None:
        """Count the markers among `token` [B] written at `position` (int or [B]) by the rows in `writing` [B]."""
        seen = writing & (token == self.start_id)
        self.start_first = torch.where(seen & (self.start_count == 0), position, self.start_first)
        self.start_count = self.start_count + seen
        seen = writing & (token == self.end_id)
        self.end_first = torch.where(seen & (self.end_count == 0), position, self.end_first)
        self.end_count = self.end_count + seen

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] long, in that order (a repeated index forks a row)."""
        self.start_count, self.start_first = self.start_count[index], self.start_first[index]
        self.end_count, self.end_first = self.end_count[index], self.end_first[index]


def scored_positions(
    sequences: Sequence[Sequence[int]],
    *,
    step_token_ids: Sequence[int],
    think_start_id: int,
    think_end_id: int,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> list[list[int]]:
    """The scored positions of each whole sequence (§3 with start and end final), as lists of ints. The sequences
    run packed through `sprm_kernels.step_positions` (on `device`, with `backend`: None picks Triton on CUDA)."""
    if not sequences:
        return []
    lengths = [len(s) for s in sequences]
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], device=device)
    step_index, offsets = step_positions(
        input_ids, step_token_ids=list(step_token_ids), think_start_id=think_start_id, think_end_id=think_end_id,
        cu_seqlens=cu_seqlens, backend=backend,
    )  # fmt: skip
    step_index, offsets, starts = step_index.tolist(), offsets.tolist(), cu_seqlens.tolist()
    return [[i - starts[row] for i in step_index[offsets[row] : offsets[row + 1]]] for row in range(len(lengths))]


def scored_positions_list(
    sequence: Sequence[int], step_ids: Collection[int], think_start_id: int, think_end_id: int
) -> list[int]:
    """`scored_positions` of one sequence in pure Python (§3 with start and end final): for the host's many small
    reads of short partial sequences (the vLLM search's rounds), where building tensors costs more than the rule.
    `step_ids` best a set. tests/core/test_steps.py checks it against `scored_positions` on random sequences."""
    length = len(sequence)
    starts = [i for i, x in enumerate(sequence) if x == think_start_id]
    ends = [i for i, x in enumerate(sequence) if x == think_end_id]
    start = starts[0] if len(starts) == 1 else 0
    end = ends[0] if len(ends) == 1 else length
    return [
        t
        for t in range(start + 1, min(end, length - 1))
        if is_scorable_pair(sequence[t], sequence[t + 1], step_ids, think_start_id)
    ]
