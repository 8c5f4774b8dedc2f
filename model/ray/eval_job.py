"""`sprm eval --ray`: best-of-k evaluation with the problems spread over a pool of Ray actors, one engine each.

Each actor runs `evaluate.sample_candidates` on one problem at a time with that problem's own seed (`seed *
1_000_003 + problem index`, as the single-process run), and rescores its candidates with the BCE head, so the
per-problem results (candidates, scores, choice) are those of `sprm eval` without Ray, whatever the number of
workers or the order they finish in. The driver streams the rows in problem order to `out` (JSON lines or Parquet,
one row per problem, keyed by id) and computes the same report, plus `"workers"`.

    from sprm_kernels.model.ray.eval_job import evaluate_on_ray
    report = evaluate_on_ray(n=100, ks=(1, 2, 4), num_workers=2, out="eval.jsonl")
"""

from __future__ import annotations

import json
import os
import time

from sprm_kernels.model.ray.cluster import Workers, check_model_dir, set_torch_threads

ROW_KEYS = ("sequences", "texts", "answers", "correct", "finished", "scores", "chosen_answer", "best")


class EvalWorker:
    """A Ray Data actor: loads the engine (and the BCE head) once, then samples one problem per call."""

    def __init__(self, model_dir, engine, device, threads, k, temperature, seed, max_answer_tokens, bce_head_dir):
        set_torch_threads(threads)
        from sprm_kernels.model.core.head import SPRMHead
        from sprm_kernels.model.engines.base import supports_head_swap
        from sprm_kernels.model.engines.registry import load_engine

        self.rm = load_engine(model_dir, engine=engine, device=device, backend="torch")
        self.bce = None
        if bce_head_dir and os.path.isdir(bce_head_dir) and supports_head_swap(self.rm):
            self.bce = self.rm.with_head(SPRMHead.from_pretrained(bce_head_dir))
        self.options = dict(k=k, temperature=temperature, seed=seed, max_answer_tokens=max_answer_tokens)

    def __call__(self, batch: dict) -> dict:
        from sprm_kernels.model.evaluation.best_of_k import sample_candidates
        from sprm_kernels.model.shipped import task

        ids, rows, cpu = [], [], []
        for problem_id, terms in zip(batch["id"], batch["terms"], strict=True):
            began = time.process_time()
            problem = task.Problem(tuple(int(t) for t in terms))
            samples = sample_candidates(self.rm, [problem], first_index=int(problem_id), **self.options)
            row = {"id": int(problem_id), "prompt": problem.prompt, **{key: samples[key][0] for key in ROW_KEYS}}
            if self.bce is not None:
                row["bce_scores"] = [r.value for r in self.bce.score(row["sequences"])]
            ids.append(int(problem_id))
            rows.append(json.dumps(row))
            cpu.append(time.process_time() - began)
        return {"id": ids, "row": rows, "pid": [os.getpid()] * len(ids), "cpu_s": cpu}


def sample_on_ray(
    model_dir: str,
    problems: list,
    *,
    engine: str,
    k: int,
    temperature: float,
    seed: int,
    max_answer_tokens: int,
    bce_head_dir: str | None,
    address: str | None = None,
    workers: Workers | None = None,
    out: str | None = None,
    progress: bool = True,
    on_row=None,
) -> tuple[dict, list | None]:
    """(samples, bce_scores) as `evaluate` builds them in one process, from a pool of Ray actors. `on_row(row)` is
    called on each raw row {"id", "row" (JSON), "pid", "cpu_s" (the worker's CPU seconds on it)} as it arrives
    (tests use it to kill a worker mid-job, the benchmark to sum the CPU time)."""
    from sprm_kernels.model.ray import pool
    from sprm_kernels.model.ray.output import RowWriter

    check_model_dir(model_dir)
    workers = workers or Workers()
    kwargs = dict(
        model_dir=model_dir, engine=engine, device=workers.device, threads=workers.torch_threads, k=k,
        temperature=temperature, seed=seed, max_answer_tokens=max_answer_tokens, bce_head_dir=bce_head_dir,
    )  # fmt: skip
    items = [{"id": i, "terms": list(problem.terms)} for i, problem in enumerate(problems)]
    by_id = {}
    update = pool.progress(len(items), f"eval on Ray ({workers.num_workers} workers)", progress)
    with RowWriter(out) as writer:
        for raw in pool.run(items, EvalWorker, kwargs, workers, address=address):
            if on_row is not None:
                on_row(raw)
            row = json.loads(raw["row"])
            if writer.write(row):
                by_id[row["id"]] = row
                update()
    missing = sorted(set(range(len(items))) - set(by_id))
    if missing:
        raise RuntimeError(f"Ray job lost problems {missing[:10]} (of {len(missing)} missing)")
    rows = [by_id[i] for i in range(len(items))]
    samples = {key: [row[key] for row in rows] for key in ROW_KEYS}
    bce_scores = [row["bce_scores"] for row in rows] if rows and "bce_scores" in rows[0] else None
    return samples, bce_scores


def evaluate_on_ray(
    model_dir: str | None = None,
    *,
    address: str | None = None,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    out: str | None = None,
    **evaluate_kwargs,
) -> dict:
    """`evaluate.evaluate` (same arguments, same report plus "workers") with the sampling on Ray. address: None
    starts a private Ray on 127.0.0.1; "auto" or "HOST:PORT" joins a cluster."""
    workers = Workers(num_workers, cpus_per_worker, gpus_per_worker)
    return evaluate_with_workers(model_dir, address=address, workers=workers, out=out, **evaluate_kwargs)


def evaluate_with_workers(model_dir, *, address: str | None, workers: Workers, out: str | None, **evaluate_kwargs):
    """`evaluate` with `sample_on_ray` (on `workers`, rows streamed to `out`) as its sampler."""
    import functools

    from sprm_kernels.model.evaluation.best_of_k import evaluate

    sampler = functools.partial(sample_on_ray, address=address or "local", workers=workers, out=out)
    return evaluate(model_dir, sampler=sampler, num_workers=workers.num_workers, **evaluate_kwargs)
