"""`sprm train collect --ray`: the merged RolloutSet equals the single-process `collect` (tensors, labels, texts),
and the CLI writes the same rollouts. Skipped, visibly, without Ray."""

import json

import pytest
import torch

pytest.importorskip("ray", reason="the Ray tests need Ray (pip install 'ray[data,serve]')")

from sprm_kernels.model.cli import train as train_cli  # noqa: E402
from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.ray.collect_job import collect_on_ray  # noqa: E402
from sprm_kernels.model.ray.output import read_rows  # noqa: E402
from sprm_kernels.model.shipped import (
    SHIPPED_DIR,
    task,  # noqa: E402
)
from sprm_kernels.model.training.collect import collect  # noqa: E402
from sprm_kernels.model.training.rollouts import RolloutSet  # noqa: E402
from sprm_kernels.model.training.verifiers import last_number_verifier  # noqa: E402

SHIPPED = SHIPPED_DIR
OPTIONS = dict(max_think_tokens=96, max_answer_tokens=8, temperature=1.0, top_p=1.0, seed=5)


def same(a: RolloutSet, b: RolloutSet) -> None:
    for name in RolloutSet.TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("prompts", "prompt_token_ids", "texts", "answers", "info"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.fixture(scope="module")
def problems():
    return task.problems("train", 3, seed=1)


@pytest.fixture(scope="module")
def expected(problems):
    """The single-process rollouts: 2 per problem."""
    verifier = last_number_verifier({p.prompt: p.answer for p in problems})
    return collect(load_engine(SHIPPED, device="cpu"), [p.prompt for p in problems], verifier, 2, progress=False,
                   **OPTIONS)  # fmt: skip


def test_collect_on_two_workers_equals_single_process(ray_local, tmp_path, problems, expected):
    prompts = [p.prompt for p in problems]
    verifier = last_number_verifier({p.prompt: p.answer for p in problems})
    rows = tmp_path / "rows.jsonl"
    got = collect_on_ray(SHIPPED, prompts, verifier, 2, num_workers=2, rows=str(rows), progress=False, **OPTIONS)
    same(got, expected)
    assert [row["id"] for row in read_rows(str(rows))] == [0, 1, 2]
    got.save(tmp_path / "saved")
    same(RolloutSet.load(tmp_path / "saved"), expected)


def test_command_line_collect_on_ray_writes_the_same_rollouts(ray_local, tmp_path, problems, expected):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt, "reference": p.answer}) + "\n" for p in problems))
    out, rows = tmp_path / "rollouts", tmp_path / "rows.jsonl"
    assert train_cli.main([
        "collect", "--model", SHIPPED, "--prompts", str(prompts), "--out", str(out), "--k", "2",
        "--max-think-tokens", "96", "--max-answer-tokens", "8", "--temperature", "1.0", "--top-p", "1.0",
        "--seed", "5", "--device", "cpu", "--ray", "--num-workers", "2", "--rows", str(rows), "--quiet",
    ]) == 0  # fmt: skip
    got = RolloutSet.load(out)
    assert got.info["model"] == SHIPPED
    same(got, RolloutSet(**{**vars(expected), "info": dict(expected.info, model=SHIPPED)}))
    assert [row["id"] for row in read_rows(str(rows))] == [0, 1, 2]
