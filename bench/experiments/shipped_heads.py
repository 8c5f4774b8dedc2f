"""Head variants on one built policy, measured within problems on the validation split (scratch experiment).

`python bench/experiments/shipped_heads.py DIR`: collects training rollouts and validation candidates once, trains
each head variant on frozen features, and prints best-of-k with every head (no regeneration per head).
"""

import sys
import time

import numpy as np
import torch

from sprm_kernels.model import ReflectiveModel, task
from sprm_kernels.model import build_shipped as build
from sprm_kernels.model.evaluate import sample_candidates, selection_metrics, within_problem_gap

torch.set_num_threads(1)
start = time.time()
rm = ReflectiveModel.from_pretrained(sys.argv[1], device="cpu", backend="torch")
train_problems = task.problems("train", build.ROLLOUTS["problems"], seed=build.ROLLOUTS["seed"])
train = sample_candidates(rm, train_problems, k=16, temperature=1.0, seed=build.ROLLOUTS["seed"])
features, offsets = build.step_features(rm, [s for per in train["sequences"] for s in per])
correct = torch.tensor([c for per in train["correct"] for c in per])
val_problems = task.problems("validation", 200, seed=0)
val = sample_candidates(rm, val_problems, k=32, temperature=1.0, seed=0)
val_features, val_offsets = build.step_features(rm, [s for per in val["sequences"] for s in per])
print(f"data {time.time() - start:.0f}s", flush=True)


def scores_of(head):
    with torch.no_grad():
        logp = torch.nn.functional.logsigmoid(head(val_features).squeeze(-1).float()).clamp(min=np.log(1e-10))
    means = (
        torch.segment_reduce(logp, "mean", offsets=val_offsets).exp().nan_to_num(0.0).tolist()
    )  # geometric mean per candidate
    return [means[i * 32 : (i + 1) * 32] for i in range(len(val_problems))]


def verdict_scores():  # the policy's own verdicts: share of `y` steps (no head)
    out = []
    for texts in val["texts"]:
        steps = [task.parse_steps(t) for t in texts]
        out.append([np.mean([v == "y" for *_, v in s]) if s else 0.0 for s in steps])
    return out


def report(name, scores):
    samples = dict(val, scores=scores)
    acc = {
        m: {k: float(v.mean()) for k, v in by_k.items()}
        for m, by_k in selection_metrics(samples, val_problems, (1, 8, 32)).items()
    }
    print(
        f"{name:28s} bo8 {acc['sprm'][8]:.3f} bo32 {acc['sprm'][32]:.3f}  wvote32 {acc['sprm_vote'][32]:.3f} "
        f"gap {within_problem_gap(samples, scores):+.3f} | pass@1 {acc['pass@1'][1]:.3f} maj8 {acc['majority'][8]:.3f} "
        f"oracle8 {acc['oracle'][8]:.3f}",
        flush=True,
    )


report("policy verdicts (no head)", verdict_scores())
# Teacher-forced reference traces with corrupted sums (12%), labelled by the verifier: here correctness comes from a
# random corruption, independent of how hard the step is.
import random  # noqa: E402

rng = random.Random(7)
synthetic_problems = task.problems("train", 6144, seed=77)
synthetic = [build.encode_example(rm.tokenizer, p, rng) for p in synthetic_problems]
syn_correct = []
for problem, (ids, start_at) in zip(synthetic_problems, synthetic, strict=True):
    syn_correct.append(
        task.is_correct(problem, rm.tokenizer.decode(ids[start_at:], skip_special_tokens=True).split("</think>")[-1])
    )
syn_features, syn_offsets = build.step_features(rm, [ids for ids, _ in synthetic])
syn_correct = torch.tensor(syn_correct)
print(f"synthetic: {syn_correct.float().mean():.3f} correct", flush=True)
mixed_features = torch.cat([features, syn_features])
mixed_offsets = torch.cat([offsets, syn_offsets[1:] + offsets[-1]])
mixed_correct = torch.cat([correct, syn_correct])
balanced = build.within_problem_balanced(train["correct"], seed=0)
print(f"balanced: {len(balanced)} of {len(correct)} trajectories", flush=True)
variants = {
    "balanced spr warm2 40 b128": dict(mode="spr", epochs=40, bce_warmup_epochs=2, balanced=True, batch=128),
    "synthetic spr warm2 b128": dict(mode="spr", epochs=40, bce_warmup_epochs=2, batch=128, data="syn"),
    "synthetic bce b128": dict(mode="bce", epochs=40, batch=128, data="syn"),
    "mixed spr warm2 b128": dict(mode="spr", epochs=40, bce_warmup_epochs=2, batch=128, data="mix"),
    "mixed bce b128": dict(mode="bce", epochs=40, batch=128, data="mix"),
}
defaults = dict(build.HEAD)
for name, variant in variants.items():
    build.HEAD.clear()
    build.HEAD.update(defaults, **{k: v for k, v in variant.items() if k not in ("mode", "balanced", "data")})
    subset = balanced if variant.get("balanced") else None
    data = {"syn": (syn_features, syn_offsets, syn_correct), "mix": (mixed_features, mixed_offsets, mixed_correct)}
    head = build.train_head(
        *data.get(variant.get("data"), (features, offsets, correct)),
        mode=variant["mode"],
        trajectories=subset,
        log=lambda *a: None,
    )
    report(name, scores_of(head))
