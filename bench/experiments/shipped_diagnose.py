"""Verdict accuracy of a built policy and what its verdicts alone would select: `python bench/experiments/
shipped_diagnose.py DIR [N] [DIFFICULTY] [TEMPERATURE]` (validation split, k = 32)."""

import sys
from collections import Counter

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sprm_kernels.model import ReflectiveModel, SPRMHead
from sprm_kernels.model.evaluation.best_of_k import sample_candidates
from sprm_kernels.model.shipped import task

torch.set_num_threads(1)
folder = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 60
difficulty = int(sys.argv[3]) if len(sys.argv) > 3 else task.DEFAULT_DIFFICULTY
temperature = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
model = AutoModelForCausalLM.from_pretrained(folder).eval()
rm = ReflectiveModel(model, AutoTokenizer.from_pretrained(folder), SPRMHead(model.config.hidden_size), backend="torch")
problems = task.problems("validation", n, seed=5, difficulty=difficulty)
samples = sample_candidates(rm, problems, k=32, temperature=temperature, seed=5)
counts, verdict_choice = Counter(), []
for problem, texts, correct in zip(problems, samples["texts"], samples["correct"], strict=True):
    all_yes = []
    for text in texts:
        info = task.step_errors(problem, text)
        all_yes.append(info is not None and not any(info["verdict_no"]))
        if info is None:
            counts["bad format or step count"] += 1
            continue
        keys = ("wrong_sum", "wrong_operand", "verdict_no")
        for wrong_sum, wrong_operand, no in zip(*(info[key] for key in keys), strict=True):
            counts[f"sum {'wrong' if wrong_sum else 'right'}  operand {'wrong' if wrong_operand else 'right'}  "
                   f"verdict {'n' if no else 'y'}"] += 1  # fmt: skip
    all_yes, correct = np.array(all_yes), np.array(correct, dtype=float)
    verdict_choice.append((correct[all_yes] if all_yes.any() else correct).mean())  # random among all-`y`
for key, value in sorted(counts.items()):
    print(f"{value:6d}  {key}")
correct = np.array(samples["correct"], dtype=float)
print(f"pass@1 {correct.mean():.3f}  oracle@32 {correct.max(1).mean():.3f}  "
      f"best-of-32 by the policy's verdicts (random among all-y) {np.mean(verdict_choice):.3f}")  # fmt: skip
