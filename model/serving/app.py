"""HTTP server for SPRM scoring and reflective generation, a drop-in for the reference's scoring API.

`POST /score` takes the reference client's `{"text", "return_all_scores"}` and answers `{"value"}` or, with
`return_all_scores`, `{"value", "all_scores", "token_ids", "score_positions"}` (the fields of `ScoreResult`).
`POST /score_batch` scores a list of texts, `POST /generate` runs the engine's `generate`, `GET /health` reports
the model and the queue. Start it with `sprm serve --model DIR` (see `serve`).

The parts:
- `schemas`: the request bodies. `/generate` takes the options of `core.params.GenerationParams`; those a request
  leaves out take the model's defaults (`engines.common.generation_options`: the folder's temperature / top_p,
  budgets fitted to the context), as `sprm generate` does, so a bare prompt is sampled the same way by both.
- `worker`: one thread runs every model call; score requests are batched dynamically; a failing batch is retried
  one text at a time; at most `max_queue` texts and generations are in hand, more get 503 with Retry-After.
- Bounded input, checked before any work: `middleware.BodyLimit` refuses a body over `max_body_bytes` with 413
  (from its Content-Length before reading it, or while counting the bytes of a body sent without one); a text (or
  prompt) over `max_text_chars` characters gets 413 before it is tokenized (`limits.text_char_limit`: it cannot
  fit in the context); tokenization runs in its own thread, never on the event loop, so a long text never stalls
  the other clients.
- `openai_routes` / `openai_api`: `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models` in
  OpenAI's format, on the same worker; errors on /v1/ paths in OpenAI's shape (the handlers below are wrapped in
  `openai_aware`).
- `run`: uvicorn, and on SIGTERM a drain that answers every request the server has read.

There is no TLS: bind to loopback (the default) or put a TLS-terminating proxy in front. `token` only guards
against other local users or a misconfigured bind; over plain HTTP it travels in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sprm_kernels.model.core.types import generation_json, score_json
from sprm_kernels.model.engines.base import Engine, supports_async
from sprm_kernels.model.engines.common import context_limit, generation_plan, token_problem
from sprm_kernels.model.serving.async_worker import AsyncWorker
from sprm_kernels.model.serving.disconnect import ClientGone, unless_disconnected
from sprm_kernels.model.serving.limits import default_max_body_bytes, longest_token_chars, text_char_limit
from sprm_kernels.model.serving.middleware import BearerAuth, BodyLimit
from sprm_kernels.model.serving.openai_api import openai_aware
from sprm_kernels.model.serving.openai_routes import Served, add_openai_routes
from sprm_kernels.model.serving.run import RETRY_AFTER_SECONDS, log_to_stderr, run_app
from sprm_kernels.model.serving.schemas import (
    MAX_K,
    GenerateRequest,
    ScoreBatchRequest,
    ScoreRequest,
    given_options,
    search_given,
)
from sprm_kernels.model.serving.worker import ModelCallFailed, ModelWorker, Overloaded, TimedOut

__all__ = ["MAX_K", "create_app", "default_max_body_bytes", "longest_token_chars", "serve", "text_char_limit"]

logger = logging.getLogger("sprm.server")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def resolve_generation(model: Engine, prompt, given: dict, limit: int | None) -> tuple[dict, str | None]:
    """(`generate`'s keyword arguments, why they run past the limit or None). `given` (None: not given) is completed
    with the model's defaults exactly as `sprm generate` completes its options (`generation_options`), and checked
    against the model's context and, when `max_text_tokens` is tighter, against that (`generation_plan`).
    Tokenizes the prompt: call it off the event loop. ValueError for a prompt the chat template refuses."""
    options, overflow = generation_plan(model, prompt, limit=limit, limit_name="--max-text-tokens", **given)
    return {"mode": "medium", **options}, overflow


def add_error_handlers(app: FastAPI) -> None:
    # On /v1/ paths every handler answers in OpenAI's error shape instead (`openai.openai_aware`).
    @app.exception_handler(RequestValidationError)
    @openai_aware
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
    @openai_aware
    async def overloaded(request, error: Overloaded):
        return JSONResponse({"detail": str(error)}, 503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(TimedOut)
    @openai_aware
    async def timed_out(request, error: TimedOut):
        return JSONResponse({"detail": str(error)}, 504)

    @app.exception_handler(ClientGone)
    async def client_gone(request, error: ClientGone):
        return JSONResponse({"detail": str(error)}, 499)  # nginx's "client closed request": no one reads it

    @app.exception_handler(ModelCallFailed)
    @openai_aware
    async def model_call_failed(request, error: ModelCallFailed):
        return JSONResponse({"detail": str(error)}, 500)


def create_app(
    model: Engine,
    *,
    max_batch_tokens: int = 16384,
    max_queue: int = 1024,
    max_text_tokens: int | None = None,
    max_body_bytes: int | None = None,
    token: str | None = None,
    request_timeout: float | None = None,
) -> FastAPI:
    """The FastAPI app around an already loaded model. `max_text_tokens`: the longest text accepted (default the
    model's `max_position_embeddings`); `max_body_bytes`: the largest request body (default
    `default_max_body_bytes`); `token`: require `Authorization: Bearer <token>` on every request (a non-empty
    string: an empty one would turn authentication off without a word, so it is refused); `request_timeout`: seconds
    a request may run on an engine with coroutines (`engines.base.SupportsAsync`) before it is cancelled (504).

    An engine with coroutines (`sprm serve --engine vllm`: vLLM's async engine) gets `AsyncWorker`: every request
    goes into the engine at once and a client that disconnects has its requests aborted. Any other engine (the HF
    engine) gets `ModelWorker`: one model call at a time, score requests batched; a disconnect frees the request,
    not the model call already running."""
    check_positive_int("max_batch_tokens", max_batch_tokens)
    check_positive_int("max_queue", max_queue)
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"token: expected a non-empty string (or None for no authentication), got {token!r}")
    limit = context_limit(model, max_text_tokens)
    max_text_chars = text_char_limit(model.tokenizer, limit)
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(max_text_chars)
    check_positive_int("max_body_bytes", max_body_bytes)
    if request_timeout is not None and (isinstance(request_timeout, bool) or not request_timeout > 0):
        raise ValueError(f"request_timeout: expected a positive number of seconds or None, got {request_timeout!r}")
    if supports_async(model):
        worker = AsyncWorker(model, max_queue=max_queue, request_timeout=request_timeout)
    else:
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
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token is not None:  # outermost: an unauthenticated request is refused before its body is read
        app.add_middleware(BearerAuth, token=token)
    add_error_handlers(app)

    def check_chars(what: str, chars: int) -> None:
        if max_text_chars is not None and chars > max_text_chars:
            raise HTTPException(
                413, f"{what}: {chars} characters, more than {limit} tokens can hold (at most {max_text_chars})"
            )

    async def off_loop(call: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, call, *args)

    async def tokenize(texts: list[str], what: Callable[[int], str]) -> list[list[int]]:
        """Token ids as the engine's `score` makes them (no special tokens added), checked against the limits:
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
    async def generate(request: GenerateRequest, http: Request) -> dict:
        prompt = request.prompt if request.prompt is not None else [m.model_dump() for m in request.messages]
        if request.prompt is not None:
            check_chars("prompt", len(request.prompt))
        else:
            check_chars("messages", sum(len(m.content) for m in request.messages))
        try:
            options, overflow = await off_loop(resolve_generation, model, prompt, given_options(request), limit)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        if overflow is not None:
            raise HTTPException(413, overflow)
        try:
            search = search_given(request.search)
            result = await unless_disconnected(http, worker.generate(prompt, search, **options))
        except ValueError as error:  # an argument the request model let through and `generate` refused
            raise HTTPException(422, str(error)) from None
        except (Overloaded, HTTPException, TimedOut, ClientGone):
            raise
        except Exception as error:
            logger.exception("generation failed")
            raise ModelCallFailed(f"generation failed: {type(error).__name__}: {error}") from None
        return generation_json(result, token_ids=request.return_token_ids)

    async def resolve(prompt, given: dict) -> tuple[dict, str | None]:
        return await off_loop(resolve_generation, model, prompt, given, limit)

    add_openai_routes(app, Served(model, worker, resolve, check_chars, model.info().model_name))

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
    request_timeout: float | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return (a clean stop, exit status 0)."""
    log_to_stderr(log_level)
    app = create_app(
        model, max_batch_tokens=max_batch_tokens, max_queue=max_queue, max_text_tokens=max_text_tokens,
        max_body_bytes=max_body_bytes, token=token, request_timeout=request_timeout,
    )  # fmt: skip
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without --token: anyone who can reach this port can use the model", host)
    logger.info("no TLS: keep the server on loopback or put a TLS-terminating proxy in front")
    run_app(app, host=host, port=port, log_level=log_level, access_log=access_log)
