"""`AsyncVLLMReflectiveModel` (vLLM's AsyncLLM): the synchronous engine's results, concurrency that changes
nothing but the batching, and cancellation that leaves nothing behind. Skipped, visibly, where vLLM is absent."""

import asyncio
import importlib.util
import math

import pytest
from helpers import state_after_cancelling_running_rows

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

PROMPT = "4+8+1+6+9+3=?"
TEXTS = ["<think>04+8=12 y.\n\n12+1=13 y.\n\n</think>13", "<think>3+3=6 y.\n\n</think>6", "<think>9+9=18 y.\n\n"]


def same_generation(a, b) -> None:
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
    assert [c.score_positions for c in a.candidates] == [c.score_positions for c in b.candidates]
    for x, y in zip(a.candidates, b.candidates, strict=True):
        # Same ids through the same fp32 model: the logits differ only by batch composition (~1e-7 relative).
        assert math.isclose(x.score, y.score, rel_tol=1e-5, abs_tol=1e-7)
    assert a.best == b.best and a.answer_token_ids == b.answer_token_ids and a.answer == b.answer


@pytest.mark.parametrize("mode", ["low", "medium"])
def test_async_engine_gives_the_sync_engines_results(vllm_async_shipped, vllm_shipped, mode):
    # Every request carries its own seed, so both engines sample the same rows for one prompt.
    same_generation(
        vllm_async_shipped.generate(PROMPT, mode=mode, seed=0), vllm_shipped.generate(PROMPT, mode=mode, seed=0)
    )
    for got, want in zip(vllm_async_shipped.score(TEXTS, return_all_scores=True),
                         vllm_shipped.score(TEXTS, return_all_scores=True), strict=True):  # fmt: skip
        assert got.score_positions == want.score_positions
        assert math.isclose(got.value, want.value, rel_tol=1e-5)


def test_concurrent_generations_equal_each_one_alone(vllm_async_shipped):
    engine = vllm_async_shipped

    async def run():
        together = await asyncio.gather(*(engine.agenerate(PROMPT, mode="medium", seed=s) for s in range(32)))
        alone = [await engine.agenerate(PROMPT, mode="medium", seed=s) for s in range(32)]
        return together, alone, await engine.engine_state()

    together, alone, state = asyncio.run(run())
    for a, b in zip(together, alone, strict=True):
        same_generation(a, b)
    assert state == {"unfinished_requests": 0, "records": 0}


def test_cancelling_while_rows_are_added_leaves_nothing(vllm_async_shipped):
    engine = vllm_async_shipped

    async def run():
        task = asyncio.ensure_future(engine.agenerate(PROMPT, mode="high", seed=1))  # 32 rows
        await asyncio.sleep(0)  # the call has started: its rows are being added
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.engine_state()  # no wait: the cancelled call returns once its clean-up is done

    assert asyncio.run(run()) == {"unfinished_requests": 0, "records": 0}


def test_cancelling_running_rows_leaves_nothing(vllm_async_shipped):
    """Cancelled once its rows run and the worker keeps their step records: when the cancelled call returns, every
    row is aborted and every record dropped (the engine's state is read at once, with no wait)."""
    engine = vllm_async_shipped

    state = state_after_cancelling_running_rows(engine, lambda seed: engine.agenerate(PROMPT, mode="high", seed=seed))
    assert state == {"unfinished_requests": 0, "records": 0}


def test_closing_a_stream_aborts_its_answer(vllm_async_shipped):
    engine = vllm_async_shipped

    async def run():
        events = engine.astream(PROMPT, mode="low", seed=0, max_answer_tokens=8)
        kind, candidates, best = await anext(events)
        await events.aclose()  # the answer request is running (or queued): it is aborted
        return kind, candidates, best, await engine.engine_state()

    kind, candidates, best, state = asyncio.run(run())
    assert kind == "reasoning" and len(candidates) == 2 and 0 <= best < 2
    assert state == {"unfinished_requests": 0, "records": 0}


def test_stream_events_end_in_the_result(vllm_async_shipped):
    engine = vllm_async_shipped

    async def run():
        return [event async for event in engine.astream(PROMPT, mode="low", seed=0)]

    events = asyncio.run(run())
    assert [e[0] for e in events][0] == "reasoning" and events[-1][0] == "result"
    result = events[-1][1]
    same_generation(result, engine.generate(PROMPT, mode="low", seed=0))
    partial = [e[1] for e in events if e[0] == "answer"]
    assert all(result.answer_token_ids[: len(ids)] == ids for ids in partial)  # cumulative prefixes of the answer
