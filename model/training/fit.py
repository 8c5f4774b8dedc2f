"""Training the SPRM head on a frozen backbone (docs/method.md §6): `train_head` fits an `SPRMHead` on saved
rollouts (`training.rollouts.RolloutSet`, from `training.collect.collect`) with AdamW and `spr_loss`, evaluates it
on held-out problems (`training.metrics`) and writes checkpoints in the official layout (`score_module.pt` +
`sprm_head.safetensors`).

Command line: `sprm train collect ...` and `sprm train fit ...` (model/cli/train.py).
"""

from __future__ import annotations

import json
import math
import os

import torch

from sprm_kernels import spr_loss, sprm_step_logits
from sprm_kernels.loss import MODES
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.progress import log, progress_bar
from sprm_kernels.model.training.metrics import CURVES, StepStats, TrainReport, evaluate
from sprm_kernels.model.training.rollouts import RolloutSet, gather_features

TRAIN_INFO = "sprm_train.json"  # beside the head files: what was trained, from which backbone
REPORT_NAME = "train_report.json"


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
    head needed half of its epochs of BCE first, then no dropout (`shipped.build.HEAD`).
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
        log(report.line(), bar)

    bar = progress_bar(steps, f"train ({mode})", progress)
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
    hidden, offsets = gather_features(rollouts, index, device, torch.float32)
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
