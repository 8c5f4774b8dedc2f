"""pytest-benchmark regression suite of the CPU paths, on small shapes (kept out of the default test run:
pyproject's testpaths is tests/).

    python -m pytest bench/test_benchmarks.py --benchmark-only -q      # timed
    python -m pytest bench/test_benchmarks.py --benchmark-disable -q   # each benchmark runs once, as a test

Compare runs with --benchmark-autosave and --benchmark-compare (see pytest-benchmark's documentation).
"""

from __future__ import annotations

import pytest
import torch

from sprm_kernels import StepScorer, sprm_score, sprm_score_reference, step_positions, step_positions_reference

from .kernels import GROUP_SIZE, eager_step_update, make_problem, random_head

CPU = torch.device("cpu")
SCORE_SHAPES = [(8, 512), (256, 512), (256, 1536)]  # (S, H), fp32
STEP, OPEN, CLOSE = 3, 1, 2


@pytest.fixture(autouse=True)
def single_seed():
    torch.manual_seed(0)


@pytest.mark.benchmark(group="sprm_score")
@pytest.mark.parametrize("rows,hidden_size", SCORE_SHAPES, ids=lambda v: str(v))
def test_sprm_score_torch(benchmark, rows, hidden_size):
    problem = make_problem(rows, hidden_size, torch.float32, CPU)
    args = (problem.hidden, problem.step_index, problem.offsets, *problem.head)
    result = benchmark(lambda: sprm_score(*args, group_size=GROUP_SIZE, backend="torch"))
    expected = sprm_score_reference(*args, group_size=GROUP_SIZE)
    torch.testing.assert_close(result.log_score, expected.log_score, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.best, expected.best)


@pytest.mark.benchmark(group="sprm_score")
@pytest.mark.parametrize("rows,hidden_size", SCORE_SHAPES, ids=lambda v: str(v))
def test_sprm_score_eager_reference(benchmark, rows, hidden_size):
    problem = make_problem(rows, hidden_size, torch.float32, CPU)
    args = (problem.hidden, problem.step_index, problem.offsets, *problem.head)
    result = benchmark(lambda: sprm_score_reference(*args, group_size=GROUP_SIZE))
    assert result.score.shape == (problem.offsets.numel() - 1,)


def token_rows(batch: int, length: int) -> torch.Tensor:
    """Random ids with step tokens (about one in four) and one <think> ... </think> span per row."""
    ids = torch.randint(4, 50, (batch, length))
    ids[torch.rand(batch, length) < 0.25] = STEP
    ids[:, 2] = OPEN
    ids[:, -3] = CLOSE
    return ids


@pytest.mark.benchmark(group="step_positions")
@pytest.mark.parametrize("batch,length", [(8, 512), (32, 4096)], ids=lambda v: str(v))
def test_step_positions_torch(benchmark, batch, length):
    ids = token_rows(batch, length)
    markers = dict(step_token_ids=[STEP], think_start_id=OPEN, think_end_id=CLOSE)
    step_index, offsets = benchmark(lambda: step_positions(ids, **markers, backend="torch"))
    if length <= 512:  # the reference loops over tokens in Python
        expected_index, expected_offsets = step_positions_reference(ids, **markers)
        assert torch.equal(step_index, expected_index) and torch.equal(offsets, expected_offsets)
    assert offsets[-1] == step_index.numel() > 0


@pytest.mark.benchmark(group="step_scorer_update")
@pytest.mark.parametrize("batch,hidden_size", [(8, 512), (32, 1536)], ids=lambda v: str(v))
def test_step_scorer_update_torch(benchmark, batch, hidden_size):
    head = random_head(hidden_size, torch.float32, CPU)
    hidden, is_step = torch.randn(batch, hidden_size), torch.rand(batch) < 0.5
    scorer = StepScorer(*head, batch_size=batch, group_size=GROUP_SIZE, backend="torch")
    step_prob = benchmark(lambda: scorer.update(hidden, is_step))
    sum_log, count = torch.zeros(batch), torch.zeros(batch, dtype=torch.int64)
    torch.testing.assert_close(step_prob, eager_step_update(hidden, is_step, *head, sum_log, count))
    assert torch.equal(scorer.count, scorer.count.max() * is_step.long())  # one increment per flagged call


@pytest.mark.benchmark(group="step_scorer_update")
@pytest.mark.parametrize("batch,hidden_size", [(8, 512), (32, 1536)], ids=lambda v: str(v))
def test_step_scorer_update_eager_reference(benchmark, batch, hidden_size):
    head = random_head(hidden_size, torch.float32, CPU)
    hidden, is_step = torch.randn(batch, hidden_size), torch.rand(batch) < 0.5
    sum_log, count = torch.zeros(batch), torch.zeros(batch, dtype=torch.int64)
    probs = benchmark(lambda: eager_step_update(hidden, is_step, *head, sum_log, count))
    assert probs.shape == (batch,)
