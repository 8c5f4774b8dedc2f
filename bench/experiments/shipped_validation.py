"""Validation-split selection metrics of a built folder: `python bench/experiments/shipped_validation.py DIR [N]`."""

import json
import sys

import torch

from sprm_kernels.model.evaluation.best_of_k import evaluate, format_table

torch.set_num_threads(2)
result = evaluate(sys.argv[1], n=int(sys.argv[2]) if len(sys.argv) > 2 else 200, split="validation", progress=False)
print(format_table(result))
print(
    json.dumps(
        {
            key: result[key]
            for key in (
                "within_problem_gap",
                "overall_gap",
                "sprm_minus_random",
                "finished_rate",
                "answer_agreement",
                "seconds",
            )
        },
        indent=1,
    )
)
