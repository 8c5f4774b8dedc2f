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


def choose_best(scores: Sequence[float], finished: Sequence[bool], pruned: Sequence[bool] | None = None) -> int:
    """Finished rows first, then the highest score; NaN ranks below every score; ties go to the lowest index.
    `pruned` rows (stopped early by pruning: candidates that lost) rank below every other row."""
    if len(scores) != len(finished) or not scores or (pruned is not None and len(pruned) != len(scores)):
        raise ValueError(f"scores, finished: expected two non-empty lists of one length, got {len(scores)} and "
                         f"{len(finished)}" + ("" if pruned is None else f" (pruned: {len(pruned)})"))  # fmt: skip
    kept = [True] * len(scores) if pruned is None else [not p for p in pruned]
    return max(
        range(len(scores)), key=lambda j: (kept[j], bool(finished[j]), -1.0 if math.isnan(scores[j]) else scores[j])
    )


PRUNE_RULES = ("none", "margin", "halving", "hybrid", "confidence")


def rows_to_prune(
    rule: str, means, counts, running, pruned, *, margin: float, every: int, keep: int, rungs: int = 0
) -> tuple[list[int], int]:
    """Which of one prompt's rows to stop now, from their running step scores (docs/pruning.md); returns (rows,
    rungs passed). Per row j: means[j] = mean clamped log p of its scored steps so far (NaN ranks lowest), counts[j]
    = its scored steps, running[j] = still decoding, pruned[j] = stopped already. Finished rows compete (they are
    candidates) but are never stopped; no rule leaves fewer than `keep` rows unpruned.

    margin: a running row with at least `every` steps whose mean is more than `margin` below the best mean among
    the unpruned rows with at least `every` steps (or finished) is stopped, the worst first.
    halving: once every running row has passed rung r + 1 (`(r + 1) * every` steps; finished rows have passed all),
    the unpruned rows are ranked by mean and the running ones outside the best max(keep, ceil(n / 2)) are stopped;
    `rungs` counts the rungs passed (the caller keeps it per prompt).
    hybrid: margin first, then halving on the rows left. none and confidence: nothing (confidence pruning reads
    the token confidence instead: `confidence_stops`)."""

    def key(j: int) -> tuple[float, int]:
        value = means[j]
        return (-math.inf if math.isnan(value) else value, -j)

    if rule not in PRUNE_RULES:
        raise ValueError(f"prune: expected one of {list(PRUNE_RULES)}, got {rule!r}")
    live = [j for j in range(len(means)) if not pruned[j]]
    stop: list[int] = []
    if rule in ("margin", "hybrid"):
        rated = [j for j in live if counts[j] >= every or not running[j]]
        if rated:
            best = max(key(j)[0] for j in rated)
            behind = [j for j in rated if running[j] and key(j)[0] < best - margin]
            stop = sorted(behind, key=key)[: max(0, len(live) - keep)]
    if rule in ("halving", "hybrid"):
        while (
            len(live) - len(stop) > keep
            and any(running[j] for j in live if j not in stop)
            and all(not running[j] or counts[j] >= (rungs + 1) * every for j in live if j not in stop)
        ):
            alive = [j for j in live if j not in stop]
            kept = sorted(alive, key=key, reverse=True)[: max(keep, math.ceil(len(alive) / 2))]
            stop += [j for j in alive if running[j] and j not in kept]
            rungs += 1
    return sorted(stop), rungs


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


def confidence_threshold(lowest: Sequence[float], percentile: float) -> float:
    """DeepConf's online threshold: the `percentile` (0-100, linear interpolation) of the warm-up rows' lowest
    window confidence. DeepConf-low keeps the top 10% (percentile 90), DeepConf-high the top 90% (percentile 10)."""
    values = sorted(float(v) for v in lowest if not math.isnan(v))
    if not values:
        return -math.inf
    rank = (len(values) - 1) * percentile / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def confidence_stops(lowest, totals, running, candidates, *, threshold: float, window: int) -> list[int]:
    """The rows to stop by DeepConf online: among the `candidates` rows (not warm-up, not stopped) still running,
    those with a full window (`totals[j] >= window` tokens) whose lowest window confidence fell below `threshold`."""
    return [j for j in candidates if running[j] and totals[j] >= window and lowest[j] < threshold]
