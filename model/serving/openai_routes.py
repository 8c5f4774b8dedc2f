"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, each a
best-of-k generation on the server's worker (`openai_api` has their request bodies, errors and response shapes).

A text completion is a chat completion without the chat template: its `prompt` is used as written
(`core.types.TextPrompt`), and its `choices[].text` is what the model wrote after it, the chosen thinking (with
its `</think>`) then the answer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from sprm_kernels.model.core.selection import resolve_k
from sprm_kernels.model.core.types import TextPrompt
from sprm_kernels.model.engines.base import Engine
from sprm_kernels.model.serving.disconnect import ClientGone, unless_disconnected, until_disconnected
from sprm_kernels.model.serving.openai_api import (
    OWNED_BY,
    PRUNING_OPTIONS,
    ChatCompletionRequest,
    OpenAIError,
    choices_of,
    chunk_makers,
    completion_json,
    is_openai_path,
    openai_error_for,
    sprm_of,
    sse,
    stop_strings,
    stream_events,
    thinking_text,
    usage_of,
)
from sprm_kernels.model.serving.schemas import search_given
from sprm_kernels.model.serving.text_pieces import TextPieces
from sprm_kernels.model.serving.worker import ModelCallFailed, Overloaded, TimedOut

logger = logging.getLogger("sprm.server")


def error_of(error: Exception) -> Exception:
    """A model call's exception as the server answers it: its own kinds kept, a refused argument a 400, anything
    else a 500 that names it."""
    if isinstance(error, (Overloaded, TimedOut, ClientGone, OpenAIError, ModelCallFailed)):
        return error
    if isinstance(error, ValueError):  # an argument the request model let through and `generate` refused
        return OpenAIError(400, str(error))
    return ModelCallFailed(f"generation failed: {type(error).__name__}: {error}")


def error_body(error: Exception) -> dict:
    return json.loads(openai_error_for(error).body)


async def model_call(coro):
    try:
        return await coro
    except Exception as error:
        mapped = error_of(error)
        if isinstance(mapped, ModelCallFailed):
            logger.exception("chat completion failed")
        raise mapped from None


# -- routes: what a chat completion and a text completion share ---------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What the /v1/ routes are given: the model, the server's worker (`generate`, `stream`), `resolve(prompt,
    given)` -> (generate's keyword arguments, overflow message or None), `check_chars(what, chars)`, the model name."""

    model: Engine
    worker: object
    resolve: Callable
    check_chars: Callable
    model_name: str


class ChatFormat:
    """The `chat.completion` response and its `chat.completion.chunk` stream."""

    prefix = "chatcmpl"

    def __init__(self, model: Engine):
        self.model = model

    def response(self, head: dict, choices: list[dict], usage: dict, sprm: dict) -> dict:
        return completion_json(head, choices, usage, sprm)

    def whole_stream(self, head, choices, usage, sprm, include_usage: bool, stop) -> Iterator[str]:
        return stream_events(self.model.tokenizer, head, choices, usage, sprm, include_usage, stop)

    def opening(self, head: dict, include_usage: bool, candidate, end: str) -> list[str]:
        event, delta = chunk_makers(head, include_usage)
        return [event(delta(0, role="assistant", content="")),
                event(delta(0, reasoning_content=thinking_text(self.model, candidate.text)))]  # fmt: skip

    def piece(self, head: dict, include_usage: bool, text: str) -> str:
        event, delta = chunk_makers(head, include_usage)
        return event(delta(0, content=text))

    def closing(self, head: dict, include_usage: bool, finish: str, sprm: dict) -> str:
        event, delta = chunk_makers(head, include_usage)
        return event(delta(0, finish), sprm=sprm)

    def usage_chunk(self, head: dict, usage: dict) -> str:
        event, _ = chunk_makers(head, True)
        return event([], usage=usage)


async def run_completion(http: Request, request, prompt, chars: int, param: str, form, served: Served):
    """A completion (chat or text, by `form`): the bounds, the options, then the generation answered whole or
    streamed (`form`'s chunks); the client's disconnect cancels it."""
    model, worker = served.model, served.worker
    given = given_options(request)
    search = search_of(request)
    stop = stop_strings(request)
    try:
        served.check_chars(param, chars)
    except StarletteHTTPException as error:
        raise OpenAIError(error.status_code, str(error.detail), param=param) from None
    try:
        options, overflow = await served.resolve(prompt, given)
    except ValueError as error:
        raise OpenAIError(400, str(error), param=param) from None
    if overflow is not None:
        raise OpenAIError(413, overflow, param="max_completion_tokens", code="context_length_exceeded")
    head = {"id": f"{form.prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": request.model or served.model_name}  # fmt: skip
    return_candidates = request.sprm is not None and request.sprm.return_candidates
    budget = options["max_answer_tokens"]

    def finished(result) -> tuple[list[dict], dict, dict]:
        choices = choices_of(model, result, request.n, budget, stop)
        return choices, usage_of(result, choices), sprm_of(result, choices, return_candidates)

    if not request.stream:
        result = await model_call(unless_disconnected(http, worker.generate(prompt, search, **options)))
        return form.response(head, *finished(result))
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    events = worker.stream(prompt, search, **options)
    # The first event (the reasoning, once chosen) before the response starts: an error until then (queue full, a
    # timeout) is still an HTTP status the client's library raises.
    first = await model_call(unless_disconnected(http, anext(events)))

    async def chunks():
        if request.n > 1:  # n answers: streamed once all are decoded
            async for event in until_disconnected(http, events):
                if event[0] == "result":
                    for line in form.whole_stream(head, *finished(event[1]), include_usage, stop):
                        yield line
            return
        _, candidates, best = first
        for line in form.opening(head, include_usage, candidates[best], model.tokenizer.decode([model.think_end_id])):
            yield line
        pieces = TextPieces(model.tokenizer, stop)
        try:
            async for kind, *payload in until_disconnected(http, events):
                if kind == "answer":
                    piece = pieces.update(payload[0])
                elif kind == "result":
                    choices, usage, sprm = finished(payload[0])
                    piece = pieces.update(choices[0]["answer_ids"], final=True)
                if piece:
                    yield form.piece(head, include_usage, piece)
                if kind == "result":
                    yield form.closing(head, include_usage, choices[0]["finish_reason"], sprm)
                    if include_usage:
                        yield form.usage_chunk(head, usage)
                    yield "data: [DONE]\n\n"
        except Exception as error:  # after the headers: the error as a chunk, as OpenAI's streams send it
            logger.exception("completion stream failed")
            yield sse(error_body(error_of(error)))

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class TextFormat:
    """The `text_completion` response and its stream (chunks of the same object, `choices[].text` a piece)."""

    prefix = "cmpl"

    def response(self, head: dict, choices: list[dict], usage: dict, sprm: dict) -> dict:
        listed = [{"index": i, "text": c["raw_thinking"] + c["answer"], "finish_reason": c["finish_reason"],
                   "logprobs": None} for i, c in enumerate(choices)]  # fmt: skip
        return {**head, "object": "text_completion", "choices": listed, "usage": usage, "sprm": sprm}

    def chunk(self, head: dict, include_usage: bool, index: int, text: str, finish=None, **extra) -> str:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        chunk = {**head, "object": "text_completion", "choices": [choice], **extra}
        if include_usage:
            chunk.setdefault("usage", None)
        return sse(chunk)

    def whole_stream(self, head, choices, usage, sprm, include_usage: bool, stop) -> Iterator[str]:
        for index, c in enumerate(choices):
            yield self.chunk(head, include_usage, index, c["raw_thinking"] + c["answer"])
            yield self.chunk(head, include_usage, index, "", c["finish_reason"],
                             **({"sprm": sprm} if index == len(choices) - 1 else {}))  # fmt: skip
        if include_usage:
            yield self.usage_chunk(head, usage)
        yield "data: [DONE]\n\n"

    def opening(self, head: dict, include_usage: bool, candidate, end: str) -> list[str]:
        return [self.chunk(head, include_usage, 0, candidate.text + ("" if candidate.finished else end))]

    def piece(self, head: dict, include_usage: bool, text: str) -> str:
        return self.chunk(head, include_usage, 0, text)

    def closing(self, head: dict, include_usage: bool, finish: str, sprm: dict) -> str:
        return self.chunk(head, include_usage, 0, "", finish, sprm=sprm)

    def usage_chunk(self, head: dict, usage: dict) -> str:
        return sse({**head, "object": "text_completion", "choices": [], "usage": usage})


# The chat request's fields, `prompt` (one string, or a list of exactly one) in place of `messages`.
CompletionRequest = create_model(
    "CompletionRequest",
    __config__=ConfigDict(extra="ignore", strict=True),
    **{
        name: (info.annotation, info) for name, info in ChatCompletionRequest.model_fields.items() if name != "messages"
    },
    prompt=(str | list[str], Field()),
)


# -- routes -------------------------------------------------------------------------------------------------------


def given_options(request) -> dict:
    """GenerationParams keyword arguments of a chat request (None: not given, the model's default)."""
    budget = request.max_completion_tokens
    if budget is None:
        budget = request.max_tokens
    elif request.max_tokens is not None and request.max_tokens != budget:
        raise OpenAIError(400, f"max_tokens: {request.max_tokens} disagrees with max_completion_tokens: {budget} "
                          "(give one of them)", param="max_tokens")  # fmt: skip
    sprm = request.sprm
    k = None if sprm is None else sprm.k
    if request.n > resolve_k(request.reasoning_effort, k):
        raise OpenAIError(400, f"n: {request.n} choices, more than the {resolve_k(request.reasoning_effort, k)} "
                          "candidates (set reasoning_effort or sprm.k higher)", param="n")  # fmt: skip
    return {
        "mode": request.reasoning_effort,
        "k": k,
        "max_think_tokens": None if sprm is None else sprm.max_think_tokens,
        "max_answer_tokens": budget,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "answer_all": True if request.n > 1 else None,  # each of the n choices needs its own answer
        **{name: None if sprm is None else getattr(sprm, name) for name in PRUNING_OPTIONS},
    }


def search_of(request) -> dict | None:
    """`sprm.search` as `search` keyword arguments, or None; a search writes one answer from beam_width x
    expansions rows, so n > 1, sprm.k and pruning are refused with it."""
    sprm = request.sprm
    if sprm is None or sprm.search is None:
        return None
    if request.n > 1:
        raise OpenAIError(400, f"n: a search writes one answer, got n={request.n}", param="n")
    given = [name for name in ("k", *PRUNING_OPTIONS) if getattr(sprm, name) is not None]
    if given:
        raise OpenAIError(400, f"sprm.{given[0]}: not with sprm.search (its batch is beam_width x expansions rows)",
                          param=f"sprm.{given[0]}")  # fmt: skip
    return search_given(sprm.search)


def add_openai_routes(app: FastAPI, served: Served) -> None:
    """`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` and the /v1/ error handlers."""
    model, model_name = served.model, served.model_name

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": OWNED_BY}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        chars = sum(len(m["content"]) for m in messages)
        return await run_completion(http, request, messages, chars, "messages", ChatFormat(model), served)

    add_text_completion_route(app, served)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return openai_error_for(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return openai_error_for(error) if is_openai_path(request) else await http_exception_handler(request, error)


def add_text_completion_route(app: FastAPI, served: Served) -> None:
    """`POST /v1/completions`: the prompt as written (`TextPrompt`), no chat template."""

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        prompt = request.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise OpenAIError(400, f"prompt: expected one prompt (a string, or a list of one), got {len(prompt)}",
                                  param="prompt")  # fmt: skip
            prompt = prompt[0]
        return await run_completion(http, request, TextPrompt(prompt), len(prompt), "prompt", TextFormat(), served)
