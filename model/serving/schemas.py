"""The request bodies of the server, checked by pydantic before any work (a wrong shape or value: 422).

`GenerateRequest`'s generation options are built from the fields of `core.params.GenerationParams` (their help
text, choices and minimum), so that `POST /generate` and `sprm generate` take the same options with the same
meaning. Every one of them defaults to None, "not given": the route fills it with the model's default
(`engines.common.generation_options`), exactly as the CLI does.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from sprm_kernels.model.core.params import GenerationParams, SearchParams

MAX_K = 64  # candidates per generation: twice the paper's "high" mode; more is a denial of service, not a request

# The GenerationParams fields the server does not take: features and extra answers are for training and the
# evaluation, and would make one request cost k answers.
NOT_SERVED = ("return_features", "answer_all")
# A bound the server adds to a field's own (`minimum`, `exclusive_minimum`, `maximum`), so a bad value is a 422.
EXTRA_BOUNDS = {"k": {"le": MAX_K}}
PYDANTIC_BOUNDS = {"minimum": "ge", "exclusive_minimum": "gt", "maximum": "le"}


class Strict(BaseModel):
    # strict: no silent coercion ("yes" -> True, 1 -> 1.0 is still allowed for floats); forbid: a misspelt field is
    # an error rather than a default quietly used in its place.
    model_config = ConfigDict(extra="forbid", strict=True)


NonEmptyText = Annotated[str, Field(min_length=1)]


class ScoreRequest(Strict):
    text: NonEmptyText
    return_all_scores: bool = False


class ScoreBatchRequest(Strict):
    texts: list[NonEmptyText]
    return_all_scores: bool = False


class Message(Strict):
    role: str
    content: str


def served_fields() -> list:
    """The GenerationParams fields a request may set, in their declaration order."""
    return [f for f in fields(GenerationParams) if f.name not in NOT_SERVED]


def request_field(name: str, annotation, metadata) -> tuple:
    """(type, Field) of one generation option: its value type or None, default None ("the model's default")."""
    choices = metadata.get("choices")
    value_type = Literal[tuple(choices)] if choices else non_none(annotation)
    bounds = dict(EXTRA_BOUNDS.get(name, {}))
    for name_in_params, name_in_pydantic in PYDANTIC_BOUNDS.items():
        if metadata.get(name_in_params) is not None:
            bounds.setdefault(name_in_pydantic, metadata[name_in_params])
    return value_type | None, Field(None, description=metadata.get("help"), **bounds)


def non_none(annotation):
    """`int` for `int | None` (a field's type without its None)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return args[0] if len(args) == 1 else annotation


def generation_options_model() -> type[Strict]:
    hints = typing.get_type_hints(GenerationParams)
    options = {f.name: request_field(f.name, hints[f.name], f.metadata) for f in served_fields()}
    return create_model("GenerationOptions", __base__=Strict, **options)


GenerationOptions = generation_options_model()
GENERATION_OPTIONS = tuple(f.name for f in served_fields())


def search_options_model() -> type[Strict]:
    """`search`: the fields of `core.params.SearchParams`; `method` is required, the others default to its."""
    hints = typing.get_type_hints(SearchParams)
    options = {f.name: request_field(f.name, hints[f.name], f.metadata) for f in fields(SearchParams)}
    method_type, method_field = options["method"]
    options["method"] = (typing.get_args(method_type)[0], Field(..., description=method_field.description))
    return create_model("SearchOptions", __base__=Strict, **options)


SearchOptions = search_options_model()
PRUNING_FIELDS = tuple(f.name for f in fields(GenerationParams) if f.name.startswith(("prune", "confidence_")))


def search_given(search) -> dict | None:
    """A request's `search` object as `search` keyword arguments (fields not given take SearchParams' defaults)."""
    if search is None:
        return None
    return {name: value for name, value in search.model_dump().items() if value is not None}


class GenerateRequest(GenerationOptions):
    """A prompt (or messages) and the generation options; an option left out takes the model's default. With
    `search`, a step-level beam search or DVTS instead of best-of-k (its batch is beam_width x expansions rows)."""

    prompt: str | None = None
    messages: list[Message] | None = None
    return_token_ids: bool = False
    search: SearchOptions | None = None

    @model_validator(mode="after")
    def _one_prompt_one_size(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected exactly one of prompt and messages")
        if self.mode is not None and self.k is not None:
            raise ValueError("expected mode or k, not both")
        if self.search is not None:
            given = [name for name in ("mode", "k", *PRUNING_FIELDS) if getattr(self, name, None) is not None]
            if given:
                raise ValueError(f"search: the batch is beam_width x expansions rows, not best-of-k; {given[0]} "
                                 "does not apply")  # fmt: skip
        return self


def given_options(request: GenerateRequest) -> dict:
    """The generation options of a request as GenerationParams keyword arguments (None: not given)."""
    return {name: getattr(request, name) for name in GENERATION_OPTIONS}
