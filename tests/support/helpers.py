"""Random data and float64 ground truth shared by the kernel tests."""

from __future__ import annotations

import os

import pytest
import torch

from sprm_kernels import sprm_score_reference

STEP, OPEN, CLOSE = 3, 1, 2  # token ids of the step token and the think markers in synthetic sequences


def random_head(hidden_size: int, dtype=torch.float32, device="cpu", width=None, seed=0):
    """Head weights in nn.Linear layout, scaled so logits are O(1) (a mix of confident and unsure steps)."""
    gen = torch.Generator().manual_seed(seed)
    width = width or 2 * hidden_size
    w1 = torch.randn(width, hidden_size, generator=gen) / hidden_size**0.5
    b1 = torch.randn(width, generator=gen) * 0.1
    w2 = torch.randn(1, width, generator=gen) * 2 / width**0.5
    b2 = torch.randn(1, generator=gen) * 0.5
    return [t.to(device=device, dtype=dtype) for t in (w1, b1, w2, b2)]


def random_csr(num_rows: int, steps_per_candidate: list[int], seed=0, device="cpu"):
    """step_index (random distinct rows, sorted within each candidate) and offsets for the given step counts."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(steps_per_candidate)
    rows = (
        torch.randperm(num_rows, generator=gen)[:total]
        if total <= num_rows
        else torch.randint(0, num_rows, (total,), generator=gen)
    )
    offsets = torch.tensor([0] + steps_per_candidate).cumsum(0)
    pieces = [rows[a:b].sort().values for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    step_index = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    return step_index.to(device), offsets.to(device)


def truth(hidden, step_index, offsets, w1, b1, w2, b2, group_size=None):
    """docs/method.md §4 entirely in float64 on the (already rounded) inputs: the yardstick of every route, dtype."""
    as64 = [t.double().cpu() for t in (hidden, w1, b1, w2, b2)]
    return sprm_score_reference(
        as64[0], step_index.cpu(), offsets.cpu(), *as64[1:], group_size=group_size, return_step_scores=True
    )


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| where expected is finite; also checks that non-finite entries agree exactly."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "finite / non-finite entries differ"
    assert torch.equal(actual[~finite].nan_to_num(), expected[~finite].nan_to_num()), "infinite entries differ"
    return (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0


def random_token_rows(batch: int, length: int, seed=0, vocab=12, step_rate=0.25):
    """Token ids with step-token runs and think markers placed once, twice or not at all per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    ids[torch.rand(batch, length, generator=gen) < step_rate] = STEP
    for b in range(batch):
        kind = b % 4  # 0: both markers once, 1: none, 2: <think> twice, 3: </think> twice and <think> once
        if length < 4:
            continue
        if kind in (0, 3):
            ids[b, int(torch.randint(0, length // 3, (1,), generator=gen))] = OPEN
        if kind == 2:
            ids[b, 1] = OPEN
            ids[b, length // 2] = OPEN
        if kind in (0, 3):
            ids[b, int(torch.randint(2 * length // 3, length, (1,), generator=gen))] = CLOSE
        if kind == 3:
            ids[b, length // 2 + 1] = CLOSE
    return ids


# Set by conftest.py before anything imports triton: without CUDA, kernels run under the Triton interpreter.
HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Every CUDA-only test carries both marks: `cuda`, so that `pytest -m cuda` (make test-gpu) selects it, and a skip
# with its reason, so that it shows as skipped (not silently absent) where there is no CUDA device.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here)"))


def requires_cuda(test):
    """Decorator for a CUDA-only test (function or class): both CUDA_MARKS. For a pytest.param, marks=CUDA_MARKS."""
    for mark in reversed(CUDA_MARKS):
        test = mark(test)
    return test


def state_after_cancelling_running_rows(engine, start, seeds=range(5)) -> dict:
    """The async vLLM engine's `engine_state()` read right after cancelling `start(seed)` (a coroutine of the
    engine) once the worker holds its rows' step records. A call that finished before a read saw its records (a
    much faster machine) is tried again with the next seed; each read is a round trip to the worker."""
    import asyncio

    async def run(seed: int):
        task = asyncio.ensure_future(start(seed))
        while not task.done() and (await engine.engine_state())["records"] == 0:
            pass
        if task.done():
            return None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.engine_state()

    states = (asyncio.run(run(seed)) for seed in seeds)
    return next(state for state in states if state is not None)
