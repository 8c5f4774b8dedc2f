"""HTTP server for SPRM scoring and reflective generation, a drop-in for the reference's scoring API.

`POST /score` takes the reference client's `{"text", "return_all_scores"}` and answers `{"value"}` or, with
`return_all_scores`, `{"value", "all_scores", "token_ids", "score_positions"}` (the fields of `ScoreResult`).
`POST /score_batch` scores a list of texts, `POST /generate` runs `ReflectiveModel.generate`, `GET /health` reports
the model and the queue. Start it with `sprm serve --model DIR` (see `serve`).

Design:
- One worker thread owns the model: every model call (a scoring batch or a generation) runs there, one at a time
  (an asyncio lock on the event loop orders them), so the model is never used by two calls at once, and the event
  loop stays free to take requests meanwhile (torch releases the GIL inside its ops).
- Bounded input, checked before any work: a pure ASGI layer refuses a body over `max_body_bytes` with 413, from its
  Content-Length before reading it, or while counting the bytes of a body sent without one (so at most
  `max_body_bytes` of a body is ever held); a text (or prompt) over `max_text_chars` characters gets 413 before it
  is tokenized (`text_char_limit`: such a text cannot fit in the context); tokenization runs in its own thread,
  never on the event loop, so a long text never stalls the other clients.
- Dynamic batching: a score request tokenizes its text (in the tokenizer thread) and queues it. Once the model
  is free, a batching task takes the queued texts, in arrival order, while their tokens stay within
  `max_batch_tokens`, and scores them in one `score` call (which sorts them by length into forwards of at most
  `max_batch_tokens` padded tokens with little padding). Texts that arrive while the model is busy form the next
  batch, so batches grow with the load and no request ever waits on a timer.
- Failure isolation: when a batch raises, its texts are scored again one at a time, so that only the faulty one
  fails (500 with a message); the server keeps serving.
- Back-pressure: at most `max_queue` texts and generations are in the server's hands (queued or running); more
  get 503 with `Retry-After`.
- Shutdown (`serve`): on SIGTERM the server first drains: it keeps its socket and its connections open, finishes
  the requests in flight, answers every new request 503 with Retry-After, and marks every response
  `Connection: close`, until nothing is in flight and no request came for DRAIN_QUIET_SECONDS (at most
  DRAIN_MAX_SECONDS of 503s after the last request in flight). Only then does uvicorn close the socket and the
  idle connections and run the lifespan shutdown, which stops the batching task and the worker thread. So every
  request the server has read gets an answer: the 200 it was being served, or a 503. What it cannot answer is a
  request it never read: one sent on an idle connection, or a connection made, in the instant it closes them.

There is no TLS: bind to loopback (the default) or put a TLS-terminating proxy in front. `token` only guards
against other local users or a misconfigured bind; over plain HTTP it travels in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The JSON forms of results live in cli.py so that `sprm score` / `sprm generate` run without the serve extra.
from sprm_kernels.model.core.types import ScoreResult, generation_json, score_json
from sprm_kernels.model.engines.base import Engine
from sprm_kernels.model.engines.common import context_limit, token_problem

logger = logging.getLogger("sprm.server")

MAX_K = 64  # candidates per generation: twice the paper's "high" mode; more is a denial of service, not a request
RETRY_AFTER_SECONDS = 1


# -- requests ---------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: no silent coercion ("yes" -> True, 1 -> 1.0 is still allowed for floats); forbid: a misspelt field is
    # an error rather than a default quietly used in its place.
    model_config = ConfigDict(extra="forbid", strict=True)


NonEmptyText = Annotated[str, Field(min_length=1)]


class ScoreRequest(_Strict):
    text: NonEmptyText
    return_all_scores: bool = False


class ScoreBatchRequest(_Strict):
    texts: list[NonEmptyText]
    return_all_scores: bool = False


class Message(_Strict):
    role: str
    content: str


class GenerateRequest(_Strict):
    prompt: str | None = None
    messages: list[Message] | None = None
    mode: Literal["low", "medium", "high"] | None = None  # neither mode nor k: "medium"
    k: int | None = Field(None, ge=1, le=MAX_K)
    max_think_tokens: int = Field(4096, ge=1)
    max_answer_tokens: int = Field(1024, ge=0)
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    answer_temperature: float | None = Field(None, ge=0)
    seed: int | None = None
    return_token_ids: bool = False

    @model_validator(mode="after")
    def _one_prompt_one_size(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected exactly one of prompt and messages")
        if self.mode is not None and self.k is not None:
            raise ValueError("expected mode or k, not both")
        return self


# -- the model worker -------------------------------------------------------------------------------------------


class Overloaded(Exception):
    """The queue is full: answered 503 with Retry-After."""


class ModelCallFailed(Exception):
    """A model call raised: answered 500 with this message."""


@dataclass
class ServerStats:
    accepted: int = 0  # texts and generations admitted since the start (a 503 is not admitted)
    batches_served: int = 0
    texts_scored: int = 0
    largest_batch: int = 0
    multi_text_batches: int = 0  # batches of more than one text: the evidence that batching happens
    failed_batches: int = 0  # batches that raised and were retried one text at a time
    failed_texts: int = 0
    generations: int = 0


@dataclass
class _QueuedText:
    token_ids: list[int]
    future: asyncio.Future


class ModelWorker:
    """Runs every model call in one thread, and batches queued score requests (see the module docstring)."""

    def __init__(self, model: Engine, *, max_batch_tokens: int, max_queue: int):
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.stats = ServerStats()
        self.in_hand = 0  # texts and generations accepted and not answered yet (queued or running)
        self._queue: deque[_QueuedText] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sprm-model")
        # Held around every model call. A batch is formed once the lock is won, i.e. when the model is free, so it
        # takes every text that queued while a generation ran. asyncio.Lock is FIFO: no starvation either way.
        self._model_lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._model_lock = asyncio.Lock()
        self._batcher = asyncio.create_task(self._batch_loop(), name="sprm-batcher")

    async def stop(self) -> None:
        """Called after the server has answered every request in flight."""
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @contextlib.contextmanager
    def _admitted(self, count: int):
        if self.in_hand + count > self.max_queue:
            raise Overloaded(f"queue full ({self.in_hand} of {self.max_queue} in hand); retry later")
        self.in_hand += count
        self.stats.accepted += count
        try:
            yield
        finally:
            self.in_hand -= count

    async def score(self, sequences: list[list[int]]) -> list[ScoreResult]:
        """Scores of token id lists, each scored in whichever batch it lands in."""
        loop = asyncio.get_running_loop()
        with self._admitted(len(sequences)):
            queued = [_QueuedText(ids, loop.create_future()) for ids in sequences]
            self._queue.extend(queued)
            self._wakeup.set()
            return list(await asyncio.gather(*(item.future for item in queued)))

    async def generate(self, prompt, **options):
        with self._admitted(1):
            async with self._model_lock:
                start = time.perf_counter()
                try:
                    result = await self._in_worker(partial(self.model.generate, prompt, **options))
                finally:
                    self.stats.generations += 1
        logger.info("generate: %d candidates, %d tokens through the model, %.1f ms", len(result.candidates),
                    result.stats.total_tokens, 1000 * (time.perf_counter() - start))  # fmt: skip
        return result

    async def _in_worker(self, call: Callable):
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _batch_loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._model_lock:
                batch = self._take_batch()
                if batch:
                    await self._score_batch(batch)

    def _take_batch(self) -> list[_QueuedText]:
        """Queued texts in arrival order while their tokens stay within max_batch_tokens (the first one always).
        `ReflectiveModel.score` then sorts them by length into forwards of at most max_batch_tokens padded tokens
        with little padding, so the batch is bounded by its real tokens, not by rows x longest."""
        batch, tokens = [], 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # its request went away (cancelled): skip the work
                self._queue.popleft()
                continue
            if batch and tokens + len(item.token_ids) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += len(item.token_ids)
        return batch

    def _score_sequences(self, sequences: list[list[int]]) -> list[ScoreResult]:
        # Step scores always: they cost nothing extra, and the requests of one batch may differ in the flag.
        return self.model.score(sequences, return_all_scores=True, batch_tokens=self.max_batch_tokens)

    async def _score_batch(self, batch: list[_QueuedText]) -> None:
        start = time.perf_counter()
        try:
            results = await self._in_worker(partial(self._score_sequences, [item.token_ids for item in batch]))
        except Exception as error:  # isolate the failure: retry one at a time, so that only the faulty text fails
            self.stats.failed_batches += 1
            logger.warning("batch of %d texts failed (%s: %s); scoring them one at a time", len(batch),
                           type(error).__name__, error)  # fmt: skip
            if len(batch) == 1:
                self._fail(batch[0], error)
                return
            for item in batch:
                try:
                    [result] = await self._in_worker(partial(self._score_sequences, [item.token_ids]))
                except Exception as single_error:
                    self._fail(item, single_error)
                else:
                    self._succeed([item], [result])
            return
        milliseconds = 1000 * (time.perf_counter() - start)
        tokens = sum(len(item.token_ids) for item in batch)
        longest = max(len(item.token_ids) for item in batch)
        logger.info("batch of %d: %d tokens (longest %d), %.1f ms", len(batch), tokens, longest, milliseconds)
        self.stats.batches_served += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.multi_text_batches += len(batch) > 1
        self._succeed(batch, results)

    def _succeed(self, items: list[_QueuedText], results: list[ScoreResult]) -> None:
        self.stats.texts_scored += len(items)
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _fail(self, item: _QueuedText, error: Exception) -> None:
        self.stats.failed_texts += 1
        logger.error("scoring a text of %d tokens failed: %s: %s", len(item.token_ids), type(error).__name__, error)
        if not item.future.done():
            item.future.set_exception(ModelCallFailed(f"scoring failed: {type(error).__name__}: {error}"))


# -- the app ----------------------------------------------------------------------------------------------------


class _BodyLimit:
    """Pure ASGI middleware: a request body over `max_bytes` gets 413 before the app sees any of it, at once when its
    Content-Length says so (nothing of it is read), else as soon as the bytes streamed so far pass the limit. A body
    within the limit is buffered (the app reads all of it anyway) and replayed to the app. uvicorn then reads and
    discards the rest of a refused body, so the client can finish sending and read the 413."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(int(declared), scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(size, scope, receive, send, at_least=True)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal replayed
            if replayed or message["type"] != "http.request":
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope, receive, send, at_least: bool = False):
        size_text = f"more than {self.max_bytes}" if at_least else str(size)
        detail = f"request body: {size_text} bytes, over the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await JSONResponse({"detail": detail}, 413)(scope, receive, send)


class _BearerAuth:
    """Pure ASGI middleware: with a token, every request needs `Authorization: Bearer <token>` (401 otherwise). It
    runs before the body is parsed, so that an unauthenticated client learns nothing from validation errors."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = JSONResponse(
                    {"detail": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def longest_token_chars(tokenizer) -> int:
    """The longest vocabulary entry in characters (added tokens included). A vocabulary entry spells the input it
    covers with at least one character per input character (byte-level BPE: one per byte; SentencePiece: `▁` per
    space; WordPiece: plus `##`), so no token covers more input characters than this."""
    return max((len(entry) for entry in tokenizer.get_vocab()), default=1) or 1


def text_char_limit(tokenizer, max_text_tokens: int | None) -> int | None:
    """Characters beyond which a text cannot fit in `max_text_tokens` tokens: each token covers at most
    `longest_token_chars` characters, so a longer text has more tokens than the limit. Exact for tokenizers that
    turn every character into (part of) a token, as byte-level BPE and the character tokenizers here do; one whose
    normalizer merges or drops characters (NFC composition, whitespace splitting) could see a text refused that
    would have fit after normalization, never one accepted that does not."""
    return None if max_text_tokens is None else max_text_tokens * longest_token_chars(tokenizer)


def default_max_body_bytes(max_text_chars: int | None) -> int:
    """Room for one text of `max_text_chars` characters written the most expensive way JSON allows (`\\uXXXX`
    surrogate pairs: 12 bytes per character) plus 64 KiB for the rest of the request; at least 1 MiB."""
    if max_text_chars is None:
        return 64 * 2**20
    return max(2**20, 12 * max_text_chars + 2**16)


def create_app(
    model: Engine,
    *,
    max_batch_tokens: int = 16384,
    max_queue: int = 1024,
    max_text_tokens: int | None = None,
    max_body_bytes: int | None = None,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI app around an already loaded model. `max_text_tokens`: the longest text accepted (default the
    model's `max_position_embeddings`); `max_body_bytes`: the largest request body (default
    `default_max_body_bytes`); `token`: require `Authorization: Bearer <token>` on every request (a non-empty
    string: an empty one would turn authentication off without a word, so it is refused)."""
    for name, value in (("max_batch_tokens", max_batch_tokens), ("max_queue", max_queue)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"token: expected a non-empty string (or None for no authentication), got {token!r}")
    limit = context_limit(model, max_text_tokens)
    max_text_chars = text_char_limit(model.tokenizer, limit)
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(max_text_chars)
    elif isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive int, got {max_body_bytes!r}")
    worker = ModelWorker(model, max_batch_tokens=max_batch_tokens, max_queue=max_queue)
    # Tokenization runs here, off the event loop; one thread, so the tokenizer is never used by two requests at once.
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sprm-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await worker.start()
        yield
        await worker.stop()
        tokenizer_thread.shutdown(wait=False)

    app = FastAPI(title="sprm-kernels", summary="SPRM scoring and reflective generation", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    if token is not None:  # outermost: an unauthenticated request is refused before its body is read
        app.add_middleware(_BearerAuth, token=token)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError):
        # 400 for a body that is not JSON, 422 for JSON of the wrong shape; a readable message, never the input
        # echoed back (it may be a megabyte of text).
        errors = error.errors()
        malformed = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if malformed is not None:
            where = malformed.get("loc", ())[1:]
            reason = malformed.get("ctx", {}).get("error", "")
            detail = f"malformed JSON{f' at character {where[0]}' if where else ''}{f': {reason}' if reason else ''}"
            return JSONResponse({"detail": detail}, 400)
        messages = [f"{'.'.join(str(part) for part in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errors]
        return JSONResponse({"detail": "; ".join(messages)}, 422)

    @app.exception_handler(Overloaded)
    async def overloaded(request, error: Overloaded):
        return JSONResponse({"detail": str(error)}, 503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(ModelCallFailed)
    async def model_call_failed(request, error: ModelCallFailed):
        return JSONResponse({"detail": str(error)}, 500)

    def check_chars(what: str, chars: int) -> None:
        if max_text_chars is not None and chars > max_text_chars:
            raise HTTPException(
                413, f"{what}: {chars} characters, more than {limit} tokens can hold (at most {max_text_chars})"
            )

    async def off_loop(call: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, call, *args)

    async def tokenize(texts: list[str], what: Callable[[int], str]) -> list[list[int]]:
        """Token ids as `ReflectiveModel.score` makes them (no special tokens added), checked against the limits:
        by characters first (cheap), then by tokens (in the tokenizer thread)."""
        for index, text in enumerate(texts):
            check_chars(what(index), len(text))
        sequences = await off_loop(model.encode, texts)
        for index, ids in enumerate(sequences):
            problem = token_problem(ids, limit)
            if problem is not None:
                raise HTTPException(problem[0], f"{what(index)}: {problem[1]}")
        return sequences

    @app.post("/score")
    async def score(request: ScoreRequest) -> dict:
        sequences = await tokenize([request.text], lambda index: "text")
        [result] = await worker.score(sequences)
        return score_json(result, request.return_all_scores)

    @app.post("/score_batch")
    async def score_batch(request: ScoreBatchRequest) -> dict:
        if len(request.texts) > max_queue:
            raise HTTPException(413, f"texts: {len(request.texts)} texts, over the limit of {max_queue} per request")
        sequences = await tokenize(request.texts, lambda index: f"texts.{index}")
        results = await worker.score(sequences)
        return {"results": [score_json(result, request.return_all_scores) for result in results]}

    @app.post("/generate")
    async def generate(request: GenerateRequest) -> dict:
        prompt = request.prompt if request.prompt is not None else [m.model_dump() for m in request.messages]
        if request.prompt is not None:
            check_chars("prompt", len(request.prompt))
        else:
            check_chars("messages", sum(len(m.content) for m in request.messages))
        try:
            prompt_tokens = len(await off_loop(model.prompt_ids, prompt))
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        total = prompt_tokens + request.max_think_tokens + request.max_answer_tokens
        if limit is not None and total > limit:
            raise HTTPException(
                413,
                f"prompt ({prompt_tokens} tokens) + max_think_tokens + max_answer_tokens = {total}, over the limit of "
                f"{limit} tokens",
            )
        options = request.model_dump(include={"k", "max_think_tokens", "max_answer_tokens", "temperature", "top_p",
                                              "answer_temperature", "seed"})  # fmt: skip
        try:
            result = await worker.generate(prompt, mode=request.mode or "medium", **options)
        except ValueError as error:  # an argument the request model let through and `generate` refused
            raise HTTPException(422, str(error)) from None
        except (Overloaded, HTTPException):
            raise
        except Exception as error:
            logger.exception("generation failed")
            raise ModelCallFailed(f"generation failed: {type(error).__name__}: {error}") from None
        return generation_json(result, token_ids=request.return_token_ids)

    @app.get("/health")
    async def health() -> dict:
        info = model.info()
        return {
            "status": "ok",
            "engine": info.engine,
            "model": info.model_name,
            "path": info.path or "",
            "device": info.device,
            "dtype": info.dtype,
            "backend": info.backend,
            "max_batch_tokens": max_batch_tokens,
            "max_queue": max_queue,
            "max_text_tokens": limit,
            "max_text_chars": max_text_chars,
            "max_body_bytes": max_body_bytes,
            "queue_depth": worker.in_hand,
            **asdict(worker.stats),
        }

    return app


DRAIN_QUIET_SECONDS = 1.0
DRAIN_MAX_SECONDS = 10.0


class _Drain:
    """Pure ASGI wrapper (outermost): counts the requests in flight; once `drain` has begun (SIGTERM), answers new
    requests 503 with Retry-After and marks every response `Connection: close` (see the module docstring)."""

    def __init__(self, app):
        self.app = app
        self.draining = False
        self.in_flight = 0
        self.last_arrival = 0.0
        self.read = 0  # requests the server has read (their head): each must get an answer
        self.answered = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.last_arrival = time.monotonic()
        self.read += 1

        async def send_counted(message):
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.answered += 1
            await send(message)

        if self.draining:
            # Read the body first (and drop it): closing a socket with unread bytes resets the connection, and the
            # client would lose the answer.
            message = {"more_body": True}
            while message.get("more_body", False):
                message = await receive()
            detail = "shutting down: retry later (or on another server)"
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"}
            await JSONResponse({"detail": detail}, 503, headers=headers)(scope, receive, send_counted)
            return

        async def send_closing(message):
            if self.draining and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send_counted(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            self.in_flight -= 1

    async def drain(self, forced: Callable[[], bool]) -> None:
        """Returns once nothing is in flight and no request came for DRAIN_QUIET_SECONDS (or DRAIN_MAX_SECONDS of
        503s passed since the last request in flight ended), or at once when `forced()` (a second Ctrl-C)."""
        self.draining = True
        logger.info("draining: finishing %d requests in flight, answering new ones 503", self.in_flight)
        idle_since = None
        while not forced():
            now = time.monotonic()
            if self.in_flight:
                idle_since = None
            else:
                idle_since = idle_since or now
                if now - self.last_arrival >= DRAIN_QUIET_SECONDS or now - idle_since >= DRAIN_MAX_SECONDS:
                    break
            await asyncio.sleep(0.02)


def serve(
    model: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    max_batch_tokens: int = 16384,
    max_queue: int = 1024,
    max_text_tokens: int | None = None,
    max_body_bytes: int | None = None,
    token: str | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return (a clean stop, exit status 0)."""
    import signal
    import threading

    import uvicorn

    _log_to_stderr(log_level)
    app = create_app(
        model, max_batch_tokens=max_batch_tokens, max_queue=max_queue, max_text_tokens=max_text_tokens,
        max_body_bytes=max_body_bytes, token=token,
    )  # fmt: skip
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without --token: anyone who can reach this port can use the model", host)
    logger.info("no TLS: keep the server on loopback or put a TLS-terminating proxy in front")
    drain = _Drain(app)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):  # uvicorn's shutdown closes the socket and the idle connections
            await drain.drain(lambda: self.force_exit)
            await super().shutdown(sockets=sockets)
            logger.info("stopped: answered %d of the %d requests read", drain.answered, drain.read)

    # timeout_graceful_shutdown None: on SIGTERM, wait for every request in flight however long it takes (a second
    # SIGINT forces the exit).
    config = uvicorn.Config(
        drain, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=None
    )
    server = DrainingServer(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn (>= 0.29) handles SIGTERM / SIGINT itself, shuts down gracefully, then re-raises the signal to the
    # previous handler, which by default would kill the process with that signal after a clean shutdown. This
    # handler turns the re-raised signal into a normal return.
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise _Stopped


def _log_to_stderr(level: str) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s sprm: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
