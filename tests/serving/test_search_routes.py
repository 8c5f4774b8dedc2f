"""Step-level search through the server (HF engine, the shipped model): `POST /generate` with `search` and the
OpenAI chat route with `sprm.search` answer what the engine's `search` gives for the same resolved options, and
the options a search does not take are refused by name, before any work. The vLLM engines' are in
tests/engines/vllm/test_vllm_openai.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from served import running  # noqa: E402

from sprm_kernels.model.core.params import SEARCH_SAMPLING_OPTIONS  # noqa: E402
from sprm_kernels.model.engines.common import generation_options  # noqa: E402
from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.serving.app import create_app  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402

MESSAGES = [{"role": "user", "content": "4+8+1+6+9+3=?"}]
SEARCH = {"method": "dvts", "beam_width": 2, "expansions": 2}
TIMEOUT = 120.0  # only a hang reaches it


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shipped model is tiny: one thread is faster
    yield load_engine(SHIPPED_DIR, engine="hf", device="cpu", backend="torch")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(engine):
    with running(create_app(engine)) as url:
        yield url


def expected(engine, seed: int):
    options = generation_options(engine, MESSAGES, seed=seed)
    return engine.search(MESSAGES, **SEARCH, **{n: v for n, v in options.items() if n in SEARCH_SAMPLING_OPTIONS})


def test_generate_route_searches(engine, base):
    response = httpx.post(f"{base}/generate", json={"messages": MESSAGES, "seed": 3, "search": SEARCH},
                          timeout=TIMEOUT)  # fmt: skip
    assert response.status_code == 200, response.text
    body, result = response.json(), expected(engine, 3)
    assert [c["text"] for c in body["candidates"]] == [c.text for c in result.candidates]
    assert body["best"] == result.best and body["answer"] == result.answer
    assert body["stats"]["rounds"] == result.stats.rounds > 0


def test_chat_route_searches_streamed_or_not(engine, base):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    body = {"sprm": {"search": SEARCH, "return_candidates": True}}
    whole = client.chat.completions.create(model="shipped", messages=MESSAGES, seed=5, extra_body=body)
    result = expected(engine, 5)
    assert whole.choices[0].message.content == result.answer
    sprm = (whole.model_extra or {})["sprm"]
    assert [c["text"] for c in sprm["candidates"]] == [c.text for c in result.candidates]
    stream = client.chat.completions.create(model="shipped", messages=MESSAGES, seed=5, extra_body=body, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == result.answer


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"search": {**SEARCH, "method": "greedy"}}, "search.method"),
        ({"search": {"beam_width": 2}}, "search.method"),
        ({"search": {**SEARCH, "beam_width": 0}}, "search.beam_width"),
        ({"search": {**SEARCH, "width": 2}}, "search.width"),
        ({"search": SEARCH, "k": 4}, "k does not apply"),
        ({"search": SEARCH, "prune": "margin"}, "prune does not apply"),
    ],
)
def test_generate_route_refuses_bad_search_options(base, body, param):
    response = httpx.post(f"{base}/generate", json={"messages": MESSAGES, **body}, timeout=TIMEOUT)
    assert response.status_code == 422 and param in response.json()["detail"], response.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"sprm": {"search": SEARCH, "k": 4}}, "sprm.k"),
        ({"sprm": {"search": SEARCH, "prune": "margin"}}, "sprm.prune"),
    ],  # fmt: skip
)
def test_chat_route_refuses_what_a_search_does_not_take(base, body, param):
    body = {"sprm": {"search": SEARCH}, **body}
    response = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.get(f"{base}/health", timeout=TIMEOUT).status_code == 200  # still serving
