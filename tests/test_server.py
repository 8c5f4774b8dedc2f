"""The HTTP server (model/server.py) under a real uvicorn on 127.0.0.1 and a real HTTP client (httpx).

Most tests run the server in a thread of this process around an in-memory tiny model, so that a test can slow
the model down or make it fail; the shutdown test runs `python -m sprm_kernels.model.cli serve` as a subprocess
and sends it SIGTERM. Every wait is bounded; every server is stopped (and every child killed) in a finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from sprm_kernels.model import ReflectiveModel, tiny  # noqa: E402
from sprm_kernels.model.server import create_app  # noqa: E402
from sprm_kernels.model.tokens import chat_prompt_ids  # noqa: E402

HIDDEN = 32
CONTEXT = 256  # the tiny policy's max_position_embeddings
REQUEST_TIMEOUT = httpx.Timeout(30.0)

# Batched and alone scores are not always bitwise equal on CPU, for two fp32 summation-order reasons measured on
# this model: the SDPA flash kernel picks its key blocking from the padded width (features differ by ~1e-7), and
# the head's GEMM picks its kernel from the number of step rows in the batch (a step's logit differs in its last
# bits; the tiny head's 10x-scaled weights amplify that). Over 350 batched-vs-alone comparisons the worst difference
# was 4.8e-7 (H=32) and 6.6e-7 (H=64); 1e-5 leaves room for other CPUs' kernels and stays far below the gaps
# between the texts' scores (checked below), and token ids and scored positions are compared exactly: a result
# routed to the wrong request cannot pass.
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine (two OpenMP threads on two shared
    cores wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    tokenizer = tiny.make_char_tokenizer()
    policy = tiny.make_tiny_policy("qwen2", len(tokenizer), hidden_size=HIDDEN, max_positions=CONTEXT)
    return ReflectiveModel(policy, tokenizer, tiny.make_tiny_head(HIDDEN), backend="torch")


def make_texts(count: int, seed: int = 0, max_steps: int = 12) -> list[str]:
    """Chat-formatted thinking with 1 to max_steps steps (~25 to ~130 tokens), all different."""
    rng = random.Random(seed)
    texts = set()
    while len(texts) < count:
        steps = "".join(
            f"{rng.randint(0, 99)}+{rng.randint(0, 99)}={rng.randint(0, 199)}.\n\n"
            for _ in range(rng.randint(1, max_steps))
        )
        texts.add(f"<|user|>{rng.randint(0, 9)}+{rng.randint(0, 9)}<|end|><|assistant|><think>{steps}</think>x")
    return sorted(texts)


@contextlib.contextmanager
def running(app, timeout: float = 20.0):
    """uvicorn serving `app` in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def health(base: str) -> dict:
    response = httpx.get(f"{base}/health", timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200
    return response.json()


def fire(base: str, requests: list[tuple[str, dict]], concurrency: int, limit: float = 60.0) -> list[httpx.Response]:
    """POST every (path, body) from `concurrency` concurrent clients; responses in request order."""

    async def run():
        responses = [None] * len(requests)
        pending = iter(range(len(requests)))
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:

            async def client_loop():
                for index in pending:  # the clients share one iterator: each request is sent once
                    path, body = requests[index]
                    responses[index] = await client.post(path, json=body)

            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(concurrency))), limit)
        return responses

    return asyncio.run(run())


def assert_same_score(answer: dict, expected, return_all_scores: bool) -> None:
    if not return_all_scores:
        assert set(answer) == {"value"}
        assert answer["value"] == pytest.approx(expected.value, abs=SCORE_TOLERANCE)
        return
    assert set(answer) == {"value", "all_scores", "token_ids", "score_positions"}
    assert answer["value"] == pytest.approx(expected.value, abs=SCORE_TOLERANCE)
    assert answer["all_scores"] == pytest.approx(expected.all_scores, abs=SCORE_TOLERANCE)
    assert answer["token_ids"] == expected.token_ids
    assert answer["score_positions"] == expected.score_positions


# -- contract ---------------------------------------------------------------------------------------------------


def test_score_contract_matches_score_alone(model):
    """The reference client's shapes: {"text", "return_all_scores"} -> {"value"} or the four ScoreResult fields,
    with exactly the values of `ReflectiveModel.score` on the text alone (one request at a time: a batch of one)."""
    texts = make_texts(6) + ["no markers, no steps"]
    with running(create_app(model)) as base, httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        for text in texts:
            expected = model.score(text, return_all_scores=True)
            assert client.post("/score", json={"text": text}).json() == {"value": expected.value}
            full = client.post("/score", json={"text": text, "return_all_scores": True}).json()
            assert full == {
                "value": expected.value,
                "all_scores": expected.all_scores,
                "token_ids": expected.token_ids,
                "score_positions": expected.score_positions,
            }
        assert client.post("/score", json={"text": "no markers, no steps"}).json() == {"value": 0.0}

        batch = client.post("/score_batch", json={"texts": texts, "return_all_scores": True})
        assert batch.status_code == 200 and list(batch.json()) == ["results"]
        for answer, text in zip(batch.json()["results"], texts, strict=True):
            assert_same_score(answer, model.score(text, return_all_scores=True), return_all_scores=True)
        assert client.post("/score_batch", json={"texts": []}).json() == {"results": []}

        status = client.get("/health").json()
        assert status["status"] == "ok" and status["device"] == "cpu" and status["dtype"] == "float32"
        assert status["max_text_tokens"] == CONTEXT and status["queue_depth"] == 0
        assert status["texts_scored"] == 2 * len(texts) + 1 + len(texts)


def test_generate_matches_generate(model):
    options = dict(k=3, max_think_tokens=24, max_answer_tokens=6, seed=7, temperature=1.0)
    expected = model.generate("1+2", **options)
    with running(create_app(model)) as base, httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        answer = client.post("/generate", json={"prompt": "1+2", **options}).json()
        assert answer["best"] == expected.best and answer["answer"] == expected.answer
        assert [c["text"] for c in answer["candidates"]] == [c.text for c in expected.candidates]
        assert [c["score"] for c in answer["candidates"]] == [c.score for c in expected.candidates]
        assert answer["stats"]["total_tokens"] == expected.stats.total_tokens
        assert set(answer["stats"]["seconds"]) == {"prefill", "think", "select", "answer"}
        assert "token_ids" not in answer["candidates"][0]

        messages = [{"role": "user", "content": "1+2"}]
        body = {"messages": messages, "mode": "low", "max_think_tokens": 8, "max_answer_tokens": 2, "seed": 0}
        answer = client.post("/generate", json={**body, "return_token_ids": True}).json()
        assert len(answer["candidates"]) == 2 and all("token_ids" in c for c in answer["candidates"])
        assert answer["prompt_token_ids"] == chat_prompt_ids(model.tokenizer, messages)
        assert health(base)["generations"] == 2


# -- load -------------------------------------------------------------------------------------------------------


def well_separated_texts(model, pool_size: int = 120) -> list[str]:
    """Texts whose scores differ pairwise by more than 100x the tolerance: a result routed to the wrong request
    cannot pass, even among the answers that carry only the value."""
    pool = make_texts(pool_size, seed=1)
    texts, last = [], None
    for value, text in sorted(zip([result.value for result in model.score(pool)], pool, strict=True)):
        if last is None or value - last > 100 * SCORE_TOLERANCE:
            texts.append(text)
            last = value
    assert len(texts) >= 30
    return texts


def test_load_32_clients_batches_and_routes_exactly(model):
    """520 requests from 32 concurrent clients, with generations interleaved: no error, every result equal to the
    same text scored alone, and batches of more than one request really formed."""
    texts = well_separated_texts(model)
    alone = {text: model.score(text, return_all_scores=True) for text in texts}
    rng = random.Random(2)
    requests = [("/score", {"text": rng.choice(texts), "return_all_scores": i % 2 == 0}) for i in range(520)]
    generation = {"prompt": "3+4", "k": 2, "max_think_tokens": 12, "max_answer_tokens": 3, "seed": 1}
    for position in (100, 300):
        requests.insert(position, ("/generate", generation))

    with running(create_app(model, max_batch_tokens=4096)) as base:
        started = time.perf_counter()
        responses = fire(base, requests, concurrency=32)
        seconds = time.perf_counter() - started
        status = health(base)

    errors = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not errors
    for (path, body), response in zip(requests, responses, strict=True):
        if path == "/score":
            assert_same_score(response.json(), alone[body["text"]], body["return_all_scores"])
    assert status["texts_scored"] == 520 and status["generations"] == 2 and status["failed_batches"] == 0
    assert status["multi_text_batches"] > 0 and status["largest_batch"] > 1
    assert status["batches_served"] < 520, status
    print(f"520 requests in {seconds:.1f} s, {status['batches_served']} batches, largest {status['largest_batch']}")


# -- robustness -------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (path, raw body or JSON, expected status)
    ("/score", b'{"text": "1+1"', 400),  # malformed JSON
    ("/score", b"", 422),  # no body
    ("/score", ["1+1"], 422),  # not an object
    ("/score", {}, 422),  # no text
    ("/score", {"text": 5}, 422),
    ("/score", {"text": ["1+1"]}, 422),
    ("/score", {"text": "1+1", "return_all_scores": "yes"}, 422),
    ("/score", {"text": "1+1", "return_all_scores": 1}, 422),
    ("/score", {"text": ""}, 422),
    ("/score", {"text": "1+1", "temperature": 0.5}, 422),  # unknown field
    ("/score", {"text": "1" * (CONTEXT + 1)}, 413),  # over the model's context
    ("/score_batch", {"texts": "1+1"}, 422),
    ("/score_batch", {"texts": ["1+1", ""]}, 422),
    ("/score_batch", {"texts": ["1+1", "2" * (CONTEXT + 1)]}, 413),
    ("/score_batch", {"texts": ["1"] * 9}, 413),  # more texts than the queue holds (max_queue=8 below)
    ("/generate", {}, 422),  # neither prompt nor messages
    ("/generate", {"prompt": "1+1", "messages": [{"role": "user", "content": "1+1"}]}, 422),
    ("/generate", {"prompt": "1+1", "mode": "ultra"}, 422),
    ("/generate", {"prompt": "1+1", "mode": "low", "k": 2}, 422),
    ("/generate", {"prompt": "1+1", "k": 0}, 422),
    ("/generate", {"prompt": "1+1", "k": 10_000}, 422),
    ("/generate", {"prompt": "1+1", "top_p": 0.0}, 422),
    ("/generate", {"prompt": "   ", "max_think_tokens": 4, "max_answer_tokens": 1}, 422),
    ("/generate", {"messages": [{"role": "user"}]}, 422),
    ("/generate", {"prompt": "1+1"}, 413),  # the default budgets (4096 + 1024) exceed the tiny model's 256
]


@pytest.mark.parametrize(
    "path,body,status", BAD_REQUESTS, ids=[f"{p}-{s}-{i}" for i, (p, _, s) in enumerate(BAD_REQUESTS)]
)
def test_bad_request_gets_4xx_json_and_server_keeps_serving(path, body, status, bad_input_server):
    client = bad_input_server
    content = body if isinstance(body, bytes) else None
    kwargs = (
        {"content": content, "headers": {"content-type": "application/json"}} if content is not None else {"json": body}
    )
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert "1111111111" not in detail  # the input is not echoed back
    assert client.post("/score", json={"text": "1+1=2.\n\n"}).status_code == 200


def test_malformed_json_message(bad_input_server):
    response = bad_input_server.post("/score", content=b'{"text": 1', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": "malformed JSON at character 10: Expecting ',' delimiter"}


@pytest.fixture(scope="module")
def bad_input_server(model):
    with running(create_app(model, max_queue=8)) as base, httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as c:
        yield c


def test_wrong_method_and_path_are_json_4xx(bad_input_server):
    assert bad_input_server.get("/score").status_code == 405
    response = bad_input_server.get("/nowhere")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


def test_token_is_required_when_set(model):
    with running(create_app(model, token="s3cret")) as base, httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = c.post("/score", json={"text": "1+1"}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"detail": "missing or wrong bearer token"}
        assert c.get("/health").status_code == 401
        assert c.post("/score", content=b"{", headers={"content-type": "application/json"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.post("/score", json={"text": "1+1"}, headers=good).status_code == 200
        assert c.get("/health", headers=good).status_code == 200


def slow_score(monkeypatch, model, seconds: float, slow: list[int] | None = None, poison: list[int] | None = None):
    """`model.score` sleeps first (only for a batch holding the `slow` token ids, if given); a batch holding the
    `poison` token ids raises."""
    real_score = model.score

    def score(sequences, **kwargs):
        if slow is None or slow in sequences:
            time.sleep(seconds)
        if poison is not None and poison in sequences:
            raise RuntimeError("poisoned batch")
        return real_score(sequences, **kwargs)

    monkeypatch.setattr(model, "score", score)


def test_full_queue_answers_503_with_retry_after(model, monkeypatch):
    slow_score(monkeypatch, model, seconds=0.3)
    text = make_texts(1)[0]
    with running(create_app(model, max_queue=3)) as base:
        responses = fire(base, [("/score", {"text": text})] * 10, concurrency=10)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 3, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1" and "queue full" in response.json()["detail"]
        monkeypatch.undo()
        assert httpx.post(f"{base}/score", json={"text": text}, timeout=REQUEST_TIMEOUT).status_code == 200
        assert health(base)["queue_depth"] == 0


def test_failing_batch_fails_only_the_faulty_request(model, monkeypatch):
    texts = make_texts(7, seed=3)
    poison = "<think>0+0=0.\n\n</think>poison"
    ids = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = {text: model.score(text) for text in texts}
    slow_score(monkeypatch, model, seconds=1.5, slow=ids(texts[0]), poison=ids(poison))
    batch = texts[1:4] + [poison] + texts[4:]
    with running(create_app(model)) as base:

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT) as client:
                blocker = asyncio.create_task(client.post("/score", json={"text": texts[0]}))
                rest = [asyncio.create_task(client.post("/score", json={"text": text})) for text in batch]
                # Every request in hand while the blocker's batch still runs: the others form one batch after it.
                while (await client.get("/health")).json()["queue_depth"] < 1 + len(batch):
                    await asyncio.sleep(0.01)
                return await asyncio.wait_for(asyncio.gather(blocker, *rest), 30)

        responses = asyncio.run(asyncio.wait_for(run(), 60))
        status = health(base)
    by_text = dict(zip([texts[0], *batch], responses, strict=True))
    assert by_text[poison].status_code == 500
    assert by_text[poison].json() == {"detail": "scoring failed: RuntimeError: poisoned batch"}
    for text in texts:
        assert by_text[text].status_code == 200
        assert by_text[text].json()["value"] == pytest.approx(alone[text].value, abs=SCORE_TOLERANCE)
    assert status["failed_batches"] == 1 and status["failed_texts"] == 1  # the batch of 7, retried one by one
    assert status["texts_scored"] == len(texts)


def test_failing_generation_is_a_500_and_the_server_lives(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of cache")

    monkeypatch.setattr(model, "generate", broken)
    body = {"prompt": "1+1", "k": 2, "max_think_tokens": 4, "max_answer_tokens": 1}
    with running(create_app(model)) as base, httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        response = client.post("/generate", json=body)
        assert response.status_code == 500
        assert response.json() == {"detail": "generation failed: RuntimeError: out of cache"}
        assert client.post("/score", json={"text": "1+1"}).status_code == 200


# -- shutdown ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_requests_in_flight_and_exits_0(tmp_path):
    model_dir = tiny.save_tiny_reflective(tmp_path / "model", hidden_size=HIDDEN)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    command = [sys.executable, "-m", "sprm_kernels.model.cli", "serve", "--model", model_dir, "--port", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert child.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.2)

        # Generations (the slow part: a second or more of model time in all) and scores, sent at once.
        generation = {"prompt": "1+2", "k": 16, "max_think_tokens": 150, "max_answer_tokens": 40, "temperature": 1.0}
        requests = [("/generate", {**generation, "seed": seed}) for seed in range(4)]
        requests += [("/score", {"text": text}) for text in make_texts(10)]
        responses = []
        client = threading.Thread(target=lambda: responses.extend(fire(base, requests, len(requests), limit=120)))
        client.start()
        deadline = time.monotonic() + 30
        while True:  # until every request has arrived
            status = health(base)
            if status["accepted"] == len(requests):
                break
            assert time.monotonic() < deadline, f"the requests did not all arrive: {status}"
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        assert status["queue_depth"] >= 2, status  # requests in flight at SIGTERM
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connection is taken once shutting down
            httpx.get(f"{base}/health", timeout=5.0)
        client.join(120)
        assert not client.is_alive()
        assert child.wait(60) == 0, log_path.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    log_text = log_path.read_text()
    assert [r.status_code for r in responses] == [200] * len(requests), log_text
    assert all(len(r.json()["candidates"]) == 16 for r in responses[:4])
    assert "Traceback" not in log_text and "batch of " in log_text and "generate: 16 candidates" in log_text
