"""`sprm train collect --ray`: rollouts for training a head, collected by a pool of Ray actors, one engine each.

Each actor runs `training.collect.collect` on one prompt at a time with that prompt's own seed (`seed + prompt
index`, as the single-process run), so the merged `RolloutSet` (features, labels, token ids, texts, answers) is the
one `collect` returns in one process, whatever the number of workers; prompts stay in their order. A part travels as
safetensors bytes (the features keep their dtype) plus JSON. `rows` streams a per-prompt summary (.jsonl or
.parquet) as parts arrive.

    from sprm_kernels.model.ray.collect_job import collect_on_ray
    rollouts = collect_on_ray("model/shipped", prompts, verifier, k=8, num_workers=2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from sprm_kernels.model.ray.cluster import Workers, check_model_dir, set_torch_threads
from sprm_kernels.model.training.collect import collect
from sprm_kernels.model.training.rollouts import LIST_FIELDS, RolloutSet, csr


class CollectWorker:
    """A Ray Data actor: loads the engine once, then collects one prompt's rollouts per call."""

    def __init__(self, model_dir, engine, engine_kwargs, threads, verifier, k, seed, options):
        set_torch_threads(threads)
        from sprm_kernels.model.engines.registry import load_engine

        self.model = load_engine(model_dir, engine=engine, **engine_kwargs)
        self.verifier, self.k, self.seed, self.options = verifier, k, seed, options

    def __call__(self, batch: dict) -> dict:
        from safetensors.torch import save

        ids, tensors, lists = [], [], []
        for prompt_id, prompt in zip(batch["id"], batch["prompt"], strict=True):
            prompt = json.loads(prompt)
            part = collect(self.model, [prompt], self.verifier, self.k, seed=self.seed + int(prompt_id),
                           progress=False, **self.options)  # fmt: skip
            ids.append(int(prompt_id))
            tensors.append(save({name: getattr(part, name).contiguous() for name in part.TENSORS}))
            lists.append(json.dumps({name: getattr(part, name) for name in (*LIST_FIELDS, "info")}))
        return {"id": ids, "tensors": tensors, "lists": lists, "pid": [os.getpid()] * len(ids)}


def merge(parts: list, seed: int):
    """One `RolloutSet` from one-prompt sets in prompt order: what `collect` builds over all the prompts."""

    def cat(name):
        return torch.cat([getattr(part, name) for part in parts])

    counts = [n for part in parts for n in part.offsets.diff().tolist()]
    token_counts = [n for part in parts for n in part.token_offsets.diff().tolist()]
    problem_id = torch.cat([torch.full_like(part.problem_id, index) for index, part in enumerate(parts)])
    lists = {name: [item for part in parts for item in getattr(part, name)] for name in LIST_FIELDS}
    return RolloutSet(
        features=cat("features"), offsets=csr(counts), step_positions=cat("step_positions"),
        correct=cat("correct"), finished=cat("finished"), valid=cat("valid"), problem_id=problem_id,
        token_ids=cat("token_ids"), token_offsets=csr(token_counts), **lists, info=dict(parts[0].info, seed=seed),
    )  # fmt: skip


def collect_on_ray(
    model_dir: str,
    prompts: Sequence,
    verifier,
    k: int,
    *,
    engine: str = "hf",
    engine_kwargs: dict | None = None,
    seed: int = 0,
    address: str | None = None,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    workers: Workers | None = None,
    rows: str | None = None,
    progress: bool = True,
    on_row=None,
    **collect_kwargs,
):
    """`collect(load_engine(model_dir, engine=engine, **engine_kwargs), prompts, verifier, k, seed=seed,
    **collect_kwargs)` on a pool of Ray actors (`workers`, else num_workers / cpus / gpus per worker). The verifier
    travels to the actors (cloudpickle): a module function must be importable there. `rows`: a .jsonl / .parquet
    file of per-prompt summaries, streamed."""
    from safetensors.torch import load

    from sprm_kernels.model.ray import pool
    from sprm_kernels.model.ray.output import RowWriter

    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts: expected a non-empty list of prompts, got {prompts!r:.80}")
    check_model_dir(model_dir)
    workers = workers or Workers(num_workers, cpus_per_worker, gpus_per_worker)
    engine_kwargs = dict(engine_kwargs or {})
    engine_kwargs.setdefault("device", workers.device)
    kwargs = dict(model_dir=model_dir, engine=engine, engine_kwargs=engine_kwargs, threads=workers.torch_threads,
                  verifier=verifier, k=k, seed=seed, options=collect_kwargs)  # fmt: skip
    items = [{"id": i, "prompt": json.dumps(prompt)} for i, prompt in enumerate(prompts)]
    parts = {}
    update = pool.progress(len(items), f"collect on Ray ({workers.num_workers} workers)", progress)
    with RowWriter(rows) as writer:
        for raw in pool.run(items, CollectWorker, kwargs, workers, address=address):
            if on_row is not None:
                on_row(raw)
            lists = json.loads(raw["lists"])
            part = RolloutSet(**load(raw["tensors"]), **lists)
            summary = dict(
                id=int(raw["id"]), prompt=lists["prompts"][0], texts=lists["texts"], answers=lists["answers"],
                correct=part.correct.tolist(), valid=part.valid.tolist(),
            )  # fmt: skip
            if writer.write(summary):
                parts[int(raw["id"])] = part
                update()
    missing = sorted(set(range(len(items))) - set(parts))
    if missing:
        raise RuntimeError(f"Ray job lost prompts {missing[:10]} (of {len(missing)} missing)")
    return merge([parts[i] for i in range(len(items))], seed)
