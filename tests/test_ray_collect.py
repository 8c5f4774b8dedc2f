"""`train collect --ray`: the merged RolloutSet equals the single-process `collect` (tensors, labels, texts), and
the CLI writes the same rollouts. Skipped, visibly, without Ray."""

import pytest
import torch

pytest.importorskip("ray", reason="the Ray tests need Ray (pip install 'ray[data,serve]')")

from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.ray.collect_job import collect_on_ray  # noqa: E402
from sprm_kernels.model.ray.output import read_rows  # noqa: E402
from sprm_kernels.model.shipped import (
    SHIPPED_DIR,
    task,  # noqa: E402
)
from sprm_kernels.model.training.fit import RolloutSet, collect, last_number_verifier  # noqa: E402

SHIPPED = SHIPPED_DIR
OPTIONS = dict(max_think_tokens=96, max_answer_tokens=8, temperature=1.0, top_p=1.0, seed=5)


def same(a: RolloutSet, b: RolloutSet) -> None:
    for name in RolloutSet.TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("prompts", "prompt_token_ids", "texts", "answers", "info"):
        assert getattr(a, name) == getattr(b, name), name


def test_collect_on_two_workers_equals_single_process(ray_local, tmp_path):
    problems = task.problems("train", 3, seed=1)
    prompts = [p.prompt for p in problems]
    verifier = last_number_verifier({p.prompt: p.answer for p in problems})
    expected = collect(load_engine(SHIPPED, device="cpu"), prompts, verifier, 2, progress=False, **OPTIONS)
    rows = tmp_path / "rows.jsonl"
    got = collect_on_ray(SHIPPED, prompts, verifier, 2, num_workers=2, rows=str(rows), progress=False, **OPTIONS)
    same(got, expected)
    assert [row["id"] for row in read_rows(str(rows))] == [0, 1, 2]
    got.save(tmp_path / "saved")
    same(RolloutSet.load(tmp_path / "saved"), expected)
