"""OpenAI's API as this server speaks it: the request bodies, the errors in OpenAI's shape, and the response and
chunk shapes (the routes are in `openai_routes`).

A chat completion is one best-of-k generation (`Engine.generate`) on the server's worker, as `POST /generate` runs
it: `reasoning_effort` is the mode (low / medium / high = k 2 / 8 / 32), `max_completion_tokens` (or `max_tokens`)
the answer budget, and what a request leaves out takes the model's defaults (`engines.common.generation_options`).
The chosen thinking, its `<think>` / `</think>` markers left out, is the message's `reasoning_content`;
`usage.completion_tokens_details.reasoning_tokens` counts every thinking token of the k candidates. The extension
object `sprm` takes `k`, `max_think_tokens` and `return_candidates`, and the response's `sprm` gives the chosen
score and k (and, asked for, the candidates). `stop` cuts each answer before its first stop string. Errors on /v1/
paths take OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (`openai_aware` wraps the server's own
handlers); the other routes keep theirs.
"""

from __future__ import annotations

import json
import logging
import math
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.types import finite_or_none
from sprm_kernels.model.engines.base import Engine
from sprm_kernels.model.serving.run import RETRY_AFTER_SECONDS
from sprm_kernels.model.serving.schemas import MAX_K, SearchOptions, request_field
from sprm_kernels.model.serving.text_pieces import MAX_STOP_STRINGS, answer_pieces, cut_at_stop
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


# GenerationParams fields the `sprm` object passes through as they are (pruning on the vLLM engine: docs/pruning.md).
PRUNING_OPTIONS = ("prune", "prune_margin", "prune_every", "prune_keep", "prune_poll")

# `sprm`: unknown keys refused (a misspelt extension option is an error, not a default used in its place).
SprmOptions = create_model(
    "SprmOptions",
    __config__=ConfigDict(extra="forbid", strict=True),
    k=params_field("k"),
    max_think_tokens=params_field("max_think_tokens"),
    return_candidates=(bool, False),
    **{name: params_field(name) for name in PRUNING_OPTIONS},
    search=(SearchOptions | None, None),
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
    stop=(str | list[str] | None, None),
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


def stop_strings(request) -> tuple[str, ...]:
    """The request's `stop` as a tuple (OpenAI: a string or at most 4 of them, none empty)."""
    stop = request.stop
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise OpenAIError(400, f"stop: expected at most {MAX_STOP_STRINGS} non-empty strings, got {list(stop)!r}",
                          param="stop")  # fmt: skip
    return stop


def choices_of(model: Engine, result, n: int, max_answer_tokens: int, stop: tuple[str, ...] = ()) -> list[dict]:
    """The n best candidates (`ranked_candidates`) as {candidate, thinking, raw_thinking, answer, answer_ids,
    finish_reason}; an answer is cut before its first `stop` string (then its finish_reason is `stop`)."""
    choices = []
    for rank, j in enumerate(ranked_candidates(result)[:n]):
        candidate = result.candidates[j]
        # The chosen answer is the result's; the others were decoded by answer_all.
        answer, ids = (
            (result.answer, result.answer_token_ids) if rank == 0 else (candidate.answer, candidate.answer_token_ids)
        )
        answer, stopped = cut_at_stop(answer, stop)
        end = "" if candidate.finished else model.tokenizer.decode([model.think_end_id])
        choices.append(
            {
                "candidate": j,
                "thinking": thinking_text(model, candidate.text),
                "raw_thinking": candidate.text + end,  # as the model saw it before the answer
                "answer": answer,
                "answer_ids": ids,
                "finish_reason": "stop" if stopped else finish_reason(model, ids, max_answer_tokens),
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


def stream_events(tokenizer, head: dict, choices: list[dict], usage: dict, sprm: dict, include_usage: bool,
                  stop: tuple[str, ...] = ()):  # fmt: skip
    """The Server-Sent Events of a finished completion, in OpenAI's `chat.completion.chunk` format."""

    event, delta = chunk_makers(head, include_usage)

    for index, choice in enumerate(choices):
        yield event(delta(index, role="assistant", content=""))
        yield event(delta(index, reasoning_content=choice["thinking"]))
        for piece in answer_pieces(tokenizer, choice["answer_ids"], stop):
            yield event(delta(index, content=piece))
        last = index == len(choices) - 1
        yield event(delta(index, choice["finish_reason"]), **({"sprm": sprm} if last else {}))
    if include_usage:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"
