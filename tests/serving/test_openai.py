"""The OpenAI-compatible routes (model/serving/openai_api.py) through the official `openai` client, against a real
uvicorn on 127.0.0.1 serving the shipped model: a chat completion is the engine's `generate` with the options
`POST /generate` resolves, streamed or not; errors come back as the client's typed exceptions. No test depends on
timing: the one that needs the model busy holds it on a threading.Event."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from served import running  # noqa: E402

from sprm_kernels.model.engines.common import generation_options  # noqa: E402
from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.serving.app import create_app  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402

MESSAGES = [{"role": "user", "content": "4+8+1+6+9+3=?"}]
EVENT_TIMEOUT = 120.0  # the bound on waiting for an event: only a hang ever reaches it


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The shipped model is tiny: one thread is faster, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(one_torch_thread):
    return load_engine(SHIPPED_DIR, engine="hf", device="cpu", backend="torch")


def client_of(base: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=EVENT_TIMEOUT)


@pytest.fixture(scope="module")
def base(engine):
    with running(create_app(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return client_of(base)


def extra(model, name: str):
    """A field OpenAI's schema does not declare (`reasoning_content`, `sprm`): the client keeps it as an extra."""
    return (model.model_extra or {}).get(name)


def thinking(engine, candidate) -> str:
    start, end = (engine.tokenizer.decode([i]) for i in (engine.think_start_id, engine.think_end_id))
    return candidate.text.replace(start, "").replace(end, "")


def test_chat_completion_is_generate_with_the_resolved_options(engine, base, client):
    response = client.chat.completions.create(
        model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0, user="someone"
    )
    from_generate = httpx.post(
        f"{base}/generate", json={"messages": MESSAGES, "mode": "low", "seed": 0}, timeout=EVENT_TIMEOUT
    )
    assert from_generate.status_code == 200, from_generate.text
    result = engine.generate(MESSAGES, mode="low", **generation_options(engine, MESSAGES, seed=0))

    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == "shipped"
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == result.answer == from_generate.json()["answer"]
    reasoning = extra(choice.message, "reasoning_content")
    assert reasoning and reasoning == thinking(engine, result.candidates[result.best])
    assert "</think>" not in reasoning and "<think>" not in reasoning
    assert choice.finish_reason == "stop"  # the shipped model writes EOS well within its answer budget
    usage = response.usage
    assert usage.prompt_tokens == len(result.prompt_token_ids)
    assert usage.completion_tokens == len(result.answer_token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == result.stats.think_generated_tokens
    sprm = extra(response, "sprm")
    assert sprm["k"] == 2 and sprm["score"] == result.candidates[result.best].score and "candidates" not in sprm


def test_reasoning_tokens_grow_with_reasoning_effort(engine, client):
    tokens = {}
    for effort in ("low", "high"):
        response = client.chat.completions.create(model="shipped", messages=MESSAGES, reasoning_effort=effort, seed=0)
        tokens[effort] = response.usage.completion_tokens_details.reasoning_tokens
        assert extra(response, "sprm")["k"] == {"low": 2, "high": 32}[effort]
    result = engine.generate(MESSAGES, mode="high", **generation_options(engine, MESSAGES, seed=0))
    assert tokens["high"] == result.stats.think_generated_tokens
    assert tokens["low"] < tokens["high"]


def test_sprm_extension_returns_the_candidates(engine, client):
    response = client.chat.completions.create(
        model="shipped", messages=MESSAGES, seed=0, extra_body={"sprm": {"k": 4, "return_candidates": True}}
    )
    result = engine.generate(MESSAGES, k=4, **generation_options(engine, MESSAGES, seed=0))
    sprm = extra(response, "sprm")
    assert sprm["k"] == 4 and len(sprm["candidates"]) == 4
    assert [c["text"] for c in sprm["candidates"]] == [c.text for c in result.candidates]
    assert [c["score"] for c in sprm["candidates"]] == [c.score for c in result.candidates]
    assert response.choices[0].message.content == result.answer


def test_n_choices_are_the_best_candidates_each_with_its_answer(engine, client):
    response = client.chat.completions.create(model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0, n=2)
    result = engine.generate(MESSAGES, mode="low", answer_all=True, **generation_options(engine, MESSAGES, seed=0))
    assert len(response.choices) == 2
    chosen = extra(response, "sprm")["chosen"]
    assert chosen[0] == result.best and sorted(chosen) == [0, 1]
    for choice, index in zip(response.choices, chosen, strict=True):
        assert choice.message.content == result.candidates[index].answer
        assert extra(choice.message, "reasoning_content") == thinking(engine, result.candidates[index])
    # The first choice is the one n=1 returns (answer_all keeps the chosen answer's samples).
    single = client.chat.completions.create(model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0)
    assert response.choices[0].message.content == single.choices[0].message.content
    answer_tokens = sum(len(result.candidates[index].answer_token_ids) for index in chosen)
    assert response.usage.completion_tokens == answer_tokens


def test_stream_adds_up_to_the_completion(client):
    options = {"model": "shipped", "messages": MESSAGES, "reasoning_effort": "low", "seed": 0}
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join(extra(delta, "reasoning_content") or "" for delta in deltas)
    content = "".join(delta.content or "" for delta in deltas)
    assert reasoning == extra(whole.choices[0].message, "reasoning_content")
    assert content == whole.choices[0].message.content
    assert sum(bool(delta.content) for delta in deltas) == len(content)  # one chunk per answer character here
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_without_usage_sends_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


@pytest.mark.parametrize(
    "options, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"n": 3, "reasoning_effort": "low"}, "n"),  # n > k = 2
        ({"extra_body": {"sprm": {"k": 0}}}, "sprm.k"),
        ({"extra_body": {"sprm": {"beams": 4}}}, "sprm.beams"),  # unknown keys inside `sprm` are refused
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
    ],
)
def test_bad_values_raise_bad_request_naming_the_field(client, options, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="shipped", messages=MESSAGES, **options)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.type == "invalid_request_error"


def test_unknown_top_level_fields_are_ignored(client):
    response = client.chat.completions.create(
        model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0, extra_body={"logit_bias_v2": 1}
    )
    assert response.choices[0].message.content


def test_over_the_context_is_413_naming_the_budget(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="shipped", messages=MESSAGES, max_completion_tokens=1000)
    assert caught.value.status_code == 413
    assert caught.value.param == "max_completion_tokens" and caught.value.type == "invalid_request_error"
    assert "context of 160 tokens" in caught.value.message


def test_models_lists_the_model(client, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [engine.info().model_name] == ["shipped"]
    assert models.data[0].owned_by == "sprm-kernels" and models.data[0].object == "model"


def test_other_routes_keep_their_error_shape(base):
    response = httpx.post(f"{base}/generate", json={"prompt": "1+1=?", "temperature": -1}, timeout=EVENT_TIMEOUT)
    assert response.status_code == 422 and set(response.json()) == {"detail"}
    assert httpx.get(f"{base}/nowhere").json() == {"detail": "Not Found"}
    assert httpx.get(f"{base}/v1/nowhere").json()["error"]["type"] == "not_found_error"


def test_missing_token_raises_authentication_error(engine):
    with running(create_app(engine, token="secret")) as url:
        with pytest.raises(openai.AuthenticationError) as caught:
            client_of(url, api_key="wrong").models.list()
        assert caught.value.status_code == 401
        assert [m.id for m in client_of(url, api_key="secret").models.list().data] == ["shipped"]


def test_full_queue_is_503(engine, monkeypatch):
    """max_queue=1 and the model held inside a generation: a second request is refused with 503."""
    entered, release = threading.Event(), threading.Event()
    real_generate = engine.generate

    def held_generate(prompt, **options):
        entered.set()
        assert release.wait(EVENT_TIMEOUT)
        return real_generate(prompt, **options)

    monkeypatch.setattr(engine, "generate", held_generate)
    with running(create_app(engine, max_queue=1)) as url:
        client = client_of(url)
        first: list = []
        request = {"model": "shipped", "messages": MESSAGES, "reasoning_effort": "low", "seed": 0}
        thread = threading.Thread(target=lambda: first.append(client.chat.completions.create(**request)))
        thread.start()
        try:
            assert entered.wait(EVENT_TIMEOUT)
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(**request)
            assert caught.value.status_code == 503 and caught.value.code == "queue_full"
            assert caught.value.response.headers["retry-after"] == "1"
        finally:
            release.set()
            thread.join(EVENT_TIMEOUT)
        assert first and first[0].choices[0].message.content


CHAT_TEXT = "<|user|>4+8+1+6+9+3=?<|end|><|assistant|><think>"  # what the shipped model's chat template writes


def test_text_completion_is_the_chat_completion_without_its_template(client):
    chat = client.chat.completions.create(model="shipped", messages=MESSAGES, reasoning_effort="low", seed=0)
    text = client.completions.create(model="shipped", prompt=CHAT_TEXT, seed=0, extra_body={"reasoning_effort": "low"})
    assert text.object == "text_completion"
    # The same prompt ids, so the same generation: the text is the chosen thinking as written, then the answer.
    assert text.choices[0].text.endswith("</think>" + chat.choices[0].message.content)
    assert text.choices[0].text.removesuffix(chat.choices[0].message.content).replace("</think>", "") == extra(
        chat.choices[0].message, "reasoning_content"
    )
    assert text.usage == chat.usage and text.choices[0].finish_reason == chat.choices[0].finish_reason
    streamed = client.completions.create(
        model="shipped", prompt=CHAT_TEXT, seed=0, stream=True, extra_body={"reasoning_effort": "low"}
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="shipped", prompt=[CHAT_TEXT, CHAT_TEXT])
    assert refused.value.body["param"] == "prompt"


def test_stop_cuts_the_answer_before_the_stop_string(client):
    options = {"model": "shipped", "messages": MESSAGES, "reasoning_effort": "low", "seed": 0}
    whole = client.chat.completions.create(**options).choices[0].message.content
    assert len(whole) >= 2
    cut = client.chat.completions.create(**options, stop=[whole[1:]])
    assert cut.choices[0].message.content == whole[:1] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**options, stop=whole[1:], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[:1]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**options, stop=["a", "b", "c", "d", "e"])
    assert refused.value.body["param"] == "stop"


def test_pruning_options_pass_through_and_the_hf_engine_refuses_them(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="shipped", messages=MESSAGES, extra_body={"sprm": {"prune": "margin"}})
    assert "hf engine does not prune" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="shipped", messages=MESSAGES, extra_body={"sprm": {"prune": "maybe"}})
    assert bad.value.body["param"] == "sprm.prune"
