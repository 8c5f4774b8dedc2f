"""Training the SPRM head on a frozen backbone (docs/method.md §6): rollouts, verifier labels, SPR loss,
within-problem metrics.

1. `collect` samples k thinking rollouts per prompt with `ReflectiveModel.generate` and keeps the layer L-2 rows at
   the scored positions *as the decoding produced them* (`return_features=True`: no second forward), decodes every
   candidate's answer from its own KV cache (`answer_all=True`) and labels it with a verifier.
2. `RolloutSet.save` / `RolloutSet.load` keep them on disk, so that the expensive generation runs once.
3. `train_head` fits an `SPRMHead` on them with AdamW and `spr_loss`, evaluates on held-out problems and writes
   checkpoints in the official layout (`score_module.pt` + `sprm_head.safetensors`).

docs/method.md §10: a positive overall score gap or AUC proves nothing about selection (a head can learn which
problems are hard). The metrics that matter are within a problem: the within-problem gap and AUC, and best-of-k accuracy
against a score-blind pick, pass@1 and the oracle (any correct). And watch the share of steps the SPR filter keeps
(`kept_correct` / `kept_wrong`): a head whose logits all share one sign keeps the steps of one class only and
drives the loss to 0 without learning anything (seen with a fresh head on small features).

Command line: `python -m sprm_kernels.model.train collect ...` and `... fit ...` (see `main`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from sprm_kernels import spr_loss, sprm_score, sprm_step_logits
from sprm_kernels.loss import MODES
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.selection import choose_best
from sprm_kernels.model.engines.base import Engine
from sprm_kernels.model.engines.registry import load_engine

ROLLOUTS_TENSORS = "rollouts.safetensors"
ROLLOUTS_JSON = "rollouts.json"
ROLLOUTS_FORMAT = "sprm-rollouts"
ROLLOUTS_VERSION = 1
TRAIN_INFO = "sprm_train.json"  # beside the head files: what was trained, from which backbone
REPORT_NAME = "train_report.json"
LABEL_SOURCES = ("answer", "thinking")

Verifier = Callable[[object, str], object]  # (prompt, answer) -> True / False, or None for a format failure


# -- rollouts ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RolloutSet:
    """R rollouts of P problems with S scored steps in all, H the backbone's hidden size.

    Tensors (CPU): features [S, H] layer L-2 rows (the model's dtype) at the scored positions, rollout after rollout;
    offsets [R+1] int64 CSR into features; step_positions [S] int64, each row's position in prompt + thinking;
    correct [R] bool (the verifier accepted the answer); finished [R] bool (the row closed its thinking); valid [R]
    bool (finished and the verifier gave a verdict: invalid rollouts are left out of the loss); problem_id [R] int64
    index into `prompts`; token_ids [T] int64 the thinking tokens of every rollout, token_offsets [R+1] int64 CSR.
    Lists: prompts [P] (text or chat messages), prompt_token_ids [P], texts [R] (the thinking, special tokens kept),
    answers [R] (None where no answer was decoded). info: how the set was made (model, k, sampling settings).
    """

    features: torch.Tensor
    offsets: torch.Tensor
    step_positions: torch.Tensor
    correct: torch.Tensor
    finished: torch.Tensor
    valid: torch.Tensor
    problem_id: torch.Tensor
    token_ids: torch.Tensor
    token_offsets: torch.Tensor
    prompts: list
    prompt_token_ids: list[list[int]]
    texts: list[str]
    answers: list[str | None]
    info: dict = field(default_factory=dict)

    TENSORS = ("features", "offsets", "step_positions", "correct", "finished", "valid", "problem_id", "token_ids",
               "token_offsets")  # fmt: skip

    def __post_init__(self):
        _check_rollouts(self)

    @property
    def num_rollouts(self) -> int:
        return self.correct.numel()

    @property
    def num_problems(self) -> int:
        return len(self.prompts)

    @property
    def hidden_size(self) -> int:
        return self.features.shape[1]

    def rollouts_by_problem(self) -> dict[int, list[int]]:
        """Problem id -> indices of its rollouts, in their stored order (problems without rollouts are absent)."""
        by_problem = {}
        for rollout, problem in enumerate(self.problem_id.tolist()):
            by_problem.setdefault(problem, []).append(rollout)
        return by_problem

    def rollouts_of(self, problems: Sequence[int]) -> list[int]:
        """Indices of the rollouts of `problems`, problem by problem, in their stored order."""
        by_problem = self.rollouts_by_problem()
        return [rollout for p in problems for rollout in by_problem.get(p, [])]

    def save(self, directory: str | os.PathLike) -> None:
        """Write `rollouts.safetensors` (the tensors) and `rollouts.json` (everything else) into `directory`."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in self.TENSORS}
        save_file(tensors, os.path.join(directory, ROLLOUTS_TENSORS), metadata={"format": ROLLOUTS_FORMAT})
        sidecar = dict(
            format=ROLLOUTS_FORMAT, version=ROLLOUTS_VERSION, prompts=self.prompts,
            prompt_token_ids=self.prompt_token_ids, texts=self.texts, answers=self.answers, info=self.info,
        )  # fmt: skip
        with open(os.path.join(directory, ROLLOUTS_JSON), "w", encoding="utf-8") as file:
            json.dump(sidecar, file, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RolloutSet:
        from safetensors.torch import load_file

        with open(os.path.join(directory, ROLLOUTS_JSON), encoding="utf-8") as file:
            sidecar = json.load(file)
        if sidecar.get("format") != ROLLOUTS_FORMAT or sidecar.get("version") != ROLLOUTS_VERSION:
            raise ValueError(
                f"{directory}: expected {ROLLOUTS_FORMAT} version {ROLLOUTS_VERSION}, "
                f"got {sidecar.get('format')!r} version {sidecar.get('version')!r}"
            )
        tensors = load_file(os.path.join(directory, ROLLOUTS_TENSORS), device="cpu")
        lists = {key: sidecar[key] for key in ("prompts", "prompt_token_ids", "texts", "answers", "info")}
        return cls(**tensors, **lists)


def _check_rollouts(rollouts: RolloutSet) -> None:
    def fail(name, expected, got):
        raise ValueError(f"{name}: expected {expected}, got {got}")

    r = rollouts
    if not isinstance(r.features, torch.Tensor) or r.features.dim() != 2 or not r.features.is_floating_point():
        fail("features", "a float tensor [S, H]", getattr(r.features, "shape", type(r.features).__name__))
    num = r.correct.numel() if isinstance(r.correct, torch.Tensor) else -1
    for name, size, dtype in (("offsets", num + 1, torch.int64), ("token_offsets", num + 1, torch.int64),
                              ("step_positions", r.features.shape[0], torch.int64), ("correct", num, torch.bool),
                              ("finished", num, torch.bool), ("valid", num, torch.bool),
                              ("problem_id", num, torch.int64)):  # fmt: skip
        value = getattr(r, name)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.shape != (size,):
            fail(name, f"a {dtype} tensor of shape [{size}]", getattr(value, "shape", type(value).__name__))
    if r.token_ids.dim() != 1 or r.token_ids.dtype != torch.int64:
        fail("token_ids", "an int64 tensor [T]", tuple(r.token_ids.shape))
    for name, total in (("offsets", r.features.shape[0]), ("token_offsets", r.token_ids.numel())):
        value = getattr(r, name)
        if value[0] != 0 or value[-1] != total or (value[1:] < value[:-1]).any():
            fail(name, f"non-decreasing CSR offsets from 0 to {total}", f"{value[0]}..{value[-1]}")
    if num and (r.problem_id.min() < 0 or r.problem_id.max() >= len(r.prompts)):
        fail("problem_id", f"indices into the {len(r.prompts)} prompts", "out of range")
    if (r.valid & ~r.finished).any():
        fail("valid", "False wherever finished is False", "a valid unfinished rollout")
    if len(r.prompt_token_ids) != len(r.prompts):
        fail("prompt_token_ids", f"{len(r.prompts)} lists (one per prompt)", len(r.prompt_token_ids))
    for name in ("texts", "answers"):
        if len(getattr(r, name)) != num:
            fail(name, f"{num} entries (one per rollout)", len(getattr(r, name)))


def collect(
    model: Engine,
    prompts: Sequence,
    verifier: Verifier,
    k: int,
    *,
    label_from: str = "answer",
    max_think_tokens: int = 4096,
    max_answer_tokens: int = 1024,
    temperature: float = 0.6,
    top_p: float = 0.95,
    answer_temperature: float | None = None,
    seed: int = 0,
    backend: str | None = None,
    progress: bool = True,
) -> RolloutSet:
    """k rollouts per prompt from `model.generate`, with the features its decoding saw, labelled by `verifier`.

    `verifier(prompt, answer)` returns True (correct), False (wrong) or None (format failure: invalid). It gets the
    candidate's answer (label_from="answer", decoded after its own `</think>` from its own KV cache) or its thinking
    text (label_from="thinking": no answer is decoded, for tasks whose thinking states the result). A row that never
    closes its thinking is invalid and not shown to the verifier. Prompt i is sampled with seed `seed + i`, so a
    prompt's rollouts do not depend on the others.
    """
    if not isinstance(model, Engine):
        raise ValueError(f"model: expected an Engine (e.g. a ReflectiveModel), got {type(model).__name__}")
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of prompts, got {prompts!r:.80}")
    if not callable(verifier):
        raise ValueError(f"verifier: expected a callable (prompt, answer) -> bool, got {type(verifier).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if label_from not in LABEL_SOURCES:
        raise ValueError(f"label_from: expected one of {LABEL_SOURCES}, got {label_from!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    decode_answers = label_from == "answer"
    settings = dict(
        k=k, max_think_tokens=max_think_tokens, max_answer_tokens=max_answer_tokens if decode_answers else 0,
        temperature=temperature, top_p=top_p, answer_temperature=answer_temperature,
    )  # fmt: skip
    backend_option = {} if backend is None else {"backend": backend}  # an engine-specific option
    parts = dict(features=[], positions=[], counts=[], correct=[], finished=[], valid=[], problem=[], tokens=[])
    prompt_token_ids, texts, answers = [], [], []
    for index, prompt in enumerate(_progress(prompts, "collect", progress)):
        result = model.generate(
            prompt, **settings, **backend_option, seed=seed + index, return_features=True, answer_all=decode_answers
        )
        prompt_token_ids.append(result.prompt_token_ids)
        for candidate in result.candidates:
            answer = candidate.answer if decode_answers else None
            verdict = None  # a row that never closed its thinking is a format failure
            if candidate.finished:
                verdict = _verdict(verifier(prompt, answer if decode_answers else candidate.text))
            parts["features"].append(candidate.step_features.cpu())
            parts["positions"] += candidate.score_positions
            parts["counts"].append(len(candidate.score_positions))
            parts["correct"].append(verdict is True)
            parts["finished"].append(candidate.finished)
            parts["valid"].append(verdict is not None)
            parts["problem"].append(index)
            parts["tokens"].append(candidate.token_ids)
            texts.append(candidate.text)
            answers.append(answer)
    info = dict(settings, seed=seed, label_from=label_from, model=model.info().path)
    return RolloutSet(
        features=torch.cat(parts["features"]),
        offsets=_csr(parts["counts"]),
        step_positions=torch.tensor(parts["positions"], dtype=torch.int64),
        correct=torch.tensor(parts["correct"], dtype=torch.bool),
        finished=torch.tensor(parts["finished"], dtype=torch.bool),
        valid=torch.tensor(parts["valid"], dtype=torch.bool),
        problem_id=torch.tensor(parts["problem"], dtype=torch.int64),
        token_ids=torch.tensor([t for tokens in parts["tokens"] for t in tokens], dtype=torch.int64),
        token_offsets=_csr([len(tokens) for tokens in parts["tokens"]]),
        prompts=list(prompts),
        prompt_token_ids=prompt_token_ids,
        texts=texts,
        answers=answers,
        info=info,
    )


def _verdict(value) -> bool | None:
    if value is None:
        return None
    if value not in (True, False):  # bool, numpy bool, 0 / 1
        raise ValueError(f"verifier: expected it to return True, False or None, got {value!r:.80}")
    return bool(value)


def _csr(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)


# -- metrics ----------------------------------------------------------------------------------------------------


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
    for chunk in _chunks(rollouts, index, max_rows=1 << 16):
        hidden, offsets = _gather(rollouts, chunk, weights[0].device, weights[0].dtype)
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


# -- training ---------------------------------------------------------------------------------------------------


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
    loss: float
    kept_correct: float  # share of the batch's steps of valid correct rollouts that the loss kept (NaN: none)
    kept_wrong: float


def split_problems(rollouts: RolloutSet, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) problem ids: a seeded random `eval_split` fraction of the problems that have rollouts (at
    least one when eval_split > 0), held out whole so that no problem is seen in training and evaluation."""
    problems = sorted(set(rollouts.problem_id.tolist()))
    if eval_split == 0:
        return problems, []
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(eval_split * len(problems)))
    if held_out >= len(problems):
        raise ValueError(f"eval_split: {eval_split} holds out all {len(problems)} problems, leaving none to train on")
    return sorted(problems[i] for i in order[held_out:]), sorted(problems[i] for i in order[:held_out])


def train_head(
    head: SPRMHead,
    rollouts: RolloutSet,
    *,
    mode: str = "spr",
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    batch_problems: int = 8,
    seed: int = 0,
    eval_split: float = 0.2,
    eval_every: int | None = None,
    dropout: float | None = None,
    balance: bool = True,
    positive_factor: float = 1.5,
    bce_warmup_steps: int = 0,
    output_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    backbone: str | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train `head` in place (fp32, on its device) on `rollouts` with AdamW and `spr_loss` (mode "spr" or "bce").

    Each step takes the rollouts of `batch_problems` training problems (shuffled every epoch); `steps` (None:
    `epochs` passes over the training problems) optimizer steps in all. `dropout` is the head's Dropout during
    training (None: the head's own p, 0.5 as in the reference). Metrics (`evaluate`) are taken on the held-out
    problems before training, every `eval_every` steps (None: 10 times in all) and at the end. Deterministic for a
    fixed seed (the split, the order and the dropout masks come from it) on one device and backend.
    `bce_warmup_steps` (mode "spr"): plain BCE for the first steps. The SPR filter drops the steps of wrong
    trajectories that the head judges positive and never pushes them back, so a head that starts (or drifts, with
    dropout noise) to all-positive logits stays there (the kept shares in the report show it); the shipped model's
    head needed half of its epochs of BCE first, then no dropout (`build_shipped.HEAD`).
    With `output_dir`, the final head is written there and every `checkpoint_every` steps into
    `checkpoint-<step>/`: `sprm_head.safetensors` + `score_module.pt` + `sprm_train.json` (the `backbone` it belongs
    to, the settings, the last metrics), and `train_report.json` at the end.
    """
    settings = _check_train_args(head, rollouts, locals())
    dropout = settings["dropout"] = head[2].p if dropout is None else dropout
    train_problems, eval_problems = split_problems(rollouts, eval_split, seed)
    batches_per_epoch = math.ceil(len(train_problems) / batch_problems)
    steps = epochs * batches_per_epoch if steps is None else steps
    eval_every = eval_every or max(1, math.ceil(steps / 10))
    head.to(torch.float32)  # in place; its Dropout module stays unused: sprm_step_logits applies `dropout`
    device = head[0].weight.device
    weights = [head[0].weight, head[0].bias, head[3].weight, head[3].bias]
    optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=weight_decay)
    order_generator = torch.Generator().manual_seed(seed)
    dropout_generator = torch.Generator(device=device).manual_seed(seed)
    report = TrainReport(
        eval_on="held-out" if eval_problems else "train", train_problems=train_problems,
        eval_problems=eval_problems, settings=settings,
    )  # fmt: skip
    eval_set = eval_problems or train_problems
    by_problem = rollouts.rollouts_by_problem()

    def checkpoint(directory, step: int) -> None:
        head.save_pretrained(directory, save_pt=True)
        metrics = {name: getattr(report, name)[-1] for name in CURVES}  # the latest evaluation
        info = dict(backbone=backbone, step=step, hidden_size=head.hidden_size, settings=settings, metrics=metrics)
        with open(os.path.join(directory, TRAIN_INFO), "w", encoding="utf-8") as file:
            json.dump(info, file, indent=1)
        report.checkpoints.append(str(directory))

    def record(step: int, recent: list[StepStats]) -> None:
        report.add(step, recent, evaluate(head, rollouts, eval_set, backend=backend))
        _log(report.line(), bar)

    bar = _progress_bar(steps, f"train ({mode})", progress)
    step, recent, epoch_batches = 0, [], []
    record(0, [])
    while step < steps:
        if not epoch_batches:
            order = torch.randperm(len(train_problems), generator=order_generator).tolist()
            shuffled = [train_problems[i] for i in order]
            epoch_batches = [shuffled[i : i + batch_problems] for i in range(0, len(shuffled), batch_problems)]
        batch = [rollout for problem in epoch_batches.pop(0) for rollout in by_problem[problem]]
        step_mode = "bce" if step < bce_warmup_steps else mode
        stats = _train_step(weights, optimizer, rollouts, batch, step_mode, balance, positive_factor, dropout,
                            dropout_generator, backend)  # fmt: skip
        step += 1
        report.losses.append(stats.loss)
        recent.append(stats)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}")
        if step % eval_every == 0 or step == steps:
            record(step, recent)
            recent = []
        if output_dir is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            checkpoint(os.path.join(output_dir, f"checkpoint-{step:06d}"), step)
    if bar is not None:
        bar.close()
    if output_dir is not None:
        checkpoint(output_dir, step)
        with open(os.path.join(output_dir, REPORT_NAME), "w", encoding="utf-8") as file:
            file.write(report.to_json())
    head.eval()
    return report


def _train_step(weights, optimizer, rollouts, index, mode, balance, positive_factor, dropout, generator,
                backend) -> StepStats:  # fmt: skip
    """One AdamW step on the rollouts `index`."""
    device = weights[0].device
    hidden, offsets = _gather(rollouts, index, device, torch.float32)
    if hidden.shape[0] == 0:  # no scored step in the whole batch: nothing to learn, no decay-only update
        return StepStats(0.0, math.nan, math.nan)
    step_index = torch.arange(hidden.shape[0], device=device)
    logits = sprm_step_logits(hidden, step_index, *weights, dropout=dropout, generator=generator, backend=backend)
    correct, valid = rollouts.correct[index].to(device), rollouts.valid[index].to(device)
    loss, details = spr_loss(logits, offsets, correct, valid, mode=mode, balance=balance,
                             positive_factor=positive_factor, return_details=True)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    counts = offsets[1:] - offsets[:-1]
    correct_steps = int(((correct & valid).long() * counts).sum())
    wrong_steps = int(((~correct & valid).long() * counts).sum())
    return StepStats(
        loss.item(),
        int(details.num_pos) / correct_steps if correct_steps else math.nan,
        int(details.num_neg) / wrong_steps if wrong_steps else math.nan,
    )


def _gather(rollouts: RolloutSet, index: list[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [S_b, H] of the rollouts `index`, back to back, and their CSR offsets [B+1]) on `device`."""
    index_t = torch.tensor(index, dtype=torch.int64)
    starts, ends = rollouts.offsets[index_t], rollouts.offsets[index_t + 1]
    counts = ends - starts
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = torch.repeat_interleave(starts - offsets[:-1], counts) + torch.arange(int(offsets[-1]))
    return rollouts.features[rows].to(device=device, dtype=dtype), offsets.to(device)


def _chunks(rollouts: RolloutSet, index: list[int], max_rows: int):
    """`index` in consecutive pieces of at most `max_rows` feature rows (one rollout over the limit alone)."""
    counts = (rollouts.offsets[1:] - rollouts.offsets[:-1]).tolist()
    chunk, rows = [], 0
    for rollout in index:
        if chunk and rows + counts[rollout] > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(rollout)
        rows += counts[rollout]
    if chunk:
        yield chunk


def _check_train_args(head, rollouts, args: dict) -> dict:
    """ValueError naming the first bad argument of `args` (train_head's arguments); returns those worth recording."""
    if not isinstance(head, SPRMHead):
        raise ValueError(f"head: expected an SPRMHead, got {type(head).__name__}")
    if not isinstance(rollouts, RolloutSet):
        raise ValueError(f"rollouts: expected a RolloutSet, got {type(rollouts).__name__}")
    if head.hidden_size != rollouts.hidden_size:
        raise ValueError(
            f"head: expected hidden size H={rollouts.hidden_size} (the rollouts' features), got H={head.hidden_size}"
        )
    if args["mode"] not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {args['mode']!r}")
    positive_ints = [("epochs", False), ("batch_problems", False), ("steps", True), ("eval_every", True),
                     ("checkpoint_every", True)]  # fmt: skip
    warmup = args["bce_warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"bce_warmup_steps: expected an int >= 0, got {warmup!r}")
    for name, optional in positive_ints:
        value = args[name]
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1{' or None' if optional else ''}, got {value!r}")
    for name, low, high in (("lr", 0, math.inf), ("weight_decay", 0, math.inf), ("eval_split", 0, 1),
                            ("positive_factor", 0, math.inf)):  # fmt: skip
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
            raise ValueError(f"{name}: expected a number in [{low}, {high}), got {value!r}")
    dropout = args["dropout"]
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):  # fmt: skip
        raise ValueError(f"dropout: expected a probability in [0, 1) or None, got {dropout!r}")
    if isinstance(args["seed"], bool) or not isinstance(args["seed"], int):
        raise ValueError(f"seed: expected an int, got {args['seed']!r}")
    if not isinstance(args["balance"], bool):
        raise ValueError(f"balance: expected a bool, got {args['balance']!r}")
    if not rollouts.num_rollouts:
        raise ValueError("rollouts: expected at least one rollout, got none")
    names = ("mode", "steps", "epochs", "lr", "weight_decay", "batch_problems", "seed", "eval_split", "dropout",
             "balance", "positive_factor", "bce_warmup_steps")  # fmt: skip
    return {name: args[name] for name in names}


# -- progress -----------------------------------------------------------------------------------------------------


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description)


def _progress(items, description: str, enabled: bool):
    """Iterate `items` with a tqdm bar, or plain prints of the count when tqdm is not installed."""
    bar = _progress_bar(len(items), description, enabled)
    for done, item in enumerate(items, start=1):
        yield item
        if bar is not None:
            bar.update(1)
        elif enabled:
            print(f"{description}: {done}/{len(items)}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()


def _log(message: str, bar) -> None:
    if bar is not None:
        bar.write(message)
    else:
        print(message, flush=True)


# -- command line -------------------------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number_verifier(references: dict) -> Verifier:
    """A verifier for prompts with known numeric answers: the last number in the answer equals the prompt's
    reference (as a number); None (format failure) when the answer has no number."""

    def verify(prompt, answer: str):
        reference = references.get(_prompt_key(prompt))
        if reference is None:
            raise ValueError(f"verifier: no reference for the prompt {prompt!r:.80}")
        found = NUMBER.findall(answer or "")
        return float(found[-1]) == float(reference) if found else None

    return verify


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def load_verifier(spec: str) -> Verifier:
    """A verifier from "package.module:function" or "path/to/file.py:function"."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"verifier: expected 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("sprm_user_verifier", module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, function)


def read_prompts(path: str) -> tuple[list, dict]:
    """(prompts, references by prompt): JSON lines {"prompt": text or messages, "reference": optional answer}, or
    plain text, one prompt per line."""
    prompts, references = [], {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                record = json.loads(line)
                prompts.append(record["prompt"])
                if "reference" in record:
                    references[_prompt_key(record["prompt"])] = record["reference"]
            else:
                prompts.append(line.rstrip("\n"))
    return prompts, references


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sprm_kernels.model.train", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gather = commands.add_parser("collect", help="sample k rollouts per prompt, label them, save a RolloutSet")
    gather.add_argument("--model", required=True, help="official-layout folder (HF model + tokenizer + head)")
    gather.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf (transformers) or vllm")
    gather.add_argument("--prompts", required=True, help="JSON lines {prompt, reference} or one prompt per line")
    gather.add_argument("--out", required=True, help="directory for rollouts.safetensors + rollouts.json")
    gather.add_argument("--verifier", help="module:function or file.py:function; default: last number == reference")
    gather.add_argument("--k", type=int, default=8)
    gather.add_argument("--label-from", choices=LABEL_SOURCES, default="answer")
    gather.add_argument("--max-think-tokens", type=int, default=4096)
    gather.add_argument("--max-answer-tokens", type=int, default=1024)
    gather.add_argument("--temperature", type=float, default=0.6)
    gather.add_argument("--top-p", type=float, default=0.95)
    gather.add_argument("--answer-temperature", type=float)
    gather.add_argument("--seed", type=int, default=0)
    gather.add_argument("--device")
    gather.add_argument("--backend", choices=("torch", "triton"))
    from sprm_kernels.model.ray.cluster import add_ray_arguments, workers_from_args

    add_ray_arguments(gather, out_help="with --ray: stream per-prompt summaries to this .jsonl / .parquet file",
                      out_flag="--rows")  # fmt: skip
    gather.add_argument("--quiet", action="store_true", help="no progress on stderr")

    fit = commands.add_parser("fit", help="train a head on saved rollouts, write checkpoints")
    fit.add_argument("--rollouts", required=True, help="a directory written by collect")
    fit.add_argument("--out", required=True, help="directory for the head files, checkpoints and the report")
    fit.add_argument("--init", help="start from the head in this folder (default: a fresh head, seeded)")
    fit.add_argument("--backbone", help="recorded in sprm_train.json (default: the model the rollouts came from)")
    fit.add_argument("--mode", choices=MODES, default="spr")
    fit.add_argument("--steps", type=int)
    fit.add_argument("--epochs", type=int, default=1)
    fit.add_argument("--lr", type=float, default=1e-4)
    fit.add_argument("--weight-decay", type=float, default=1e-2)
    fit.add_argument("--batch-problems", type=int, default=8)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--eval-split", type=float, default=0.2)
    fit.add_argument("--eval-every", type=int)
    fit.add_argument("--checkpoint-every", type=int)
    fit.add_argument("--dropout", type=float)
    fit.add_argument("--bce-warmup-steps", type=int, default=0, help="mode spr: plain BCE for the first N steps")
    fit.add_argument("--no-balance", action="store_true", help="turn off the reference's class balancing")
    fit.add_argument("--device")
    fit.add_argument("--backend", choices=("torch", "triton"))
    fit.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    if args.command == "collect":
        prompts, references = read_prompts(args.prompts)
        if args.verifier:
            verifier = load_verifier(args.verifier)
        elif references:
            verifier = last_number_verifier(references)
        else:
            parser.error("--verifier is needed when the prompts carry no 'reference'")
        workers = workers_from_args(gather, args)
        options = dict(
            label_from=args.label_from, max_think_tokens=args.max_think_tokens,
            max_answer_tokens=args.max_answer_tokens, temperature=args.temperature, top_p=args.top_p,
            answer_temperature=args.answer_temperature, seed=args.seed, progress=not args.quiet,
        )  # fmt: skip
        if workers is not None:  # --ray: the same rollouts from a pool of Ray actors (jobs/ray_collect.py)
            from sprm_kernels.model.ray.collect_job import collect_on_ray

            engine_kwargs = {"backend": args.backend, **({"device": args.device} if args.device else {})}
            rollouts = collect_on_ray(
                args.model, prompts, verifier, args.k, engine=args.engine, address=args.ray,
                engine_kwargs=engine_kwargs, workers=workers, rows=args.rows, **options,
            )  # fmt: skip
        else:
            model = load_engine(args.model, engine=args.engine, device=args.device, backend=args.backend)
            rollouts = collect(model, prompts, verifier, args.k, **options)
        rollouts.info["model"] = args.model
        rollouts.save(args.out)
        valid = rollouts.valid
        print(f"{rollouts.num_rollouts} rollouts of {rollouts.num_problems} prompts, {int(valid.sum())} valid, "
              f"{int((rollouts.correct & valid).sum())} correct, {rollouts.features.shape[0]} scored steps "
              f"-> {args.out}")  # fmt: skip
        return 0

    rollouts = RolloutSet.load(args.rollouts)
    if args.init:
        head = SPRMHead.from_pretrained(args.init)
    else:
        torch.manual_seed(args.seed)
        head = SPRMHead(rollouts.hidden_size)
    if args.device:
        head.to(args.device)
    report = train_head(
        head, rollouts, mode=args.mode, steps=args.steps, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, batch_problems=args.batch_problems, seed=args.seed,
        eval_split=args.eval_split, eval_every=args.eval_every, dropout=args.dropout, balance=not args.no_balance,
        bce_warmup_steps=args.bce_warmup_steps, output_dir=args.out, checkpoint_every=args.checkpoint_every,
        backbone=args.backbone or rollouts.info.get("model"), backend=args.backend, progress=not args.quiet,
    )  # fmt: skip
    print(f"head -> {args.out} ({report.eval_on} problems: {len(report.eval_problems or report.train_problems)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
