"""The choice rule and the modes, shared by every engine: how k scored candidates become one answer, and which
partial trajectories survive a round of step search.

score(candidate) = exp(mean_i log max(p_i, 1e-10)) over its scored steps (0 without steps); the best candidate is
the argmax over finished candidates first (those that wrote `</think>`), NaN ranking below every score, ties to
the lowest index (docs/method.md §4). Search survivors rank the same way (NaN lowest, ties to the lowest index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sprm_kernels.reference import PROB_EPS

MODES = {"low": 2, "medium": 8, "high": 32}  # the paper's reasoning-effort modes: k candidates


def choose_best(scores: Sequence[float], finished: Sequence[bool]) -> int:
    """Finished rows first, then the highest score; NaN ranks below every score; ties go to the lowest index."""
    if len(scores) != len(finished) or not scores:
        raise ValueError(f"scores, finished: expected two non-empty lists of one length, got {len(scores)} and "
                         f"{len(finished)}")  # fmt: skip
    return max(range(len(scores)), key=lambda j: (bool(finished[j]), -1.0 if math.isnan(scores[j]) else scores[j]))


def search_survivors(
    scores: Sequence[float], alive: Sequence[int], subtrees: Sequence[int], *, method: str, beam_width: int
) -> list[int]:
    """The rows that survive a search round, among the `alive` row indices, by their running `scores` (indexed by
    row). beam: the best `beam_width` alive rows, best first; "dvts": the best alive row of each subtree
    (`subtrees[row]`), by subtree id. NaN ranks lowest; ties go to the lowest index."""
    if method not in ("beam", "dvts"):
        raise ValueError(f"method: expected 'beam' or 'dvts', got {method!r}")

    def key(row: int) -> tuple[float, int]:
        return (-1.0 if math.isnan(scores[row]) else scores[row], -row)

    if method == "beam":
        return sorted(alive, key=key, reverse=True)[:beam_width]
    best: dict[int, int] = {}
    for row in alive:
        tree = int(subtrees[row])
        if tree not in best or key(row) > key(best[tree]):
            best[tree] = row
    return [best[tree] for tree in sorted(best)]


def geometric_mean(probs: Sequence[float]) -> float:
    """exp(mean log max(p, 1e-10)) in fp32; 0 without steps; NaN stays NaN."""
    if not probs:
        return 0.0
    return torch.tensor(probs, dtype=torch.float32).clamp(min=PROB_EPS).log().mean().exp().item()


def resolve_k(mode, k) -> int:
    """The number of candidates: `k` when given, else the mode's (low / medium / high = 2 / 8 / 32)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if k is None:
        return MODES[mode]
    check_int("k", k, minimum=1)
    return k


def check_int(name, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
