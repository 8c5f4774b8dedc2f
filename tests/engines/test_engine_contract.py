"""The engine contract, run against every engine (docs: CONTRIBUTING, "Engines"): what the CLI, the server, the
evaluation and the trainer rely on. An engine whose stack is absent is skipped, visibly."""

import importlib.util
import math

import pytest

from sprm_kernels.model import (
    Engine,
    EngineInfo,
    GenerationParams,
    choose_best,
    load_engine,
    supports_async,
    supports_head_swap,
    supports_prompt_lists,
    supports_search,
)
from sprm_kernels.model.shipped import SHIPPED_DIR

ENGINE_PARAMS = [
    pytest.param("hf", id="hf"),
    pytest.param(
        "vllm",
        id="vllm",
        marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    ),
    pytest.param(
        "vllm-async",
        id="vllm-async",
        marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    ),
]
PROMPT = "4+8+1+6+9+3=?"


@pytest.fixture(scope="module", params=ENGINE_PARAMS)
def engine(request):
    if request.param == "vllm":
        return request.getfixturevalue("vllm_shipped")  # one vLLM engine per session (conftest)
    if request.param == "vllm-async":
        return request.getfixturevalue("vllm_async_shipped")
    return load_engine(SHIPPED_DIR, engine=request.param, device="cpu")


def assert_candidates_score_as_their_ids(engine, result) -> None:
    """Each candidate's score, step scores and positions are a plain `score()` of prompt + its thinking (fp32 on
    every engine; the engines' logits differ from a fresh prefill only by batch composition, ~1e-7)."""
    rescored = engine.score([result.prompt_token_ids + c.token_ids for c in result.candidates], return_all_scores=True)
    for candidate, again in zip(result.candidates, rescored, strict=True):
        assert candidate.score_positions == again.score_positions
        assert math.isclose(candidate.score, again.value, rel_tol=1e-4, abs_tol=1e-6)
        assert candidate.step_scores == pytest.approx(again.all_scores, rel=1e-4, abs=1e-6)


def test_engine_satisfies_the_protocol_and_describes_itself(engine):
    assert isinstance(engine, Engine)
    info = engine.info()
    assert isinstance(info, EngineInfo)
    assert info.engine in ("hf", "vllm") and info.model_name == "shipped"
    assert info.hidden_size > 0 and info.num_layers >= 2 and info.context_length > 0


def test_capabilities_are_what_each_engine_declares(engine):
    """engines.base Protocols: every engine searches; the HF engine swaps heads; the sync vLLM engine batches prompt
    lists; the server's vLLM engine is async."""
    assert supports_search(engine) and supports_search(type(engine))
    if engine.info().engine == "hf":
        assert supports_head_swap(engine) and not supports_prompt_lists(engine)
        assert not supports_async(engine)
    elif supports_async(engine):  # the server's vLLM engine: one prompt per call, concurrent calls batched
        assert not supports_prompt_lists(engine)
    else:
        assert supports_prompt_lists(engine) and not supports_async(engine)


@pytest.mark.parametrize("method", ["beam", "dvts"])
def test_search_follows_the_shared_rules(engine, method):
    """The search contract on every engine: the candidates are the finished beams (beam search stops once
    beam_width have finished; DVTS has at most one beam per subtree once it is done, of width x expansions rows),
    the choice is `choose_best`, and every beam's score and positions are a plain `score()` of its final ids."""
    result = engine.search(PROMPT, method=method, beam_width=2, expansions=2, seed=1, temperature=1.0, top_p=1.0,
                           max_think_tokens=60, max_answer_tokens=4)  # fmt: skip
    assert result.prompt_token_ids == engine.prompt_ids(PROMPT)
    # beam: it stops once 2 beams finished (a round ends 0 to 4 of its 4 rows); DVTS: once each of its 2 subtrees
    # has finished one, or more in the round that finished it
    assert 2 <= len(result.candidates) <= (2 + 3 if method == "beam" else 2 * 2) and result.stats.rounds >= 1
    scores = [c.score for c in result.candidates]
    assert result.best == choose_best(scores, [c.finished for c in result.candidates])
    assert_candidates_score_as_their_ids(engine, result)
    assert result.stats.think_generated_tokens >= max(len(c.token_ids) for c in result.candidates)
    assert 0 < len(result.answer_token_ids) <= 4


def test_encode_is_what_score_scores(engine):
    text = "<think>04+8=12 y.\n\n12+1=13 y.\n\n</think>13"
    result = engine.score(text, return_all_scores=True)
    assert engine.encode([text])[0] == result.token_ids
    assert len(result.score_positions) == 2 and len(result.all_scores) == 2


def test_generate_follows_the_shared_rules(engine):
    result = engine.generate(PROMPT, k=3, seed=0, max_think_tokens=60, max_answer_tokens=4, temperature=1.0, top_p=1.0)
    assert result.prompt_token_ids == engine.prompt_ids(PROMPT)
    assert len(result.candidates) == 3
    scores = [c.score for c in result.candidates]
    assert result.best == choose_best(scores, [c.finished for c in result.candidates])
    assert_candidates_score_as_their_ids(engine, result)
    assert result.stats.total_tokens >= len(result.prompt_token_ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "k:"), ({"temperature": -1.0}, "temperature:"), ({"top_p": 0.0}, "top_p:"), ({"mode": "x"}, "mode:")],
)
def test_generate_rejects_bad_parameters_alike(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(PROMPT, max_think_tokens=4, max_answer_tokens=1, **kwargs)
    with pytest.raises(ValueError, match=match):  # the same message from the shared parameters object
        GenerationParams(**kwargs)


def test_an_unknown_generate_option_is_named_with_the_accepted_ones(engine):
    """generate takes the fields of GenerationParams (one spelling of them): a misspelt one is refused by name."""
    with pytest.raises(TypeError, match="generate: unknown option 'max_tokens' .*max_think_tokens"):
        engine.generate(PROMPT, max_tokens=8)
    if supports_search(engine):
        with pytest.raises(TypeError, match="search: unknown option 'k' "):
            engine.search(PROMPT, k=4)  # a search's batch is beam_width x expansions


def test_unknown_engine_is_named():
    with pytest.raises(ValueError, match="engine: expected one of"):
        load_engine(SHIPPED_DIR, engine="tgi")
