"""`sprm serve --engine vllm` as a client sees it: the OpenAI routes on vLLM's async engine through the official
`openai` client and plain HTTP, against a real uvicorn on 127.0.0.1. Concurrent requests are answered as each one
alone; a client that hangs up mid-stream has its rows aborted. No test depends on timing: the disconnect test waits
on the worker's `wait_until` (notified when a request leaves). Skipped, visibly, where vLLM is absent."""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
pytest.importorskip("uvicorn")

from served import running  # noqa: E402

from sprm_kernels.model.serving.app import create_app  # noqa: E402

MESSAGES = [{"role": "user", "content": "4+8+1+6+9+3=?"}]
EVENT_TIMEOUT = 120.0  # the bound on waiting for an event: only a hang ever reaches it


@pytest.fixture(scope="module")
def served(vllm_async_shipped):
    app = create_app(vllm_async_shipped, request_timeout=EVENT_TIMEOUT)
    with running(app) as url:
        yield url, app.state.worker


def client_of(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=EVENT_TIMEOUT)


def extra(model, name: str):
    return (model.model_extra or {}).get(name)


def test_chat_completion_is_the_engines_generation(served, vllm_async_shipped):
    base, _ = served
    response = client_of(base).chat.completions.create(
        model="shipped",
        messages=MESSAGES,
        reasoning_effort="low",
        seed=0,
        extra_body={"sprm": {"return_candidates": True}},
    )
    result = vllm_async_shipped.generate(MESSAGES, mode="low", seed=0, temperature=1.0, top_p=1.0)
    assert response.choices[0].message.content == result.answer
    sprm = extra(response, "sprm")
    assert sprm["k"] == 2 and len(sprm["candidates"]) == 2
    assert response.usage.completion_tokens_details.reasoning_tokens == result.stats.think_generated_tokens


def test_stream_adds_up_to_the_completion(served):
    base, _ = served
    options = {"model": "shipped", "messages": MESSAGES, "reasoning_effort": "medium", "seed": 3}
    whole = client_of(base).chat.completions.create(**options)
    chunks = list(
        client_of(base).chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
    )
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert deltas[0].role == "assistant"
    assert "".join(extra(d, "reasoning_content") or "" for d in deltas) == extra(
        whole.choices[0].message, "reasoning_content"
    )
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_32_concurrent_chat_completions_equal_each_one_alone(served):
    base, worker = served
    client = client_of(base)

    def ask(seed: int):
        extra_body = {"sprm": {"return_candidates": True}}
        response = client.chat.completions.create(
            model="shipped", messages=MESSAGES, reasoning_effort="medium", seed=seed, extra_body=extra_body
        )
        return response.choices[0].message, extra(response, "sprm")

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    alone = [ask(seed) for seed in range(32)]
    for (message_a, sprm_a), (message_b, sprm_b) in zip(together, alone, strict=True):
        assert message_a.content == message_b.content
        assert extra(message_a, "reasoning_content") == extra(message_b, "reasoning_content")
        assert [c["text"] for c in sprm_a["candidates"]] == [c["text"] for c in sprm_b["candidates"]]
    assert worker.in_hand == 0


def test_a_client_that_hangs_up_has_its_rows_aborted(served, vllm_async_shipped):
    base, worker = served
    engine = vllm_async_shipped
    cancelled = worker.stats.cancelled
    asyncio.run(engine.pause())  # nothing is scheduled: the request stays in flight until the client hangs up
    try:
        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=EVENT_TIMEOUT)
        body = json.dumps({"messages": MESSAGES, "reasoning_effort": "high", "seed": 0, "stream": True})
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert worker.wait_until(lambda: worker.in_hand == 1, EVENT_TIMEOUT)
        waited = 0.0
        while asyncio.run(engine.engine_state())["unfinished_requests"] < 32:  # paused: the rows cannot finish
            assert waited < EVENT_TIMEOUT, "the rows never reached the engine"
            time.sleep(0.01)
            waited += 0.01
        connection.close()
        assert worker.wait_until(lambda: worker.in_hand == 0, EVENT_TIMEOUT)
    finally:
        asyncio.run(engine.resume())
    assert worker.stats.cancelled == cancelled + 1
    assert asyncio.run(engine.engine_state()) == {"unfinished_requests": 0, "records": 0}


def test_chat_completion_searches_on_the_async_engine(served, vllm_async_shipped):
    """`sprm.search` runs the engine's `asearch`; concurrent searches answer as each one alone."""
    from sprm_kernels.model.core.params import SEARCH_SAMPLING_OPTIONS
    from sprm_kernels.model.engines.common import generation_options

    base, worker = served
    search = {"method": "beam", "beam_width": 2, "expansions": 2}

    def ask(seed: int):
        response = client_of(base).chat.completions.create(
            model="shipped",
            messages=MESSAGES,
            seed=seed,
            extra_body={"sprm": {"search": search, "return_candidates": True}},
        )
        return response.choices[0].message.content, [c["text"] for c in extra(response, "sprm")["candidates"]]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    for seed, (answer, texts) in enumerate(together):
        options = generation_options(vllm_async_shipped, MESSAGES, seed=seed)
        result = vllm_async_shipped.search(
            MESSAGES, **search, **{n: v for n, v in options.items() if n in SEARCH_SAMPLING_OPTIONS}
        )
        assert answer == result.answer and texts == [c.text for c in result.candidates]
    assert worker.in_hand == 0
    assert asyncio.run(vllm_async_shipped.engine_state()) == {"unfinished_requests": 0, "records": 0}


def test_errors_are_openai_errors(served):
    base, _ = served
    with pytest.raises(openai.BadRequestError) as error:
        client_of(base).chat.completions.create(model="shipped", messages=MESSAGES, temperature=-1)
    assert error.value.body["param"] == "temperature"
    bad = requests.post(
        f"{base}/v1/chat/completions", json={"messages": MESSAGES, "sprm": {"k": 0}}, timeout=EVENT_TIMEOUT
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sprm.k"


def test_text_completion_streams_the_thinking_then_the_answer(served):
    base, _ = served
    client = client_of(base)
    prompt = "<|user|>4+8+1+6+9+3=?<|end|><|assistant|><think>"
    whole = client.completions.create(model="shipped", prompt=prompt, seed=0, extra_body={"reasoning_effort": "low"})
    chat = client.chat.completions.create(model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0)
    assert whole.choices[0].text.endswith("</think>" + chat.choices[0].message.content)
    chunks = list(client.completions.create(model="shipped", prompt=prompt, seed=0, stream=True,
                                            extra_body={"reasoning_effort": "low"}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_a_full_queue_is_503_with_retry_after(vllm_async_shipped):
    """With the engine paused nothing finishes, so the first request surely holds the only place in the queue."""
    engine = vllm_async_shipped
    app = create_app(engine, max_queue=1, request_timeout=EVENT_TIMEOUT)
    with running(app) as base, ThreadPoolExecutor(1) as pool:
        worker = app.state.worker
        asyncio.run(engine.pause())
        try:
            first = pool.submit(requests.post, f"{base}/v1/chat/completions", timeout=EVENT_TIMEOUT,
                                json={"messages": MESSAGES, "reasoning_effort": "low", "seed": 0})  # fmt: skip
            assert worker.wait_until(lambda: worker.in_hand == 1, EVENT_TIMEOUT)
            with pytest.raises(openai.InternalServerError) as full:  # the client's class for statuses >= 500
                client_of(base).chat.completions.create(model="shipped", messages=MESSAGES)
        finally:
            asyncio.run(engine.resume())
        assert full.value.status_code == 503 and full.value.response.headers["retry-after"] == "1"
        assert first.result(EVENT_TIMEOUT).status_code == 200  # resumed: the first one is answered


def test_a_request_past_the_timeout_is_504_and_its_rows_are_aborted(vllm_async_shipped):
    """With the engine paused the request cannot finish, so it surely runs past its 0.5 s."""
    engine = vllm_async_shipped
    app = create_app(engine, request_timeout=0.5)
    with running(app) as base:
        asyncio.run(engine.pause())
        try:
            response = requests.post(f"{base}/v1/chat/completions", timeout=EVENT_TIMEOUT,
                                     json={"messages": MESSAGES, "reasoning_effort": "high", "seed": 0})  # fmt: skip
            state = asyncio.run(engine.engine_state())  # still paused: nothing could have finished
        finally:
            asyncio.run(engine.resume())
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert app.state.worker.stats.timed_out == 1
    assert state == {"unfinished_requests": 0, "records": 0}


def test_pruning_from_the_extension_object(served):
    base, _ = served
    response = client_of(base).chat.completions.create(
        model="shipped", messages=MESSAGES, reasoning_effort="medium", seed=0,
        extra_body={"sprm": {"prune": "halving", "prune_keep": 2, "return_candidates": True}},
    )  # fmt: skip
    candidates = extra(response, "sprm")["candidates"]
    assert len(candidates) == 8 and response.choices[0].message.content
    full = client_of(base).chat.completions.create(
        model="shipped", messages=MESSAGES, reasoning_effort="medium", seed=0
    )
    # Halving stops rows early: fewer thinking tokens than the same request without pruning.
    assert (
        response.usage.completion_tokens_details.reasoning_tokens
        < full.usage.completion_tokens_details.reasoning_tokens
    )
