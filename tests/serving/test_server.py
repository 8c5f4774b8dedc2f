"""The HTTP server (model/serving/) under a real uvicorn on 127.0.0.1 and a real HTTP client (httpx).

Most tests run the server in a thread of this process around an in-memory tiny model, so that a test can slow
the model down or make it fail; the shutdown test runs `python -m sprm_kernels.model.cli.main serve` as a subprocess
and sends it SIGTERM. No test depends on timing: a test that needs the model or the tokenizer busy holds it on a
threading.Event it releases itself, and waits on events or on the server's own counters, never on a sleep or a
latency. Every wait is bounded (a hang fails the test); every server is stopped (and every child killed) in a
finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
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

from served import running  # noqa: E402

from sprm_kernels.model import ReflectiveModel  # noqa: E402
from sprm_kernels.model.core.tokens import chat_prompt_ids  # noqa: E402
from sprm_kernels.model.serving.app import create_app  # noqa: E402
from sprm_kernels.model.shipped import tiny  # noqa: E402

HIDDEN = 32
CONTEXT = 256  # the tiny policy's max_position_embeddings
REQUEST_TIMEOUT = httpx.Timeout(30.0)
EVENT_TIMEOUT = 120.0  # the bound on waiting for an event: only a hang ever reaches it

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


def health(base: str) -> dict:
    response = httpx.get(f"{base}/health", timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200
    return response.json()


def fire(base: str, requests: list[tuple[str, dict]], concurrency: int, limit: float = 240.0) -> list[httpx.Response]:
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


def test_generate_request_fields_are_the_generation_params():
    """One source of options: the request's generation fields are GenerationParams' (less the two the server does
    not serve), with their help text, every one defaulting to None ("the model's default")."""
    from dataclasses import fields

    from sprm_kernels.model.core.params import GenerationParams
    from sprm_kernels.model.serving.schemas import GenerateRequest

    served = {f.name: f.metadata["help"] for f in fields(GenerationParams)}
    del served["return_features"], served["answer_all"]
    request_fields = GenerateRequest.model_fields
    assert set(request_fields) == set(served) | {"prompt", "messages", "return_token_ids", "search"}
    for name, help_text in served.items():
        assert request_fields[name].default is None and request_fields[name].description == help_text, name
    # `search` is SearchParams' fields the same way (method required)
    from sprm_kernels.model.core.params import SearchParams
    from sprm_kernels.model.serving.schemas import SearchOptions

    searched = {f.name: f.metadata["help"] for f in fields(SearchParams)}
    assert set(SearchOptions.model_fields) == set(searched)
    for name, help_text in searched.items():
        assert SearchOptions.model_fields[name].description == help_text, name
    assert SearchOptions.model_fields["method"].is_required()


def test_generate_leaves_out_options_to_the_models_defaults(model, monkeypatch):
    """A bare prompt runs with `generation_options`' budgets (fitted to the tiny model's 256 tokens, where the old
    fixed 4096 + 1024 was a 413) and the engine's own sampling defaults; budgets over the context are a 413 naming
    them, before any work."""
    from sprm_kernels.model.engines.common import generation_options

    calls, real_generate = [], model.generate

    def generate(prompt, **options):
        calls.append(options)
        return real_generate(prompt, **options)

    monkeypatch.setattr(model, "generate", generate)
    expected_options = {"mode": "medium", **generation_options(model, "1+2", k=2, seed=3)}
    prompt_tokens = len(chat_prompt_ids(model.tokenizer, "1+2"))
    assert prompt_tokens + expected_options["max_think_tokens"] + expected_options["max_answer_tokens"] == CONTEXT
    assert "temperature" not in expected_options  # the in-memory model has no folder: the engine's default
    with running(create_app(model)) as base, httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        answer = client.post("/generate", json={"prompt": "1+2", "k": 2, "seed": 3})
        assert answer.status_code == 200, answer.text
        assert calls == [expected_options]
        expected = real_generate("1+2", **expected_options)
        assert [c["text"] for c in answer.json()["candidates"]] == [c.text for c in expected.candidates]

        over = client.post("/generate", json={"prompt": "1+2", "max_think_tokens": 250, "max_answer_tokens": 1})
        assert over.status_code == 413 and "max_think_tokens + max_answer_tokens" in over.json()["detail"]
        assert len(calls) == 1  # refused before the model ran


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


def test_load_32_clients_batches_and_routes_exactly(model, monkeypatch):
    """520 requests from 32 concurrent clients, with generations interleaved: no error, every result equal to the
    same text scored alone, and batches of more than one request really formed (the first batch is held until
    every client's first request is in hand, so that the next batch has more than one whatever the machine's
    speed)."""
    texts = well_separated_texts(model)
    alone = {text: model.score(text, return_all_scores=True) for text in texts}
    rng = random.Random(2)
    requests = [("/score", {"text": rng.choice(texts), "return_all_scores": i % 2 == 0}) for i in range(520)]
    generation = {"prompt": "3+4", "k": 2, "max_think_tokens": 12, "max_answer_tokens": 3, "seed": 1}
    for position in (100, 300):
        requests.insert(position, ("/generate", generation))

    entered, release = held_score(monkeypatch, model)
    with running(create_app(model, max_batch_tokens=4096)) as base:
        started = time.perf_counter()
        responses = []
        clients = threading.Thread(target=lambda: responses.extend(fire(base, requests, concurrency=32)))
        clients.start()
        try:
            deadline = time.monotonic() + EVENT_TIMEOUT
            while health(base)["queue_depth"] < 32:  # one request per client in hand, the first batch held
                assert clients.is_alive() and time.monotonic() < deadline, "the clients' requests did not arrive"
                time.sleep(0.01)
        finally:
            release.set()
        clients.join(2 * EVENT_TIMEOUT)
        assert not clients.is_alive(), "the clients did not finish"
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
    ("/generate", {"prompt": "1+1", "max_think_tokens": 4096, "max_answer_tokens": 1024}, 413),  # over 256 tokens
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


def held_score(monkeypatch, model, hold: list[int] | None = None, poison: list[int] | None = None):
    """`model.score` waits on `release` (only for a batch holding the `hold` token ids, if given) after setting
    `entered`; a batch holding the `poison` token ids raises. Returns (entered, release): threading.Events, so a test
    knows the model is busy, and frees it, without a clock."""
    real_score = model.score
    entered, release = threading.Event(), threading.Event()

    def score(sequences, **kwargs):
        if hold is None or hold in sequences:
            entered.set()
            assert release.wait(EVENT_TIMEOUT), "the test never released the model"
        if poison is not None and poison in sequences:
            raise RuntimeError("poisoned batch")
        return real_score(sequences, **kwargs)

    monkeypatch.setattr(model, "score", score)
    return entered, release


async def wait_for_queue_depth(client: httpx.AsyncClient, depth: int) -> None:
    """Until the server holds `depth` texts and generations (its own count, read from /health)."""
    while (await client.get("/health")).json()["queue_depth"] < depth:
        await asyncio.sleep(0.01)


def test_full_queue_answers_503_with_retry_after(model, monkeypatch):
    """max_queue=3 and the model held busy: of 10 concurrent requests, exactly 3 are admitted (and answered 200 once
    the model is free) and 7 are refused at once with 503 and Retry-After."""
    entered, release = held_score(monkeypatch, model)
    text = make_texts(1)[0]
    with running(create_app(model, max_queue=3)) as base:

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT) as client:
                pending = {asyncio.create_task(client.post("/score", json={"text": text})) for _ in range(10)}
                refused = set()
                while len(refused) < 7:  # the model is held: only the refusals can come back
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    refused |= done
                depth = (await client.get("/health")).json()["queue_depth"]
                release.set()
                admitted = await asyncio.gather(*pending)
                return [task.result() for task in refused], admitted, depth

        try:
            refused, admitted, depth = asyncio.run(asyncio.wait_for(run(), EVENT_TIMEOUT))
        finally:
            release.set()
        assert entered.is_set() and depth == 3
        assert [r.status_code for r in admitted] == [200] * 3
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1" and "queue full" in response.json()["detail"]
        monkeypatch.undo()
        assert httpx.post(f"{base}/score", json={"text": text}, timeout=REQUEST_TIMEOUT).status_code == 200
        assert health(base)["queue_depth"] == 0


def test_failing_batch_fails_only_the_faulty_request(model, monkeypatch):
    """A blocker holds the model while 7 texts (one poisoned) queue behind it; they form one batch, which fails and
    is retried one text at a time: only the poisoned text gets a 500."""
    texts = make_texts(7, seed=3)
    poison = "<think>0+0=0.\n\n</think>poison"
    ids = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = {text: model.score(text) for text in texts}
    entered, release = held_score(monkeypatch, model, hold=ids(texts[0]), poison=ids(poison))
    batch = texts[1:4] + [poison] + texts[4:]
    with running(create_app(model)) as base:

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT) as client:
                blocker = asyncio.create_task(client.post("/score", json={"text": texts[0]}))
                assert await asyncio.to_thread(entered.wait, EVENT_TIMEOUT), "the blocker never reached the model"
                rest = [asyncio.create_task(client.post("/score", json={"text": text})) for text in batch]
                await wait_for_queue_depth(client, 1 + len(batch))  # all in hand while the blocker holds the model
                release.set()
                return await asyncio.gather(blocker, *rest)

        try:
            responses = asyncio.run(asyncio.wait_for(run(), EVENT_TIMEOUT))
        finally:
            release.set()
        status = health(base)
    by_text = dict(zip([texts[0], *batch], responses, strict=True))
    assert by_text[poison].status_code == 500
    assert by_text[poison].json() == {"detail": "scoring failed: RuntimeError: poisoned batch"}
    for text in texts:
        assert by_text[text].status_code == 200
        assert by_text[text].json()["value"] == pytest.approx(alone[text].value, abs=SCORE_TOLERANCE)
    assert status["failed_batches"] == 1 and status["failed_texts"] == 1  # the batch of 7, retried one by one
    assert status["texts_scored"] == len(texts)
    assert status["batches_served"] == 1  # the blocker's: the 7 came as one batch (failed, retried one at a time)


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


@contextlib.contextmanager
def serve_subprocess(tmp_path, *options: str):
    """`python -m sprm_kernels.model.cli.main serve` on a tiny saved model and a free loopback port, started and waited
    for; yields (child, base URL, log path); killed in the end if still alive."""
    model_dir = tiny.save_tiny_reflective(tmp_path / "model", hidden_size=HIDDEN)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    command = [sys.executable, "-m", "sprm_kernels.model.cli", "serve", "--model", model_dir, "--port", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen([*command, *options], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240  # importing torch and transformers takes minutes on a busy machine
        while "Uvicorn running on" not in log_path.read_text():  # listening; no request sent (tests count them)
            assert child.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield child, base, log_path
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start, or since `reset_peak`) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: VmHWM starts again from the current RSS


def post_huge(port: int, path: str, size: int, chunked: bool, limit: int, while_open=None) -> int:
    """POST a body of `size` bytes to `path` over a raw socket and return the status of the answer. The client sends
    the head and (chunked) just over `limit` bytes of the body, then waits for the status line before it sends the
    rest: a server that read the whole body before answering never answers, and the read fails on the socket's
    timeout. `while_open()` runs while the rest is still unsent; then the rest goes (uvicorn reads and drops it, or
    closes the connection)."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    piece = b'{"text": "' + b"1" * (2**20 - 10)
    pieces = size // len(piece)
    before_answer = (limit // len(piece) + 1) if chunked else 0  # Content-Length alone already says too much
    answered = threading.Event()
    sock = socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT)

    def send_body():
        with contextlib.suppress(OSError):  # the server may close once it has answered
            for index in range(pieces):
                if index == before_answer:
                    answered.wait(EVENT_TIMEOUT)
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")

    sock.sendall(head.encode())
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        status_line = sock.makefile("rb").readline()
        if while_open is not None:
            while_open()
        answered.set()
        sender.join(EVENT_TIMEOUT)
    finally:
        answered.set()
        sock.close()
    return int(status_line.split()[1])


def test_huge_bodies_get_413_at_once_while_health_answers_and_memory_stays_flat(tmp_path):
    """10 MB and 50 MB bodies to every POST route of `sprm serve`, with and without Content-Length: each gets 413
    before the client has sent more than the limit (by Content-Length: none of it), /health answers while the rest
    of the body is still to come, and the server's peak RSS grows by less than 8 MiB. The default body limit of
    this model is 1 MiB (its context of 256 tokens x 13 characters x 12 bytes is less), and uvicorn reads (and
    drops) a refused body in pieces of at most 64 KiB: holding any one of these bodies whole, as the server did
    before, would add at least 10 MB (the old server: 2 GB for 10 MB, as JSON and tokens)."""
    with serve_subprocess(tmp_path) as (child, base, log_path):
        port = int(base.rsplit(":", 1)[1])
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
            for text in make_texts(5):  # warm up every path once
                assert client.post("/score", json={"text": text}).status_code == 200
            assert client.post("/score_batch", json={"texts": make_texts(3)}).status_code == 200
            generation = {"prompt": "1+2", "k": 2, "max_think_tokens": 8, "max_answer_tokens": 2, "seed": 0}
            assert client.post("/generate", json=generation).status_code == 200
            limit = client.get("/health").json()["max_body_bytes"]
            assert limit == 2**20
            before = memory_kib(child.pid)
            reset_peak(child.pid)
            health_answers = []

            def ask_health():
                health_answers.append(client.get("/health").status_code)

            results = []
            for path in ("/score", "/score_batch", "/generate"):
                for size in (10 * 2**20, 50 * 2**20):
                    for chunked in (False, True):
                        status = post_huge(port, path, size, chunked, limit, while_open=ask_health)
                        results.append((path, size, chunked, status))
            after = memory_kib(child.pid)
            assert client.post("/score", json={"text": "1+1=2.\n\n"}).status_code == 200
    assert [status for *_, status in results] == [413] * len(results), results
    assert health_answers == [200] * len(results)
    growth = after["VmHWM"] - before["VmRSS"]
    print(f"RSS {before['VmRSS']} KiB -> {after['VmRSS']} KiB, peak {after['VmHWM']} KiB")
    assert growth < 8 * 1024, (before, after)


class ReadCounter:
    """ASGI wrapper: per request, the body bytes the app under it has received before it starts its answer, and
    in all (what the server ever held of a body)."""

    def __init__(self, app):
        self.app = app
        self.requests = []  # [bytes before the answer, bytes in all, status]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counts = [0, 0, None]
        self.requests.append(counts)

        async def counted_receive():
            message = await receive()
            size = len(message.get("body", b""))
            counts[1] += size
            if counts[2] is None:
                counts[0] += size
            return message

        async def noted_send(message):
            if message["type"] == "http.response.start":
                counts[2] = message["status"]
            await send(message)

        await self.app(scope, counted_receive, noted_send)


def test_a_refused_body_is_read_no_further_than_the_limit(model):
    """The bytes the app reads of a 10 MB body over a 1 MiB limit: none when its Content-Length says so, and at most
    the limit plus what uvicorn buffers at once (one 256 KiB socket read over its 64 KiB high-water mark) when it
    is streamed without one: never the 10 MB."""
    limit = 2**20
    counter = ReadCounter(create_app(model, max_body_bytes=limit))
    with running(counter) as base:
        port = int(base.rsplit(":", 1)[1])
        for chunked in (False, True):
            assert post_huge(port, "/score", 10 * 2**20, chunked, limit) == 413
        assert health(base)["status"] == "ok"
    (declared_before, declared_all, declared_status), (streamed_before, streamed_all, streamed_status), _ = (
        counter.requests
    )
    assert declared_status == streamed_status == 413
    assert declared_before == declared_all == 0
    assert limit < streamed_before == streamed_all <= limit + 2**18 + 2**16, counter.requests


def test_python_clients_that_close_the_connection_read_the_413_of_a_huge_body(model):
    """urllib sends `Connection: close`, so uvicorn closes the socket once it has answered; the server reads and
    drops the body first (within DROP_MAX_BYTES), else the client's send is reset and it never sees the 413. A
    declared body over that bound is answered at once, nothing of it read."""
    import json
    import urllib.error
    import urllib.request

    from sprm_kernels.model.serving.middleware import DROP_MAX_BYTES

    limit = 2**20
    counter = ReadCounter(create_app(model, max_body_bytes=limit))
    with running(counter) as base:
        for path in ("/score", "/v1/chat/completions"):
            body = json.dumps({"text": "1" * (10 * 2**20)}).encode()
            request = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=EVENT_TIMEOUT)
            assert refused.value.code == 413 and "max-body-bytes" in refused.value.read().decode()
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT) as sock:
            head = (
                f"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {DROP_MAX_BYTES + 1}\r\n\r\n"
            )
            sock.sendall(head.encode())  # and no body: answered without waiting for it
            assert sock.makefile("rb").readline().split()[1] == b"413"
        assert health(base)["status"] == "ok"
    dropped, _, too_big = counter.requests[:3]
    assert dropped[2] == 413 and dropped[0] >= 10 * 2**20  # read (and dropped) before the answer
    assert too_big[2] == 413 and too_big[1] == 0


def test_sigterm_finishes_requests_in_flight_and_exits_0(tmp_path):
    with serve_subprocess(tmp_path) as (child, base, log_path):
        # Generations (the slow part: a second or more of model time in all) and scores, sent at once.
        generation = {"prompt": "1+2", "k": 16, "max_think_tokens": 150, "max_answer_tokens": 40, "temperature": 1.0}
        requests = [("/generate", {**generation, "seed": seed}) for seed in range(4)]
        requests += [("/score", {"text": text}) for text in make_texts(10)]
        responses = []
        client = threading.Thread(target=lambda: responses.extend(fire(base, requests, len(requests), limit=120)))
        client.start()
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:  # until every request has arrived (the server's own count)
            status = health(base)
            if status["accepted"] == len(requests):
                break
            assert time.monotonic() < deadline, f"the requests did not all arrive: {status}"
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        assert status["queue_depth"] >= 2, status  # requests in flight at SIGTERM
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:  # 200 until the server has handled the signal; then, draining, a new request gets a 503
            late = httpx.get(f"{base}/health", timeout=REQUEST_TIMEOUT)
            if late.status_code != 200:
                break
            assert time.monotonic() < deadline, "the server never began to drain"
            time.sleep(0.01)
        assert late.status_code == 503 and late.headers["retry-after"] == "1" and late.headers["connection"] == "close"
        client.join(120)
        assert not client.is_alive()
        assert child.wait(60) == 0, log_path.read_text()
        with pytest.raises(httpx.ConnectError):  # stopped: no connection is taken
            httpx.get(f"{base}/health", timeout=5.0)
    log_text = log_path.read_text()
    assert [r.status_code for r in responses] == [200] * len(requests), log_text
    assert all(len(r.json()["candidates"]) == 16 for r in responses[:4])
    assert "Traceback" not in log_text and "batch of " in log_text and "generate: 16 candidates" in log_text


def test_sigterm_during_a_burst_answers_every_request_it_read(tmp_path):
    """201 requests from 32 keep-alive clients, SIGTERM after the 60th answer. Every request the server read gets
    an answer: 200, or 503 with Retry-After once it drains (its own count, logged at exit, and the answers the
    clients got agree). A client can still fail to connect, or see its connection closed, for a request sent in
    the instant the drain ends: the server never read those (before the drain, uvicorn closed idle keep-alive
    connections at once, resetting requests already on their way: 1 to 3 of 201 here)."""
    total, clients, signal_after = 201, 32, 60
    text = "<think>" + "12+34=46.\n\n" * 8 + "</think>x"
    with serve_subprocess(tmp_path) as (child, base, log_path):
        statuses, failures, answered = [], [], 0

        async def run():
            nonlocal answered
            pending = iter(range(total))
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:

                async def client_loop():
                    nonlocal answered
                    for _ in pending:
                        try:
                            response = await client.post("/score", json={"text": text})
                        except httpx.TransportError as error:
                            failures.append(type(error).__name__)
                            continue
                        statuses.append(response.status_code)
                        if response.status_code == 503:
                            assert response.headers["retry-after"] == "1", response.headers
                        answered += 1
                        if answered == signal_after:
                            child.send_signal(signal.SIGTERM)

                await asyncio.gather(*(client_loop() for _ in range(clients)))

        asyncio.run(asyncio.wait_for(run(), 240))
        assert child.wait(60) == 0, log_path.read_text()
    log_text = log_path.read_text()
    counts = re.findall(r"stopped: answered (\d+) of the (\d+) requests read", log_text)
    assert len(counts) == 1, log_text
    server_answered, server_read = map(int, counts[0])
    print(f"{statuses.count(200)} x 200, {statuses.count(503)} x 503, failures {failures}; server {counts[0]}")
    assert set(statuses) <= {200, 503} and statuses.count(200) >= signal_after
    assert server_answered == server_read == len(statuses)
    assert len(statuses) + len(failures) == total and "Traceback" not in log_text


# -- issue 14: bounded bodies and texts, tokenization off the event loop -----------------------------------------


def test_empty_token_is_refused(model):
    for token in ("", "  "):
        with pytest.raises(ValueError, match="token: expected a non-empty string"):
            create_app(model, token=token)


def test_body_over_the_limit_is_413_before_the_app_reads_it(model):
    """By Content-Length (nothing read) and by counting a body streamed without one; the server keeps serving."""
    with running(create_app(model, max_body_bytes=1000)) as base, httpx.Client(base_url=base, timeout=30) as client:
        for path in ("/score", "/score_batch", "/generate"):
            response = client.post(path, content=b"x" * 1001, headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
            assert response.json() == {
                "detail": "request body: 1001 bytes, over the limit of 1000 bytes (--max-body-bytes)"
            }
            streamed = client.post(path, content=iter([b"x" * 600, b"x" * 600, b"x" * 600]))  # chunked
            assert streamed.status_code == 413
            assert streamed.json()["detail"].startswith("request body: more than 1000 bytes")
        body = b'{"text": "1+1=2.\\n\\n"' + b" " * 1000
        body = body[:999] + b"}"  # exactly at the limit (JSON whitespace): served
        assert client.post("/score", content=body, headers={"content-type": "application/json"}).status_code == 200
        chunked = iter([b'{"text": ', b'"1+1"}'])  # small, streamed: replayed to the app whole
        assert client.post("/score", content=chunked, headers={"content-type": "application/json"}).status_code == 200


def test_text_over_the_character_limit_is_413_without_tokenizing(model, monkeypatch):
    """A text longer than max_text_tokens x the longest vocabulary entry cannot fit: refused by its length alone."""
    from sprm_kernels.model.serving.app import longest_token_chars

    longest = longest_token_chars(model.tokenizer)
    assert longest == len("<|assistant|>")  # the tiny tokenizer's longest entry
    app = create_app(model, max_text_tokens=10)
    limit = 10 * longest
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").json()["max_text_chars"] == limit

        def no_tokenizing(*args, **kwargs):
            raise AssertionError("tokenized a text over the character limit")

        monkeypatch.setattr(model, "tokenizer", no_tokenizing)
        long_text = "1" * (limit + 1)
        for path, body, where in [
            ("/score", {"text": long_text}, "text"),
            ("/score_batch", {"texts": ["1", long_text]}, "texts.1"),
            ("/generate", {"prompt": long_text, "max_think_tokens": 1, "max_answer_tokens": 0}, "prompt"),
            ("/generate", {"messages": [{"role": "user", "content": long_text}]}, "messages"),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == 413, response.text
            assert response.json()["detail"] == (
                f"{where}: {limit + 1} characters, more than 10 tokens can hold (at most {limit})"
            )
        monkeypatch.undo()
        response = client.post("/score", json={"text": "1" * limit})  # within the characters, over the tokens
        assert response.status_code == 413 and response.json()["detail"] == (
            f"text: {limit} tokens, over the limit of 10 tokens"
        )


class HeldTokenizer:
    """The model's tokenizer, held on each call until the test releases it: a stand-in for a huge text. `entered`
    says a call is under way."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(EVENT_TIMEOUT), "the test never released the tokenizer"
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_tokenizing_runs_off_the_event_loop(model, monkeypatch):
    """While a request's text is being tokenized (held until the test releases it), /health answers: on the event
    loop the tokenizer would block it, and the /health request would never be answered."""
    with running(create_app(model)) as base:

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT) as client:
                await client.get("/health")  # connect first
                for path, body in [
                    ("/score", {"text": "1+1=2.\n\n"}),
                    ("/generate", {"prompt": "1+2", "k": 1, "max_think_tokens": 2, "max_answer_tokens": 0}),
                ]:
                    held = HeldTokenizer(model.tokenizer)
                    monkeypatch.setattr(model, "tokenizer", held)
                    slow = asyncio.create_task(client.post(path, json=body))
                    try:
                        assert await asyncio.to_thread(held.entered.wait, EVENT_TIMEOUT), path
                        assert (await client.get("/health")).status_code == 200
                        assert not slow.done()  # still being tokenized while /health was answered
                    finally:
                        held.release.set()
                    assert (await slow).status_code == 200
                    monkeypatch.undo()

        asyncio.run(asyncio.wait_for(run(), EVENT_TIMEOUT))
