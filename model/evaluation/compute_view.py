"""`sprm eval --search`: accuracy against decoded thinking tokens, best-of-k and voting against step-level search.

Every method answers the same held-out problems of the shipped task, on one engine (`--engine hf` or `vllm`).
Best-of-k, majority and SPRM-weighted voting use k candidates sampled once (`evaluate.sample_candidates`,
k-subsets of k_max, as in `sprm eval`); their cost at k is k times the mean thinking length. Beam search and DVTS
(the engine's `search`) run per problem and budget (beam width B, E children per survivor); their cost is every
thinking token they sampled, pruned rows included. The answer is the last step's sum of the chosen thinking for
every method (the task makes it a function of the thinking), so no answer tokens are counted anywhere.

The search overhead is the share of the search's time spent outside the engine's model work: on HF, the wall time
of `search` less its forwards (`stats.seconds["forward"]`); on vLLM, the thinking phase less the time inside
vLLM's calls (`1 - seconds["engine"] / seconds["think"]`: that includes vLLM's own scheduling and sampling, so it
is the search's Python, not a bound on what a faster model would leave).
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from sprm_kernels.model.core.threads import set_threads
from sprm_kernels.model.evaluation.best_of_k import ci95, sample_candidates, selection_metrics, task_settings
from sprm_kernels.model.shipped import SHIPPED_DIR, task

VOTE_METHODS = ("sprm", "majority", "sprm_vote")  # best-of-k family drawn from the same samples
NAMES = {"sprm": "SPRM best-of-k", "majority": "majority vote", "sprm_vote": "SPRM-weighted vote",
         "beam": "beam search", "dvts": "DVTS"}  # fmt: skip
OVERHEAD = {"hf": "all but the model's forwards", "vllm": "outside vLLM's calls"}  # what `search_overhead` leaves out


def think_budget(difficulty: int) -> int:
    """Thinking tokens a trace of `difficulty` terms needs (12 per step + `</think>`), with room for a slip."""
    return 12 * (difficulty - 1) + 12


def compute_view(
    model_dir: str | None = None,
    *,
    engine: str = "hf",
    rm=None,
    n: int = 100,
    ks=(1, 2, 4, 8, 16),
    widths=(1, 2, 4),
    expansions: int = 2,
    search_methods=("beam", "dvts"),
    seed: int = 0,
    difficulty: int | None = None,
    temperature: float | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Rows {method, budget, accuracy, ci95, tokens} for every method and budget (search rows also `seconds`:
    wall seconds per problem), the search overhead per method, and the goal checks.
    `engine`: "hf" or "vllm" (CPU, torch route); `rm`: an engine already loaded on `model_dir` (kept open),
    else one is loaded here and closed at the end."""
    from sprm_kernels.model.engines.base import supports_close
    from sprm_kernels.model.engines.registry import load_engine

    model_dir = model_dir or SHIPPED_DIR
    temperature, difficulty = task_settings(model_dir, temperature, difficulty)
    owned = rm is None
    rm = load_engine(model_dir, engine=engine, device="cpu", backend="torch") if owned else rm
    try:
        return _compute_view(rm, model_dir, n=n, ks=ks, widths=widths, expansions=expansions,
                             search_methods=search_methods, seed=seed, difficulty=difficulty, temperature=temperature,
                             progress=progress, threads=threads)  # fmt: skip
    finally:
        if owned and supports_close(rm):
            rm.close()


def _compute_view(rm, model_dir, *, n, ks, widths, expansions, search_methods, seed, difficulty, temperature,
                  progress, threads) -> dict:  # fmt: skip
    max_think = think_budget(difficulty)
    info = rm.info()
    set_threads(threads, device=info.device, num_parameters=info.num_parameters)  # else 1 for a small model
    problems = task.problems("test", n, seed=seed, difficulty=difficulty)
    start = time.perf_counter()
    samples = sample_candidates(rm, problems, k=max(ks), temperature=temperature, seed=seed,
                                max_think_tokens=max_think, progress=progress)  # fmt: skip
    prompt_lengths = [len(rm.prompt_ids(p.prompt)) for p in problems]
    think_lengths = [np.mean([len(s) - prompt_lengths[i] for s in seqs]) for i, seqs in enumerate(samples["sequences"])]
    per_problem = selection_metrics(samples, problems, ks, seed=seed)
    rows = []
    for method in VOTE_METHODS:
        for k in ks:
            values = per_problem[method][k]
            rows.append({"method": method, "budget": f"k={k}", "accuracy": float(values.mean()), "ci95": ci95(values),
                         "tokens": float(k * np.mean(think_lengths))})  # fmt: skip
    sampling_seconds = time.perf_counter() - start
    overhead = {}
    for method in search_methods:
        model = total = 0.0  # the model's work (HF: forwards; vLLM: its calls) and the search's time
        for width in widths:
            correct, tokens = [], []
            began_budget = time.perf_counter()
            for i, problem in enumerate(problems):
                began = time.perf_counter()
                result = rm.search(
                    problem.prompt, method=method, beam_width=width, expansions=expansions, temperature=temperature,
                    top_p=1.0, seed=seed * 1_000_003 + i, max_think_tokens=max_think, max_answer_tokens=0,
                )  # fmt: skip
                seconds = result.stats.seconds
                if info.engine == "vllm":
                    total += seconds["think"]
                    model += seconds["engine"]
                else:
                    total += time.perf_counter() - began
                    model += seconds["forward"]
                chosen = result.candidates[result.best]
                answer = task.answer_from_thinking(chosen.text) if chosen.finished else None
                correct.append(float(task.is_correct(problem, answer)))
                tokens.append(result.stats.think_generated_tokens)
            values = np.array(correct)
            rows.append({"method": method, "budget": f"B={width},E={expansions}", "accuracy": float(values.mean()),
                         "ci95": ci95(values), "tokens": float(np.mean(tokens)),
                         "seconds": (time.perf_counter() - began_budget) / n})  # fmt: skip
            if progress:
                print(
                    f"  {method} B={width}: accuracy {values.mean():.3f}, {np.mean(tokens):.0f} tokens", file=sys.stderr
                )
        overhead[method] = 1.0 - model / total if total else math.nan
    return {
        "model_dir": model_dir, "engine": info.engine, "n": n, "difficulty": difficulty, "seed": seed,
        "temperature": temperature, "expansions": expansions, "rows": rows, "search_overhead": overhead,
        "goals": goals(rows),
        "seconds": {"sampling": sampling_seconds, "total": time.perf_counter() - start},
    }  # fmt: skip


def _curve(rows, method):
    points = sorted((r["tokens"], r["accuracy"]) for r in rows if r["method"] == method)
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def goals(rows) -> dict:
    """Beam against best-of-k: the fewest tokens at which beam reaches best-of-k's accuracy at k = 8 (as a share
    of best-of-8's tokens), and at how many beam budgets beam lies above best-of-k's curve (interpolated in log
    tokens)."""
    reference = next((r for r in rows if r["method"] == "sprm" and r["budget"] == "k=8"), None)
    out = {}
    for method in ("beam", "dvts"):
        tokens, accuracy = _curve(rows, method)
        if not len(tokens) or reference is None:
            continue
        reached = tokens[accuracy >= reference["accuracy"]]
        bok_tokens, bok_accuracy = _curve(rows, "sprm")
        above = sum(
            1 for t, a in zip(tokens, accuracy, strict=True)
            if bok_tokens[0] <= t <= bok_tokens[-1] and a > np.interp(np.log(t), np.log(bok_tokens), bok_accuracy)
        )  # fmt: skip
        out[method] = {
            "tokens_share_to_reach_best_of_8": float(reached.min() / reference["tokens"]) if len(reached) else None,
            "budgets_above_best_of_k": int(above),
        }
    return out


def format_table(result: dict) -> str:
    engine = result.get("engine", "hf")
    lines = [f"n={result['n']} test problems of {result['difficulty']} terms, temperature {result['temperature']}, "
             f"seed {result['seed']}, {engine} engine",
             f"{'method':<20} {'budget':<10} {'accuracy':>14} {'tokens':>9} {'s/problem':>10}"]  # fmt: skip
    for r in result["rows"]:
        seconds = f"{r['seconds']:>10.3f}" if "seconds" in r else ""
        lines.append(f"{NAMES.get(r['method'], r['method']):<20} {r['budget']:<10} "
                     f"{r['accuracy']:>7.3f} ± {r['ci95']:.3f} {r['tokens']:>9.1f} {seconds}".rstrip())  # fmt: skip
    where = "of its thinking time" if engine == "vllm" else "of its wall time"
    for method, share in result["search_overhead"].items():
        lines.append(f"{NAMES[method]} overhead ({OVERHEAD.get(engine, OVERHEAD['hf'])}): {share:.1%} {where}")
    for method, goal in result["goals"].items():
        share = goal["tokens_share_to_reach_best_of_8"]
        reach = "never" if share is None else f"with {share:.0%} of its tokens"
        lines.append(f"{NAMES[method]}: reaches best-of-8's accuracy {reach}; above the best-of-k curve at "
                     f"{goal['budgets_above_best_of_k']} budgets")  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Accuracy against decoded thinking tokens (log scale), one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for method in ("sprm", "majority", "sprm_vote", "beam", "dvts"):
            tokens, accuracy = _curve(result["rows"], method)
            if len(tokens):
                ax.plot(tokens, accuracy, marker="o", label=NAMES[method])
        ax.set_xscale("log")
        ax.set_xlabel("decoded thinking tokens per problem")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{result['difficulty']} terms, n={result['n']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
