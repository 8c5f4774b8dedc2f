"""Head recipes on one built policy, measured within problems on the validation split (scratch experiment).

`python bench/experiments/shipped_heads.py DIR [RECIPE,...]`: samples the builder's training rollouts and 200
validation problems x 32 candidates once, trains each recipe (overrides of `shipped.build.HEAD`) on the frozen
layer L-2 features, and prints best-of-k and the within-problem gap of each head (no regeneration per head).
"""

import sys

import torch

from sprm_kernels.model import ReflectiveModel
from sprm_kernels.model.evaluation.best_of_k import sample_candidates, selection_metrics, within_problem_gap
from sprm_kernels.model.shipped import build, task

RECIPES = {
    "shipped-spr": ("spr", {}),
    "shipped-bce": ("bce", {}),
    "spr-warmup-2": ("spr", {"bce_warmup_epochs": 2, "spr_dropout": 0.5}),
    "spr-warmup-2-no-dropout": ("spr", {"bce_warmup_epochs": 2}),
    "spr-warmup-20-dropout": ("spr", {"spr_dropout": 0.5}),
    "spr-no-warmup": ("spr", {"bce_warmup_epochs": 0}),
}

torch.set_num_threads(1)
rm = ReflectiveModel.from_pretrained(sys.argv[1], device="cpu", backend="torch")
chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(RECIPES)
train_problems = task.problems("train", build.ROLLOUTS["problems"], seed=build.ROLLOUTS["seed"])
train = sample_candidates(
    rm, train_problems, k=build.ROLLOUTS["k"], temperature=build.ROLLOUTS["temperature"], seed=build.ROLLOUTS["seed"]
)
features, offsets = build.step_features(rm, [s for per in train["sequences"] for s in per])
correct = torch.tensor([c for per in train["correct"] for c in per], dtype=torch.bool)
balanced = build.within_problem_balanced(train["correct"], seed=build.HEAD["seed"])
val_problems = task.problems("validation", 200, seed=0)
val = sample_candidates(rm, val_problems, k=32, temperature=1.0, seed=0)
shipped_recipe = dict(build.HEAD)
for name in chosen:
    mode, overrides = RECIPES[name]
    build.HEAD.clear()
    build.HEAD.update(shipped_recipe, **overrides)
    head = build.train_head(features, offsets, correct, mode=mode, trajectories=balanced, log=lambda *_: None)
    scorer = ReflectiveModel(rm.model, rm.tokenizer, head, backend="torch")
    scores = [[r.value for r in scorer.score(sequences)] for sequences in val["sequences"]]
    samples = dict(val, scores=scores)
    accuracy = {k: float(v.mean()) for k, v in selection_metrics(samples, val_problems, (2, 8, 32))["sprm"].items()}
    cells = " ".join(f"k={k} {value:.3f}" for k, value in accuracy.items())
    print(f"{name:26s} {cells}  within-problem gap {within_problem_gap(samples, scores):.3f}", flush=True)
