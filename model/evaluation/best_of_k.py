"""`sprm eval`: best-of-k accuracy of the shipped model on held-out problems, against pass@1, voting, oracle, random.

For each problem, k_max = 32 thinking candidates are sampled once with `ReflectiveModel.generate` (one prefill, one
batched decode, every step scored by the SPR head on the fly) and rescored by the BCE head with `score`. Every
candidate's answer is the last step's sum of its thinking (`task.answer_from_thinking`): the task makes the answer
a deterministic function of the thinking, so no answer is decoded for the losing candidates. (generate still
writes the chosen candidate's answer; `answer_agreement` reports how often the policy copied the sum.) Each k < 32
is evaluated on random k-subsets of the 32 (fixed seed), the paper's scaling view: accuracy against log2 k.

The text-only baseline (`fewest_n`) needs no head at all: the shipped policy writes its own verdict (`y` / `n`)
right before each scored position, so it picks the finished candidate with the fewest written `n` verdicts
(random tie-break, seeded). What the head adds is SPRM minus this baseline (`sprm_minus_text_only`).
"""

from __future__ import annotations

import functools
import math
import os
import time

import numpy as np

from sprm_kernels.model.core.params import folder_sampling, folder_task
from sprm_kernels.model.core.progress import counter
from sprm_kernels.model.core.threads import set_threads
from sprm_kernels.model.shipped import SHIPPED_DIR, task

DEFAULT_KS = (1, 2, 4, 8, 16, 32)
SUBSETS = 64  # random k-subsets per problem and k (all 32 candidates once for k = 32)
METHODS = ("pass@1", "majority", "fewest_n", "sprm", "sprm_bce", "sprm_vote", "confidence", "confidence_vote", "oracle",
           "random")  # fmt: skip
NO_VERDICT = f" n{task.STEP}"  # how the policy writes a step it judged wrong


def sample_candidates(
    rm,
    problems,
    *,
    k: int,
    temperature: float,
    seed: int,
    max_think_tokens: int = 96,
    max_answer_tokens: int = 0,
    progress: bool = False,
    first_index: int = 0,
    confidence: bool = False,
) -> dict:
    """k thinking candidates per problem: sequences (prompt + thinking ids), texts, answers, correct, scores, and
    with `confidence` (vLLM engine: `return_confidence`) each candidate's DeepConf confidence, else None.
    Problem i is sampled with seed `seed * 1_000_003 + first_index + i`: its own, whatever else is sampled."""
    keys = ("sequences", "texts", "answers", "correct", "finished", "scores", "chosen_answer", "best", "confidence")
    out = {key: [] for key in keys}
    update = counter(len(problems), "sprm eval: sampled problems", progress, every=max(1, len(problems) // 10))
    for i, problem in enumerate(problems):
        result = rm.generate(
            problem.prompt, k=k, temperature=temperature, top_p=1.0, seed=seed * 1_000_003 + first_index + i,
            max_think_tokens=max_think_tokens, max_answer_tokens=max_answer_tokens, backend="torch",
            **({"return_confidence": True} if confidence else {}),
        )  # fmt: skip
        candidates = result.candidates
        answers = [task.answer_from_thinking(c.text) if c.finished else None for c in candidates]
        out["sequences"].append([result.prompt_token_ids + c.token_ids for c in candidates])
        out["texts"].append([c.text for c in candidates])
        out["answers"].append(answers)
        out["correct"].append([task.is_correct(problem, a) for a in answers])
        out["finished"].append([c.finished for c in candidates])
        out["scores"].append([c.score for c in candidates])
        out["chosen_answer"].append(result.answer)
        out["best"].append(result.best)
        out["confidence"].append([c.confidence for c in candidates])  # None: the engine has none
        update()
    return out


def _best(scores: np.ndarray, finished: np.ndarray) -> np.ndarray:
    """choose_best over the last axis: finished first, then the highest score (NaN lowest), lowest index on ties.
    Any real scores (a confidence is not in [0, 1])."""
    key = np.where(np.isnan(scores), -np.finfo(float).max, scores)
    among_finished = np.where(finished, key, -np.inf)
    return np.where(finished.any(-1, keepdims=True), among_finished, key).argmax(-1)


def _vote(answers: list, weights) -> object:
    """The answer with the largest total weight (None answers never win unless alone); ties: first seen."""
    totals = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight
    return max(totals, key=totals.get) if totals else None


def selection_metrics(samples: dict, problems, ks=DEFAULT_KS, *, bce_scores=None, seed: int = 0) -> dict:
    """Per method and k: accuracy over problems (subset-averaged), and per-problem values for the CIs."""
    rng = np.random.default_rng(seed)
    tie_rng = np.random.default_rng([seed, 1])  # its own stream: the other methods' subsets stay as they were
    k_max = len(samples["correct"][0])
    per_problem = {m: {k: [] for k in ks} for m in METHODS}
    for i, problem in enumerate(problems):
        correct = np.array(samples["correct"][i], dtype=float)
        finished = np.array(samples["finished"][i], dtype=bool)
        scores = {"sprm": np.array(samples["scores"][i], dtype=float)}
        if bce_scores is not None:
            scores["sprm_bce"] = np.array(bce_scores[i], dtype=float)
        answers = samples["answers"][i]
        confidence = samples["confidence"][i] if samples.get("confidence") else [None]
        if all(c is not None for c in confidence):  # DeepConf's selectors, from the rows' lowest window confidence
            scores["confidence"] = np.array(confidence, dtype=float)
        verdicts_n = np.array([text.count(NO_VERDICT) for text in samples["texts"][i]], dtype=float)
        for k in ks:
            subsets = (
                np.arange(k_max)[None]
                if k == k_max
                else np.stack([rng.choice(k_max, size=k, replace=False) for _ in range(SUBSETS)])
            )
            per_problem["pass@1"][k].append(correct.mean())
            # oracle pass@k in closed form: 1 - C(n - c, k) / C(n, k)
            c = int(correct.sum())
            per_problem["oracle"][k].append(1.0 - math.comb(k_max - c, k) / math.comb(k_max, k))
            per_problem["random"][k].append(correct[rng.integers(k_max, size=SUBSETS)].mean())
            for name, values in scores.items():
                chosen = subsets[np.arange(len(subsets)), _best(values[subsets], finished[subsets])]
                per_problem[name][k].append(correct[chosen].mean())
            if "confidence" in scores:  # confidence-weighted majority vote (DeepConf, without its filtering)
                votes = [task.is_correct(problem, _vote([answers[j] for j in subset], scores["confidence"][subset]))
                         for subset in subsets]  # fmt: skip
                per_problem["confidence_vote"][k].append(np.mean(votes))
            # text only: finished first, then the fewest "n" verdicts, ties broken at random (noise below one verdict)
            key = 2.0 * (finished[subsets] * (1 + verdicts_n.max())) - verdicts_n[subsets]
            key = key + 0.5 * tie_rng.random(subsets.shape)
            chosen = subsets[np.arange(len(subsets)), key.argmax(-1)]
            per_problem["fewest_n"][k].append(correct[chosen].mean())
            majority, weighted = [], []
            for subset in subsets:
                subset_answers = [answers[j] for j in subset]
                majority.append(task.is_correct(problem, _vote(subset_answers, np.ones(k))))
                weighted.append(task.is_correct(problem, _vote(subset_answers, scores["sprm"][subset])))
            per_problem["majority"][k].append(np.mean(majority))
            per_problem["sprm_vote"][k].append(np.mean(weighted))
    return {m: {k: np.array(v) for k, v in by_k.items()} for m, by_k in per_problem.items() if by_k[ks[0]]}


def ci95(values: np.ndarray) -> float:
    """Half-width of the normal 95% confidence interval of the mean (NaN for fewer than two values)."""
    return float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def within_problem_gap(samples: dict, scores_list) -> float:
    """Mean over problems with both outcomes of (mean score of correct - mean score of wrong candidates)."""
    gaps = []
    for correct, scores in zip(samples["correct"], scores_list, strict=True):
        correct, scores = np.array(correct, dtype=bool), np.array(scores, dtype=float)
        if correct.any() and (~correct).any():
            gaps.append(scores[correct].mean() - scores[~correct].mean())
    return float(np.mean(gaps)) if gaps else float("nan")


def overall_gap(samples: dict, scores_list) -> float:
    correct = np.array([c for per in samples["correct"] for c in per], dtype=bool)
    scores = np.array([s for per in scores_list for s in per], dtype=float)
    return float(scores[correct].mean() - scores[~correct].mean()) if correct.any() and (~correct).any() else math.nan


def task_settings(model_dir: str, temperature: float | None, difficulty: int | None) -> tuple[float, int]:
    """The temperature and difficulty of an evaluation: as given, else the model folder's (`sprm_task.json`),
    else temperature 1 (the evaluation samples the policy as trained) and the task's default difficulty."""
    settings = folder_task(model_dir)
    temperature = folder_sampling(model_dir).get("temperature", 1.0) if temperature is None else temperature
    difficulty = settings.get("difficulty", task.DEFAULT_DIFFICULTY) if difficulty is None else difficulty
    return temperature, difficulty


def sample_locally(
    model_dir: str,
    problems,
    *,
    engine: str,
    k: int,
    temperature: float,
    seed: int,
    max_answer_tokens: int,
    bce_head_dir: str | None,
    progress: bool,
    threads: int | None = None,
) -> tuple[dict, list | None]:
    """`sample_candidates` on one engine loaded here (CPU, torch route), and the candidates rescored by the BCE head
    at `bce_head_dir` when the folder exists and the engine can swap heads (None otherwise)."""
    from sprm_kernels.model.core.head import SPRMHead
    from sprm_kernels.model.engines.base import supports_head_swap
    from sprm_kernels.model.engines.registry import load_engine

    rm = load_engine(model_dir, engine=engine, device="cpu", backend="torch")
    info = rm.info()
    set_threads(threads, device=info.device, num_parameters=info.num_parameters)  # else 1 for a small model
    samples = sample_candidates(rm, problems, k=k, temperature=temperature, seed=seed,
                                max_answer_tokens=max_answer_tokens, progress=progress,
                                confidence=info.engine == "vllm")  # fmt: skip
    bce_scores = None
    if bce_head_dir and os.path.isdir(bce_head_dir) and supports_head_swap(rm):  # the vLLM engine has one head
        bce = rm.with_head(SPRMHead.from_pretrained(bce_head_dir))
        bce_scores = [[r.value for r in bce.score(seqs)] for seqs in samples["sequences"]]
    return samples, bce_scores


def evaluate(
    model_dir: str | None = None,
    n: int = 500,
    ks=DEFAULT_KS,
    seed: int = 0,
    bce_head_dir: str | None = None,
    progress: bool = True,
    *,
    split: str = "test",
    temperature: float | None = None,
    difficulty: int | None = None,
    engine: str = "hf",
    threads: int | None = None,
    sampler=None,
    num_workers: int = 1,
) -> dict:
    """Accuracy of every method for every k on n held-out problems (see the module docstring). model_dir: default
    the shipped model; bce_head_dir: default `model_dir/bce_head` when it exists. Deterministic for a seed.

    sampler: how the candidates are drawn, `sampler(model_dir, problems, engine=, k=, temperature=, seed=,
    max_answer_tokens=, bce_head_dir=, progress=) -> (samples, bce_scores)`; default `sample_locally` (one engine
    here). `sprm_kernels.model.ray.eval_job.evaluate_on_ray` passes one that spreads the problems over Ray actors
    (the same per-problem results) and its `num_workers`, which the report gives as "workers"."""
    start = time.time()
    model_dir = model_dir or SHIPPED_DIR
    temperature, difficulty = task_settings(model_dir, temperature, difficulty)
    ks = tuple(sorted(set(int(k) for k in ks)))
    k_max = ks[-1]
    if bce_head_dir is not None and not os.path.isdir(bce_head_dir):
        raise ValueError(f"bce_head_dir: no such folder {bce_head_dir!r}")
    problems = task.problems(split, n, seed=seed, difficulty=difficulty)
    bce_head_dir = bce_head_dir or os.path.join(model_dir, "bce_head")
    sampler = sampler or functools.partial(sample_locally, threads=threads)
    samples, bce_scores = sampler(
        model_dir, problems, engine=engine, k=k_max, temperature=temperature, seed=seed, max_answer_tokens=8,
        bce_head_dir=bce_head_dir, progress=progress,
    )  # fmt: skip
    per_problem = selection_metrics(samples, problems, ks, bce_scores=bce_scores, seed=seed)
    accuracy = {m: {k: float(v.mean()) for k, v in by_k.items()} for m, by_k in per_problem.items()}
    ci = {m: {k: ci95(v) for k, v in by_k.items()} for m, by_k in per_problem.items()}

    def paired_difference(a: str, b: str) -> dict:  # a minus b, per problem: the mean and the CI of the difference
        return {
            k: {"diff": float((per_problem[a][k] - per_problem[b][k]).mean()),
                "ci95": ci95(per_problem[a][k] - per_problem[b][k])}
            for k in ks
        }  # fmt: skip

    paired = {name: paired_difference(name, "random") for name in ("sprm", "sprm_bce") if name in per_problem}
    text_only = {name: paired_difference(name, "fewest_n") for name in ("sprm", "sprm_bce") if name in per_problem}
    spr_minus_bce = None  # SPR head minus BCE head, paired per problem
    if "sprm_bce" in per_problem:
        spr_minus_bce = {
            k: {"diff": float((per_problem["sprm"][k] - per_problem["sprm_bce"][k]).mean()),
                "ci95": ci95(per_problem["sprm"][k] - per_problem["sprm_bce"][k])}
            for k in ks
        }  # fmt: skip
    chosen = [task.parse_answer(a) for a in samples["chosen_answer"]]
    best_answers = [samples["answers"][i][b] for i, b in enumerate(samples["best"])]
    gaps = {"sprm": within_problem_gap(samples, samples["scores"])}
    overall = {"sprm": overall_gap(samples, samples["scores"])}
    if bce_scores is not None:
        gaps["sprm_bce"] = within_problem_gap(samples, bce_scores)
        overall["sprm_bce"] = overall_gap(samples, bce_scores)
    return {
        "model_dir": model_dir,
        "n": n,
        "split": split,
        "seed": seed,
        "difficulty": difficulty,
        "temperature": temperature,
        "ks": list(ks),
        "accuracy": accuracy,
        "ci95": ci,
        "sprm_minus_random": paired,
        "sprm_minus_text_only": text_only,
        "spr_minus_bce": spr_minus_bce,
        "within_problem_gap": gaps,
        "overall_gap": overall,
        "finished_rate": float(np.mean([f for per in samples["finished"] for f in per])),
        "answer_agreement": float(np.mean([a == b for a, b in zip(chosen, best_answers, strict=True)])),
        "seconds": time.time() - start,
        "workers": num_workers,
    }


NAMES = {
    "pass@1": "pass@1 (mean)", "majority": "majority vote", "fewest_n": "text only: fewest n verdicts",
    "sprm": "SPRM best-of-k (SPR)",
    "sprm_bce": "SPRM best-of-k (BCE)", "sprm_vote": "SPRM-weighted vote", "confidence": "confidence only (DeepConf)",
    "confidence_vote": "confidence-weighted vote", "oracle": "oracle pass@k",
    "random": "random choice",
}  # fmt: skip


def format_table(result: dict) -> str:
    ks = result["ks"]
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for method, by_k in result["accuracy"].items():
        cells = []
        for k in ks:
            value = by_k[str(k)] if str(k) in by_k else by_k[k]
            cell = f"{value:.3f}"
            if method == "random":
                ci = result["ci95"][method]
                cell += f" ± {(ci[str(k)] if str(k) in ci else ci[k]):.3f}"
            cells.append(cell)
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["ks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_k in result["accuracy"].items():
        values = [by_k[k] if k in by_k else by_k[str(k)] for k in ks]
        ax.plot([math.log2(k) for k in ks], values, marker="o", label=NAMES[method])
    ax.set_xticks([math.log2(k) for k in ks], [str(k) for k in ks])
    ax.set_xlabel("k candidates (log2 scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{os.path.basename(os.path.normpath(result['model_dir']))}: n={result['n']} {result['split']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
