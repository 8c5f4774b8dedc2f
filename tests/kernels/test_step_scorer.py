"""StepScorer: running updates equal one batch scoring of the same flagged rows (same tolerances as sprm_score)."""

import pytest
import torch
from helpers import max_abs_error, random_head, requires_cuda, truth

from sprm_kernels import StepScorer

FP32_LEVEL = 1e-4  # see test_sprm_score.py: fp32 accumulation on exactly representable inputs


def decode(route, dtype, batch=6, steps=9, hidden_size=40, group_size=3, seed=0):
    """Feeds `steps` decode steps of random states and flags; returns the scorer and the equivalent CSR input."""
    device, backend = route
    gen = torch.Generator().manual_seed(seed)
    head = random_head(hidden_size, dtype, seed=seed + 1)
    scorer = StepScorer(*[t.to(device) for t in head], batch_size=batch, group_size=group_size, backend=backend)
    states = torch.randn(steps, batch, hidden_size, generator=gen).to(dtype)
    flags = torch.rand(steps, batch, generator=gen) < 0.4
    flags[:, 1] = False  # a candidate that never takes a step
    probs = []
    for t in range(steps):
        probs.append(scorer.update(states[t].to(device), flags[t].to(device)).clone().cpu())
    # the same rows as one CSR batch: candidate b owns its flagged steps in time order; row id = t * batch + b
    rows = [[t * batch + b for t in range(steps) if flags[t, b]] for b in range(batch)]
    step_index = torch.tensor([r for per in rows for r in per], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(per) for per in rows]).cumsum(0)
    return scorer, states.view(steps * batch, hidden_size), step_index, offsets, head, torch.stack(probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_running_scores_equal_batch_scoring(route, dtype):
    scorer, flat, step_index, offsets, head, probs = decode(route, dtype)
    expected = truth(flat, step_index, offsets, *head, group_size=3)
    result = scorer.result()
    assert torch.equal(result.num_steps.cpu(), expected.num_steps)
    assert max_abs_error(result.log_score, expected.log_score) < FP32_LEVEL
    assert max_abs_error(result.score, expected.score) < FP32_LEVEL
    assert result.score[1] == 0 and result.log_score[1] == float("-inf")
    assert result.best.cpu().tolist() == expected.score.view(-1, 3).argmax(1).tolist()
    # update() returns every row's step probability, flagged or not
    all_rows = truth(flat, torch.arange(flat.shape[0]), torch.tensor([0, flat.shape[0]]), *head)
    assert max_abs_error(probs.flatten(), all_rows.step_scores) < FP32_LEVEL


def test_reset_and_repeat_are_bit_identical(route):
    scorer, *_ = decode(route, torch.float32, seed=5)
    first = scorer.result()
    device, backend = route
    again, *_ = decode(route, torch.float32, seed=5)
    assert torch.equal(first.log_score, again.result().log_score)
    scorer.reset()
    assert scorer.result().num_steps.sum() == 0


def test_nan_in_an_unflagged_row_does_not_leak(route):
    device, backend = route
    head = random_head(16, seed=3)
    scorer = StepScorer(*[t.to(device) for t in head], batch_size=4, group_size=4, backend=backend)
    states = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    states[2] = float("nan")
    scorer.update(states.to(device), torch.tensor([True, True, False, True], device=device))
    states[2] = 0.0
    states[3] = float("nan")
    scorer.update(states.to(device), torch.tensor([True, False, True, True], device=device))
    result = scorer.result()
    assert torch.isfinite(result.log_score[:3]).all() and torch.isnan(result.log_score[3])
    assert result.best.item() != 3


def test_idle_steps_skip_the_head(route):
    """want_prob given and no row flagged or wanted: the sums stay, every probability is NaN; a wanted row makes
    the head run without touching the sums; without want_prob the head always runs (the old contract)."""
    device, backend = route
    head = [t.to(device) for t in random_head(24, seed=7)]
    scorer = StepScorer(*head, batch_size=5, group_size=5, backend=backend)
    states = torch.randn(5, 24, generator=torch.Generator().manual_seed(8)).to(device)
    none = torch.zeros(5, dtype=torch.bool, device=device)
    flags = torch.tensor([True, False, True, False, False], device=device)
    scorer.update(states, flags, want_prob=none)
    before = scorer.result()
    sums = scorer.sum_log.clone()
    probs = scorer.update(states, none, want_prob=none)
    assert torch.isnan(probs).all()
    assert torch.equal(scorer.sum_log, sums) and torch.equal(scorer.count.cpu(), before.num_steps.cpu())
    expected = truth(states.cpu(), torch.arange(5), torch.tensor([0, 5]), *[t.cpu() for t in head]).step_scores
    wanted = torch.tensor([False, False, False, True, False], device=device)
    probs = scorer.update(states, none, want_prob=wanted)
    assert max_abs_error(probs, expected) < FP32_LEVEL and torch.equal(scorer.sum_log, sums)
    probs = scorer.update(states, none)
    assert max_abs_error(probs, expected) < FP32_LEVEL and torch.equal(scorer.sum_log, sums)
    scorer.update(states, flags, want_prob=none)  # and a flagged step after idle ones counts as usual
    assert scorer.result().num_steps.tolist() == [2, 0, 2, 0, 0]


def test_bad_want_prob():
    scorer = StepScorer(*random_head(8, width=16), batch_size=4, backend="torch")
    flags = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="want_prob"):
        scorer.update(torch.randn(4, 8), flags, want_prob=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=4, group_size=3), "group_size"),
        (dict(batch_size=4, b1=torch.randn(7)), "b1"),
    ],
)
def test_bad_construction(kwargs, argument):
    w1, b1, w2, b2 = random_head(8, width=16)
    args = dict(w1=w1, b1=b1, w2=w2, b2=b2, batch_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        StepScorer(args.pop("w1"), args.pop("b1"), args.pop("w2"), args.pop("b2"), **args)


@pytest.mark.parametrize(
    "hidden,is_step,argument",
    [
        (torch.randn(3, 8), torch.ones(4, dtype=torch.bool), "hidden"),
        (torch.randn(4, 8).half(), torch.ones(4, dtype=torch.bool), "hidden"),
        (torch.randn(4, 8), torch.ones(4, dtype=torch.long), "is_step"),
        (torch.randn(4, 8), torch.ones(5, dtype=torch.bool), "is_step"),
    ],
)
def test_bad_update(hidden, is_step, argument):
    scorer = StepScorer(*random_head(8, width=16), batch_size=4, backend="torch")
    with pytest.raises(ValueError, match=argument):
        scorer.update(hidden, is_step)


@requires_cuda
def test_update_is_cuda_graph_capturable():
    head = [t.cuda() for t in random_head(64, torch.bfloat16)]
    scorer = StepScorer(*head, batch_size=8, group_size=8)
    states = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    flags = torch.ones(8, dtype=torch.bool, device="cuda")
    scorer.update(states, flags)  # warm-up compiles outside the capture
    scorer.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scorer.update(states, flags)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    eager = StepScorer(*head, batch_size=8, group_size=8)
    for _ in range(3):
        eager.update(states, flags)
    assert torch.equal(scorer.result().num_steps, eager.result().num_steps)
    assert torch.equal(scorer.result().log_score, eager.result().log_score)


@requires_cuda
def test_idle_skip_is_decided_on_the_device_inside_a_cuda_graph():
    head = [t.cuda() for t in random_head(64, torch.bfloat16)]
    scorer = StepScorer(*head, batch_size=8, group_size=8)
    states = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    flags = torch.zeros(8, dtype=torch.bool, device="cuda")
    want = torch.zeros_like(flags)
    scorer.update(states, flags, want_prob=want)  # warm-up compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scorer.update(states, flags, want_prob=want)
    flags[3] = True
    graph.replay()  # a flagged row: the head runs
    flags[3] = False
    graph.replay()  # idle: skipped, the count stays
    torch.cuda.synchronize()
    assert scorer.count.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert torch.isnan(scorer.step_prob).all()
