"""Step-level beam search and DVTS on the vLLM engines (`engines/vllm/search.py`): forked rows' scores equal the HF
engine's `score()` of their final ids, forks are served by the prefix cache, the async engine searches as the sync
one, and a cancelled search leaves nothing behind. The shared contract is in tests/engines/test_engine_contract.py.
Skipped, visibly, where vLLM is absent."""

import asyncio
import importlib.util
import math

import pytest
from helpers import state_after_cancelling_running_rows

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

from sprm_kernels.model import load_engine  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402

PROMPT = "4+8+1+6+9+3=?"
BLOCK = 32  # vLLM's KV block on CPU, as the engine sets it (compat.CPU_BLOCK_SIZE)
OPTIONS = {"beam_width": 2, "expansions": 2, "temperature": 1.6, "top_p": 1.0, "max_think_tokens": 72}


@pytest.fixture(scope="module")
def hf():
    return load_engine(SHIPPED_DIR, engine="hf", device="cpu", backend="torch")


@pytest.mark.parametrize(("method", "aggregate"), [("beam", "mean"), ("dvts", "min"), ("beam", "last")])
def test_forked_rows_scores_equal_the_hf_engines_score(vllm_shipped, hf, method, aggregate):
    """fp32 on both engines: the head's logits differ only by the backbone's batch composition (~1e-7)."""
    for seed in range(3):
        result = vllm_shipped.search(PROMPT, method=method, aggregate=aggregate, seed=seed, **OPTIONS)
        sequences = [result.prompt_token_ids + c.token_ids for c in result.candidates]
        for candidate, again in zip(result.candidates, hf.score(sequences, return_all_scores=True), strict=True):
            assert candidate.score_positions == again.score_positions
            assert math.isclose(candidate.score, again.value, rel_tol=1e-4, abs_tol=1e-6)
            assert candidate.step_scores == pytest.approx(again.all_scores, rel=1e-4, abs=1e-6)


def test_forks_are_served_by_the_prefix_cache(vllm_shipped, monkeypatch):
    """Every request after the first round reads again only the partial last block of its ids: the full blocks
    its parent wrote are served (`num_cached_tokens`), and the result's stats add those up."""
    import sprm_kernels.model.engines.vllm.compat as compat

    seen, real_run = [], compat.run

    def run(llm, requests, progress=False):
        outs = real_run(llm, requests, progress)
        seen.extend((len(ids), out.num_cached_tokens) for (ids, _), out in zip(requests, outs, strict=True))
        return outs

    monkeypatch.setattr(compat, "run", run)
    result = vllm_shipped.search(PROMPT, method="beam", seed=0, max_answer_tokens=0, **OPTIONS)
    prompt_length = len(result.prompt_token_ids)
    forks = [(length, cached) for length, cached in seen if length > prompt_length]
    assert result.stats.rounds >= 3 and len(forks) >= 4
    for length, cached in forks:
        assert cached == (length - 1) // BLOCK * BLOCK  # one token at least goes through the model
    assert result.stats.think_cached_tokens == sum(cached for _, cached in seen)
    assert result.stats.prefill_tokens == sum(length - cached for length, cached in seen)


def test_async_engine_searches_as_the_sync_engine(vllm_async_shipped, vllm_shipped):
    for method in ("beam", "dvts"):
        a = vllm_async_shipped.search(PROMPT, method=method, seed=4, **OPTIONS)
        b = vllm_shipped.search(PROMPT, method=method, seed=4, **OPTIONS)
        assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], rel=1e-5)
        assert a.best == b.best and a.answer_token_ids == b.answer_token_ids
        assert a.stats.rounds == b.stats.rounds and a.stats.think_generated_tokens == b.stats.think_generated_tokens


def test_concurrent_searches_equal_each_one_alone(vllm_async_shipped):
    engine = vllm_async_shipped

    async def run():
        together = await asyncio.gather(*(engine.asearch(PROMPT, method="dvts", seed=s, **OPTIONS) for s in range(6)))
        alone = [await engine.asearch(PROMPT, method="dvts", seed=s, **OPTIONS) for s in range(6)]
        return together, alone, await engine.engine_state()

    together, alone, state = asyncio.run(run())
    for a, b in zip(together, alone, strict=True):
        assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates] and a.best == b.best
    assert state == {"unfinished_requests": 0, "records": 0}


def test_cancelling_a_search_leaves_nothing(vllm_async_shipped):
    engine = vllm_async_shipped

    wide = {**OPTIONS, "method": "beam", "beam_width": 8}
    state = state_after_cancelling_running_rows(engine, lambda seed: engine.asearch(PROMPT, seed=seed, **wide))
    assert state == {"unfinished_requests": 0, "records": 0}


def test_search_options_are_checked_before_any_work(vllm_shipped, vllm_async_shipped):
    for engine in (vllm_shipped, vllm_async_shipped):
        with pytest.raises(ValueError, match="method: expected one of"):
            engine.search(PROMPT, method="greedy")
        with pytest.raises(ValueError, match="beam_width"):
            engine.search(PROMPT, beam_width=0)
        with pytest.raises(TypeError, match="search: unknown option 'k'"):
            engine.search(PROMPT, k=4)
        with pytest.raises(ValueError, match="prompt_or_messages: item 0 has"):
            engine.search("1+" * 400)
