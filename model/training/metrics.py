"""How well a head selects (docs/method.md §10), and the report of a fit.

A positive overall score gap or AUC proves nothing about selection (a head can learn which problems are hard). The
metrics that matter are within a problem: the within-problem gap and AUC, and best-of-k accuracy against a
score-blind pick, pass@1 and the oracle (any correct). And watch the share of steps the SPR filter keeps
(`kept_correct` / `kept_wrong` in `TrainReport`): a head whose logits all share one sign keeps the steps of one
class only and drives the loss to 0 without learning anything (seen with a fresh head on small features).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from sprm_kernels import sprm_score
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.selection import choose_best
from sprm_kernels.model.training.rollouts import RolloutSet, chunks, gather_features


@dataclass
class Metrics:
    """Selection quality of a head on some problems' rollouts (trajectory score = geometric mean, docs/method.md §4).

    score_correct / score_incorrect: mean score of the valid correct / wrong rollouts; gap: their difference.
    auc: ROC AUC of the score for correct against wrong valid rollouts, pooled over problems (ties count 1/2).
    within_gap / within_auc: the same within each problem, averaged over the `mixed_problems` problems that have
    both correct and wrong valid rollouts (NaN when there are none). best_of_k: fraction of problems whose chosen
    rollout is correct, chosen as `generate` chooses (finished rows first, then the highest score). random_pick: the
    expected accuracy of a score-blind choice by the same rule (a random finished rollout, or any when none
    finished): the baseline of best_of_k. pass_at_1: the expected accuracy of a random rollout; oracle: fraction
    of problems with any correct rollout.
    """

    score_correct: float
    score_incorrect: float
    gap: float
    auc: float
    within_gap: float
    within_auc: float
    best_of_k: float
    random_pick: float
    pass_at_1: float
    oracle: float
    problems: int
    mixed_problems: int


def trajectory_scores(
    head: SPRMHead, rollouts: RolloutSet, rollout_index: Sequence[int] | None = None, *, backend=None
) -> torch.Tensor:
    """[len(rollout_index)] fp32 scores of the given rollouts (all by default) under `head`, in eval mode."""
    index = list(range(rollouts.num_rollouts)) if rollout_index is None else list(rollout_index)
    weights = head.kernel_weights()
    scores = []
    for chunk in chunks(rollouts, index, max_rows=1 << 16):
        hidden, offsets = gather_features(rollouts, chunk, weights[0].device, weights[0].dtype)
        step_index = torch.arange(hidden.shape[0], device=hidden.device)
        scores.append(sprm_score(hidden, step_index, offsets, *weights, backend=backend).score.cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def evaluate(head: SPRMHead, rollouts: RolloutSet, problems: Sequence[int] | None = None, *, backend=None) -> Metrics:
    """`Metrics` of `head` on the rollouts of `problems` (all by default)."""
    problems = list(range(rollouts.num_problems)) if problems is None else list(problems)
    index = rollouts.rollouts_of(problems)
    scores = trajectory_scores(head, rollouts, index, backend=backend)
    correct, finished, valid = (getattr(rollouts, name)[index] for name in ("correct", "finished", "valid"))
    problem_of = rollouts.problem_id[index]
    good, bad = scores[valid & correct], scores[valid & ~correct]
    within_gaps, within_aucs, chosen, random_pick, pass_at_1, oracle = [], [], [], [], [], []
    for problem in problems:
        mine = problem_of == problem
        if not mine.any():
            continue
        s, y, v = scores[mine], correct[mine], valid[mine]
        best = choose_best(s.tolist(), finished[mine].tolist())
        chosen.append(float(y[best]))
        eligible = finished[mine] if finished[mine].any() else torch.ones_like(y)
        random_pick.append(y[eligible].double().mean().item())
        pass_at_1.append(y.double().mean().item())
        oracle.append(float(y.any()))
        if (v & y).any() and (v & ~y).any():
            within_gaps.append((s[v & y].mean() - s[v & ~y].mean()).item())
            within_aucs.append(roc_auc(s[v], y[v]))
    return Metrics(
        score_correct=_mean(good.tolist()),
        score_incorrect=_mean(bad.tolist()),
        gap=_mean(good.tolist()) - _mean(bad.tolist()),
        auc=roc_auc(scores[valid], correct[valid]),
        within_gap=_mean(within_gaps),
        within_auc=_mean(within_aucs),
        best_of_k=_mean(chosen),
        random_pick=_mean(random_pick),
        pass_at_1=_mean(pass_at_1),
        oracle=_mean(oracle),
        problems=len(chosen),
        mixed_problems=len(within_gaps),
    )


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative) + P(tie) / 2 (Mann-Whitney, tie-averaged
    ranks); NaN without both classes or with a NaN score."""
    labels = labels.bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives or torch.isnan(scores).any():
        return math.nan
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based average rank of each distinct value
    rank_sum = mean_rank[inverse][labels].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# -- the report of a fit ----------------------------------------------------------------------------------------


CURVES = ("score_correct", "score_incorrect", "gap", "auc", "within_gap", "within_auc", "best_of_k")


@dataclass
class TrainReport:
    """Curves as lists, one entry per evaluation (`steps`: the optimizer steps done, 0 = before training), the
    metrics on the `eval_on` problems ("held-out", or "train" when eval_split = 0), and every step's loss."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean loss of the steps since the previous evaluation
    score_correct: list[float] = field(default_factory=list)
    score_incorrect: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    within_gap: list[float] = field(default_factory=list)
    within_auc: list[float] = field(default_factory=list)
    best_of_k: list[float] = field(default_factory=list)
    kept_correct: list[float] = field(default_factory=list)  # share of valid correct steps the loss kept, mean since
    kept_wrong: list[float] = field(default_factory=list)  # the previous evaluation; the same for wrong steps
    random_pick: float = math.nan  # baselines of the evaluated problems: the same at every evaluation
    pass_at_1: float = math.nan
    oracle: float = math.nan
    losses: list[float] = field(default_factory=list)
    eval_on: str = "held-out"
    train_problems: list[int] = field(default_factory=list)
    eval_problems: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def add(self, step: int, recent: list[StepStats], metrics: Metrics) -> None:
        self.steps.append(step)
        self.train_loss.append(_mean([s.loss for s in recent]))
        self.kept_correct.append(_mean([s.kept_correct for s in recent if not math.isnan(s.kept_correct)]))
        self.kept_wrong.append(_mean([s.kept_wrong for s in recent if not math.isnan(s.kept_wrong)]))
        for name in CURVES:
            getattr(self, name).append(getattr(metrics, name))
        self.random_pick, self.pass_at_1, self.oracle = metrics.random_pick, metrics.pass_at_1, metrics.oracle

    def line(self, index: int = -1) -> str:
        return (
            f"step {self.steps[index]:6d}  loss {self.train_loss[index]:.4f}  "
            f"kept {self.kept_correct[index]:.2f}/{self.kept_wrong[index]:.2f}  gap {self.gap[index]:+.4f}  "
            f"auc {self.auc[index]:.3f}  within-gap {self.within_gap[index]:+.4f}  "
            f"within-auc {self.within_auc[index]:.3f}  best-of-k {self.best_of_k[index]:.3f}  "
            f"(random {self.random_pick:.3f}, pass@1 {self.pass_at_1:.3f}, oracle {self.oracle:.3f})"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=True)


@dataclass
class StepStats:
    """What one optimizer step reports: its loss and the shares of steps the loss kept."""

    loss: float
    kept_correct: float  # share of the batch's steps of valid correct rollouts that the loss kept (NaN: none)
    kept_wrong: float
