"""`sprm eval --prune`: best-of-k against SPRM-guided pruning of the same rows, accuracy against thinking tokens.

Every configuration generates k rows for each of the same held-out problems with the same seed, so every row is
the same sample in every configuration up to where pruning stops it (each row has its own seed on the vLLM
engine): the configurations differ only by which rows were stopped and when. Accuracy is that of the chosen
candidate (the answer is the last step's sum of its thinking, as in `compute_view`); tokens are the thinking
tokens written per problem (`stats.think_generated_tokens`, pruned rows' included). The paired difference to
best-of-k (the same problems, the same rows) has a tighter CI than either accuracy alone.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from sprm_kernels.model.core.threads import set_threads
from sprm_kernels.model.evaluation.best_of_k import ci95, task_settings
from sprm_kernels.model.evaluation.compute_view import think_budget
from sprm_kernels.model.shipped import SHIPPED_DIR, task


def configurations(
    rules=("margin", "halving"), margins=(0.5, 1.0, 2.0), keeps=(1, 2, 4), every: int = 1, warmup: int = 2,
    window: int = 16,
) -> list:  # fmt: skip
    """(name, GenerationParams options) of best-of-k and of each pruning rule's settings; confidence: DeepConf-high
    and DeepConf-low (threshold at the 10th / 90th percentile of the warm-up rows' lowest window confidence)."""
    out = [("best-of-k", {})]
    for rule in rules:
        if rule == "margin":
            out += [(f"margin {m:g}", {"prune": "margin", "prune_margin": float(m), "prune_every": every,
                                       "prune_keep": 1}) for m in margins]  # fmt: skip
        elif rule == "halving":
            out += [(f"halving keep {q}", {"prune": "halving", "prune_keep": int(q), "prune_every": every})
                    for q in keeps]  # fmt: skip
        elif rule == "hybrid":
            out += [(f"hybrid {m:g} keep {q}", {"prune": "hybrid", "prune_margin": float(m), "prune_keep": int(q),
                                                "prune_every": every}) for m in margins for q in keeps]  # fmt: skip
        elif rule == "confidence":
            out += [(f"DeepConf-{name} warm-up {warmup}", {"prune": "confidence", "confidence_percentile": percentile,
                                                          "confidence_warmup": warmup, "confidence_window": window})
                    for name, percentile in (("high", 10.0), ("low", 90.0))]  # fmt: skip
        else:
            raise ValueError(f"rules: expected margin, halving, hybrid or confidence, got {rule!r}")
    return out


def pruning_view(
    model_dir: str | None = None,
    *,
    engine: str = "vllm",
    n: int = 200,
    k: int = 8,
    configs=None,
    seed: int = 0,
    difficulty: int | None = None,
    temperature: float | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Rows {method, accuracy, ci95, tokens, tokens_share, diff, diff_ci95, pruned_rows, seconds} per configuration
    (`configurations()` by default) on n test problems."""
    from sprm_kernels.model.engines.base import supports_prompt_lists
    from sprm_kernels.model.engines.registry import load_engine

    model_dir = model_dir or SHIPPED_DIR
    temperature, difficulty = task_settings(model_dir, temperature, difficulty)
    problems = task.problems("test", n, seed=seed, difficulty=difficulty)
    rm = load_engine(model_dir, engine=engine, device="cpu", backend="torch")
    info = rm.info()
    set_threads(threads, device=info.device, num_parameters=info.num_parameters)
    options = dict(k=k, temperature=temperature, top_p=1.0, max_think_tokens=think_budget(difficulty),
                   max_answer_tokens=0)  # fmt: skip
    rows, reference = [], None
    for name, extra in configs or configurations():
        began = time.perf_counter()
        if supports_prompt_lists(rm):
            results = rm.generate([p.prompt for p in problems], seed=seed, **options, **extra)
        else:
            results = [rm.generate(p.prompt, seed=seed * 1_000_003 + i, **options, **extra)
                       for i, p in enumerate(problems)]  # fmt: skip
        seconds = time.perf_counter() - began
        correct = np.array([float(chosen_is_correct(problem, r)) for problem, r in zip(problems, results, strict=True)])
        tokens = np.array([r.stats.think_generated_tokens for r in results], dtype=float)
        if reference is None:
            reference = (correct, tokens)
        row = {
            "method": name, "options": extra, "accuracy": float(correct.mean()), "ci95": ci95(correct),
            "tokens": float(tokens.mean()), "tokens_share": float(tokens.sum() / reference[1].sum()),
            "diff": float((correct - reference[0]).mean()), "diff_ci95": ci95(correct - reference[0]),
            "pruned_rows": float(np.mean([r.stats.pruned_rows for r in results])),
            "seconds": seconds,
        }  # fmt: skip
        rows.append(row)
        if progress:
            print(f"  {name}: accuracy {row['accuracy']:.3f}, {row['tokens']:.0f} tokens", file=sys.stderr)
    return {"model_dir": model_dir, "engine": engine, "n": n, "k": k, "difficulty": difficulty, "seed": seed,
            "temperature": temperature, "rows": rows}  # fmt: skip


def chosen_is_correct(problem, result) -> bool:
    chosen = result.candidates[result.best]
    return task.is_correct(problem, task.answer_from_thinking(chosen.text) if chosen.finished else None)


def format_table(result: dict) -> str:
    lines = [
        f"n={result['n']} test problems of {result['difficulty']} terms, best-of-{result['k']} on {result['engine']}, "
        f"temperature {result['temperature']}, seed {result['seed']}",
        "| method | accuracy | minus best-of-k | thinking tokens | share | pruned rows | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} ± {r['ci95']:.3f} | {r['diff']:+.3f} ± "
                     f"{r['diff_ci95']:.3f} | {r['tokens']:.1f} | {r['tokens_share']:.0%} | {r['pruned_rows']:.2f} | "
                     f"{r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)
