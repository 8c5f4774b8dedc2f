"""The pipeline benchmark on a minimal config (k=2, a few tokens, a tiny model; seconds), so that its code cannot
rot: every part runs, the CSV rows are well formed, and our candidates scored by the reference flow's path give
our scores and our argmax."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from sprm_kernels import step_positions_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed: import it from the checkout
from bench import common, pipeline, reference_flow  # noqa: E402

TINY = pipeline.Config(
    hidden_size=32, num_layers=2, ks=(2,), prompts=pipeline.PROMPTS[:1], seeds=(0,), max_think=12, max_answer=4,
    batch_sizes=(1, 3), score_budget_s=0.0, memory_lengths=(32,), memory_layers=(2,), measured_memory=((32, 2),),
    stream_k=2, backend="torch",
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and immune to a busy machine's contention (as the benchmark runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pipeline_benchmark_smoke(tmp_path):
    path = tmp_path / "bench.csv"
    lines = []
    rows = pipeline.run(TINY, csv_path=path, log=lines.append)
    with open(path, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(rows) > 0
    assert list(written[0]) == common.CSV_COLUMNS
    assert all(int(row["S"]) >= 0 and int(row["H"]) == TINY.hidden_size for row in written)
    kernels = {row["kernel"] for row in written}
    assert {"pipeline", "score_batch", "scoring_memory_L2", "scoring_memory_stream"} <= kernels
    metrics = {(row["provider"], row["metric"]): float(row["p50"]) for row in written if row["kernel"] == "pipeline"}
    for provider in ("reflective", "reference"):
        assert metrics[(provider, "ms")] > 0 and metrics[(provider, "peak_mem_MB")] >= 0
        assert 0 <= metrics[(provider, "scoring_pct")] <= 100
    assert metrics[("reflective", "tokens_scoring")] == 0 and metrics[("reference", "tokens_scoring")] > 0
    assert metrics[("agreement", "same_argmax_pct")] == 100
    assert metrics[("agreement", "max_score_diff")] < 1e-4
    assert any("best-of-k generation" in line for line in lines)


def test_reference_step_mask_matches_spec_reference():
    """The reference flow's vectorised docs/method.md §3 mask against the project's one-token-at-a-time reference."""
    setup = pipeline.build(TINY, bias=False)
    for text in pipeline.synthetic_texts(setup, 6) + [
        "<think>1.\n\n.\n\n2.\n\n<think>3.\n\n</think>4.\n\n",
        "5.\n\n6</think>.\n\n",
    ]:
        ids = torch.tensor(setup.tokenizer(text, add_special_tokens=False)["input_ids"])
        rule = setup.rule
        expected, _ = step_positions_reference(
            ids[None], step_token_ids=rule.step_ids, think_start_id=rule.think_start_id,
            think_end_id=rule.think_end_id,
        )  # fmt: skip
        assert reference_flow.step_mask(ids, rule).nonzero().flatten().tolist() == expected.tolist()
