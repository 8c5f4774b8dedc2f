"""OpenAI-compatible routes on the scoring server: `POST /v1/chat/completions` and `GET /v1/models`.

A chat completion is one best-of-k generation (`Engine.generate`) on the server's model worker, as `POST /generate`
runs it: `reasoning_effort` is the mode (low / medium / high = k 2 / 8 / 32), `max_completion_tokens` (or
`max_tokens`) the answer budget, and what a request leaves out takes the model's defaults
(`engines.common.generation_options`). The chosen thinking, its `<think>` / `</think>` markers left out, is the
message's `reasoning_content`; `usage.completion_tokens_details.reasoning_tokens` counts every thinking token of
the k candidates. The extension object `sprm` takes `k`, `max_think_tokens` and `return_candidates`, and the
response's `sprm` gives the chosen score and k (and, asked for, the candidates).

`stream: true` answers in OpenAI's chunk format, but the generation is not incremental here: the chunks are cut
from the finished generation (the reasoning in one chunk, then the answer one token at a time), so the first chunk
arrives after the whole generation. Errors on /v1/ paths take OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` (`openai_aware` wraps the server's own handlers); the other
routes keep theirs.
"""

from __future__ import annotations

import json
import logging
import math
import time
import typing
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import fields
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.selection import resolve_k
from sprm_kernels.model.core.types import finite_or_none
from sprm_kernels.model.engines.base import Engine
from sprm_kernels.model.serving.disconnect import ClientGone, unless_disconnected, until_disconnected
from sprm_kernels.model.serving.run import RETRY_AFTER_SECONDS
from sprm_kernels.model.serving.schemas import MAX_K, request_field
from sprm_kernels.model.serving.worker import ModelCallFailed, Overloaded, TimedOut

logger = logging.getLogger("sprm.server")

OWNED_BY = "sprm-kernels"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 503: "server_error"}  # fmt: skip


# -- request bodies ---------------------------------------------------------------------------------------------


def params_field(name: str):
    """(type, Field) of a GenerationParams field, with its bounds (and the server's k <= MAX_K), default None."""
    hints = typing.get_type_hints(GenerationParams)
    [field_] = [f for f in fields(GenerationParams) if f.name == name]
    return request_field(name, hints[name], field_.metadata)


# `sprm`: unknown keys refused (a misspelt extension option is an error, not a default used in its place).
SprmOptions = create_model(
    "SprmOptions",
    __config__=ConfigDict(extra="forbid", strict=True),
    k=params_field("k"),
    max_think_tokens=params_field("max_think_tokens"),
    return_candidates=(bool, False),
)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


# Top level: unknown fields ignored, as OpenAI's API does (clients send `user`, `logprobs`, ... freely).
ChatCompletionRequest = create_model(
    "ChatCompletionRequest",
    __config__=ConfigDict(extra="ignore", strict=True),
    model=(str | None, None),
    messages=(list[ChatMessage], Field(min_length=1)),
    reasoning_effort=(Literal["low", "medium", "high"], "medium"),
    max_completion_tokens=params_field("max_answer_tokens"),
    max_tokens=params_field("max_answer_tokens"),
    temperature=params_field("temperature"),
    top_p=params_field("top_p"),
    seed=params_field("seed"),
    n=(int, Field(1, ge=1, le=MAX_K)),
    stream=(bool, False),
    stream_options=(StreamOptions | None, None),
    user=(str | None, None),
    sprm=(SprmOptions | None, None),
)


class OpenAIError(Exception):
    """An error answered in OpenAI's shape on a /v1/ route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status, headers=headers)


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    """400 for any body pydantic refuses; `param` names the first bad field ("temperature", "sprm.k")."""
    errors = error.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
    location = [str(part) for part in first.get("loc", ())[1:]]
    param = ".".join(location) or None
    messages = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errors]
    return error_response(400, "; ".join(messages), param=param)


def is_openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def openai_error_for(error: Exception) -> JSONResponse:
    if isinstance(error, RequestValidationError):
        return validation_error_response(error)
    if isinstance(error, OpenAIError):
        return error_response(error.status, error.message, error.param, error.code)
    if isinstance(error, Overloaded):
        return error_response(503, str(error), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(error, StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), headers=error.headers)
    if isinstance(error, ModelCallFailed):
        return error_response(500, str(error))
    if isinstance(error, TimedOut):
        return error_response(504, str(error), code="timeout")
    return error_response(500, f"{type(error).__name__}: {error}")


def openai_aware(handler: Callable) -> Callable:
    """An exception handler answering in OpenAI's shape on /v1/ paths, and as `handler` does elsewhere."""

    async def handle(request: Request, error: Exception):
        return openai_error_for(error) if is_openai_path(request) else await handler(request, error)

    return handle


# -- responses ----------------------------------------------------------------------------------------------------


def ranked_candidates(result) -> list[int]:
    """Candidate indices by the choice rule (`core.selection.choose_best`): finished first, then the highest
    score, NaN lowest, ties to the lowest index; the first is `result.best`."""
    candidates = result.candidates

    def key(j: int) -> tuple[bool, float]:
        score = candidates[j].score
        return bool(candidates[j].finished), -1.0 if math.isnan(score) else score

    order = sorted(range(len(candidates)), key=key, reverse=True)  # stable: ties keep the lowest index first
    assert order[0] == result.best, (order, result.best)
    return order


def thinking_text(model: Engine, text: str) -> str:
    """A candidate's thinking without its `<think>` / `</think>` markers."""
    for marker_id in (model.think_start_id, model.think_end_id):
        text = text.replace(model.tokenizer.decode([marker_id]), "")
    return text


def finish_reason(model: Engine, answer_ids: list[int], max_answer_tokens: int) -> str:
    """`stop` when an EOS ended the answer, `length` when the budget did. The answer decode stops at an EOS or at
    the budget, so an answer shorter than the budget ended on an EOS."""
    if len(answer_ids) < max_answer_tokens:
        return "stop"
    special = set(model.tokenizer.all_special_ids)
    return "stop" if answer_ids and answer_ids[-1] in special else "length"


def choices_of(model: Engine, result, n: int, max_answer_tokens: int) -> list[dict]:
    """The n best candidates (`ranked_candidates`) as {candidate, thinking, answer, answer_ids, finish_reason}."""
    choices = []
    for rank, j in enumerate(ranked_candidates(result)[:n]):
        candidate = result.candidates[j]
        # The chosen answer is the result's; the others were decoded by answer_all.
        answer, ids = (
            (result.answer, result.answer_token_ids) if rank == 0 else (candidate.answer, candidate.answer_token_ids)
        )
        choices.append(
            {
                "candidate": j,
                "thinking": thinking_text(model, candidate.text),
                "answer": answer,
                "answer_ids": ids,
                "finish_reason": finish_reason(model, ids, max_answer_tokens),
            }
        )
    return choices


def usage_of(result, choices: list[dict]) -> dict:
    prompt_tokens = len(result.prompt_token_ids)
    completion_tokens = sum(len(choice["answer_ids"]) for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": result.stats.think_generated_tokens},
    }


def candidate_json(candidate) -> dict:
    return {
        "text": candidate.text,
        "score": finite_or_none(candidate.score),
        "step_scores": [finite_or_none(p) for p in candidate.step_scores],
        "finished": candidate.finished,
    }


def sprm_of(result, choices: list[dict], return_candidates: bool) -> dict:
    out = {"score": finite_or_none(result.candidates[result.best].score), "k": len(result.candidates),
           "chosen": [choice["candidate"] for choice in choices]}  # fmt: skip
    if return_candidates:
        out["candidates"] = [candidate_json(c) for c in result.candidates]
    return out


def completion_json(head: dict, choices: list[dict], usage: dict, sprm: dict) -> dict:
    return {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice["answer"], "reasoning_content": choice["thinking"]},
                "finish_reason": choice["finish_reason"],
            }
            for index, choice in enumerate(choices)
        ],
        "usage": usage,
        "sprm": sprm,
    }


class TextPieces:
    """What each longer prefix of an answer's ids adds to its text, held back while the text ends in a partial
    character, so the pieces always add up to `decode(ids)` once `finish` is called."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sent = tokenizer, ""

    def update(self, ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not text.startswith(self.sent) or (text.endswith("\ufffd") and not final):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def answer_pieces(tokenizer, ids: list[int]) -> Iterator[str]:
    """The answer's text one token at a time (`TextPieces`)."""
    pieces = TextPieces(tokenizer)
    for end in range(1, len(ids) + 1):
        piece = pieces.update(ids[:end], final=end == len(ids))
        if piece:
            yield piece


def sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def chunk_makers(head: dict, include_usage: bool):
    """(event(choices, **extra) -> an SSE line of a `chat.completion.chunk`, delta(index, finish, **fields))."""

    def event(delta_choices: list[dict], **extra) -> str:
        chunk = {**head, "object": "chat.completion.chunk", "choices": delta_choices, **extra}
        if include_usage:
            chunk.setdefault("usage", None)
        return sse(chunk)

    def delta(index: int, finish: str | None = None, **fields_) -> list[dict]:
        return [{"index": index, "delta": fields_, "finish_reason": finish}]

    return event, delta


def stream_events(tokenizer, head: dict, choices: list[dict], usage: dict, sprm: dict, include_usage: bool):
    """The Server-Sent Events of a finished completion, in OpenAI's `chat.completion.chunk` format."""

    event, delta = chunk_makers(head, include_usage)

    for index, choice in enumerate(choices):
        yield event(delta(index, role="assistant", content=""))
        yield event(delta(index, reasoning_content=choice["thinking"]))
        for piece in answer_pieces(tokenizer, choice["answer_ids"]):
            yield event(delta(index, content=piece))
        last = index == len(choices) - 1
        yield event(delta(index, choice["finish_reason"]), **({"sprm": sprm} if last else {}))
    if include_usage:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


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
    }


def add_openai_routes(
    app: FastAPI,
    model: Engine,
    worker,
    resolve: Callable[[list, dict], Awaitable[tuple[dict, str | None]]],
    check_chars: Callable[[str, int], None],
) -> None:
    """The /v1/ routes. `worker`: the server's (`generate(prompt, **options)` and `stream(prompt, **options)`, the
    events of `engines.base.SupportsAsync.astream`); `resolve(messages, given)`: (generate's keyword arguments,
    overflow message or None), run off the event loop; `check_chars(what, chars)`: the text bound."""
    model_name = model.info().model_name

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": OWNED_BY}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        given = given_options(request)
        try:
            check_chars("messages", sum(len(m["content"]) for m in messages))
        except StarletteHTTPException as error:
            raise OpenAIError(error.status_code, str(error.detail), param="messages") from None
        try:
            options, overflow = await resolve(messages, given)
        except ValueError as error:
            raise OpenAIError(400, str(error), param="messages") from None
        if overflow is not None:
            raise OpenAIError(413, overflow, param="max_completion_tokens", code="context_length_exceeded")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": request.model or model_name}
        return_candidates = request.sprm is not None and request.sprm.return_candidates
        budget = options["max_answer_tokens"]

        def finished(result) -> tuple[list[dict], dict, dict]:
            choices = choices_of(model, result, request.n, budget)
            return choices, usage_of(result, choices), sprm_of(result, choices, return_candidates)

        if not request.stream:
            result = await model_call(unless_disconnected(http, worker.generate(messages, **options)))
            return completion_json(head, *finished(result))
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        events = worker.stream(messages, **options)
        # The first event (the reasoning, once chosen) before the response starts: an error until then (queue
        # full, timeout) is still an HTTP status the client's library raises.
        first = await model_call(unless_disconnected(http, anext(events)))

        async def chunks():
            if request.n > 1:  # n answers: streamed once all are decoded
                async for event in until_disconnected(http, events):
                    if event[0] == "result":
                        for line in stream_events(model.tokenizer, head, *finished(event[1]), include_usage):
                            yield line
                return
            event, delta = chunk_makers(head, include_usage)
            _, candidates, best = first
            yield event(delta(0, role="assistant", content=""))
            yield event(delta(0, reasoning_content=thinking_text(model, candidates[best].text)))
            pieces = TextPieces(model.tokenizer)
            try:
                async for kind, *payload in until_disconnected(http, events):
                    if kind == "answer":
                        piece = pieces.update(payload[0])
                    elif kind == "result":
                        choices, usage, sprm = finished(payload[0])
                        piece = pieces.update(choices[0]["answer_ids"], final=True)
                    if piece:
                        yield event(delta(0, content=piece))
                    if kind == "result":
                        yield event(delta(0, choices[0]["finish_reason"]), sprm=sprm)
                        if include_usage:
                            yield event([], usage=usage)
                        yield "data: [DONE]\n\n"
            except Exception as error:  # after the headers: the error as a chunk, as OpenAI's streams send it
                logger.exception("chat completion stream failed")
                yield sse(error_body(error_of(error)))

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return openai_error_for(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return openai_error_for(error) if is_openai_path(request) else await http_exception_handler(request, error)
