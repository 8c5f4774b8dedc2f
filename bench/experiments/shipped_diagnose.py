"""Verdict accuracy of a built policy and what each head picks: `python bench/experiments/shipped_diagnose.py DIR`."""

import sys
from collections import Counter

import numpy as np
import torch

from sprm_kernels.model import ReflectiveModel, SPRMHead, task
from sprm_kernels.model.evaluate import sample_candidates

torch.set_num_threads(1)
folder = sys.argv[1]
rm = ReflectiveModel.from_pretrained(folder, device="cpu", backend="torch")
bce = ReflectiveModel(rm.model, rm.tokenizer, SPRMHead.from_pretrained(folder + "/bce_head"), backend="torch")
problems = task.problems("validation", 40, seed=5)
samples = sample_candidates(rm, problems, k=32, temperature=1.0, seed=5)
counts = Counter()
for problem, texts in zip(problems, samples["texts"], strict=True):
    for text in texts:
        info = task.step_errors(problem, text)
        if info is None:
            counts["bad format or step count"] += 1
            continue
        keys = ("wrong_sum", "wrong_recheck", "wrong_operand", "verdict_no")
        for ws, wr, wo, no in zip(*(info[key] for key in keys), strict=True):
            counts[
                f"sum {'wrong' if ws else 'right'} recheck {'wrong' if wr else 'right'} "
                f"operand {'wrong' if wo else 'right'} verdict {'n' if no else 'y'}"
            ] += 1
for key, value in sorted(counts.items()):
    print(f"{value:6d}  {key}")
for name, model in (("spr", rm), ("bce", bce)):
    print(name)
    for i in range(3):
        scores = [r.value for r in model.score(samples["sequences"][i], return_all_scores=True)]
        order = np.argsort(scores)[::-1]
        for j in list(order[:2]) + list(order[-1:]):
            print(f"  {scores[j]:.3f} {samples['correct'][i][j]} {samples['texts'][i][j]!r}")
