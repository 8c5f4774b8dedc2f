"""What every engine shares about its inputs: texts and token ids, chat prompts, the tokenizer's round trip.

Engines call these free functions on their own tokenizer, so that a bad input gets the same error on every engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sprm_kernels.model.core.params import generation_defaults
from sprm_kernels.model.core.tokens import (
    chat_prompt_ids,
    check_round_trip,
    resolve_lang,
    step_token_ids,
    think_marker_ids,
)


def rule_token_ids(tokenizer, lang: str = "en") -> tuple[int, int, list[int]]:
    """(think start id, think end id, step token ids) of a tokenizer: the ids the scoring rule reads. Checked to
    round-trip (decode then encode gives the same ids), so that a text scored as text and as ids scores the same;
    every engine takes its rule ids from here. `lang` "en" (the default) gives way to the step-token choice the
    tokenizer's folder records (`core.tokens.resolve_lang`: `sprm_step_tokens` in tokenizer_config.json)."""
    lang = resolve_lang(tokenizer, lang)
    think_start_id, think_end_id = think_marker_ids(tokenizer)
    step_ids = step_token_ids(tokenizer, lang)
    check_round_trip(tokenizer, (think_start_id, think_end_id), step_ids, lang)
    return think_start_id, think_end_id, step_ids


def is_id_list(value) -> bool:
    """A 1-D integer tensor, or a list / tuple of Python ints (bools are not ids)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point()
    return isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: what `score` scores for a text."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def prompt_token_ids(tokenizer, prompt_or_messages) -> list[int]:
    """The chat template applied to a prompt (str) or messages, tokenized: what `generate` prefills."""
    return chat_prompt_ids(tokenizer, prompt_or_messages)


def token_lists(tokenizer, texts_or_token_ids, vocab_size: int) -> tuple[list[list[int]], bool]:
    """`score`'s input as (token id lists, whether a single item was given).

    A text or a non-empty list of ints is one item; a list of those is a batch (an empty list is an empty batch).
    Texts are tokenized without special tokens; ids must lie in [0, vocab_size)."""
    single = isinstance(texts_or_token_ids, str) or (is_id_list(texts_or_token_ids) and len(texts_or_token_ids))
    items = [texts_or_token_ids] if single else texts_or_token_ids
    if isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
        raise ValueError(
            "texts_or_token_ids: expected a text, a list of token ids, or a list of those, "
            f"got {type(texts_or_token_ids).__name__}"
        )
    sequences = []
    for item in items:
        if isinstance(item, str):
            sequences.append(list(tokenizer(item, add_special_tokens=False)["input_ids"]))
        elif is_id_list(item):
            sequences.append([int(i) for i in (item.tolist() if isinstance(item, torch.Tensor) else item)])
        else:
            raise ValueError(
                f"texts_or_token_ids: expected each item to be a text or a list of token ids, got {item!r:.80}"
            )
    for index, sequence in enumerate(sequences):
        if sequence and not 0 <= min(sequence) <= max(sequence) < vocab_size:
            bad = next(i for i in sequence if not 0 <= i < vocab_size)
            raise ValueError(
                f"texts_or_token_ids: expected token ids in [0, {vocab_size}) (the model's vocabulary), "
                f"got {bad} in item {index}"
            )
    return sequences, bool(single)


def check_batch_tokens(batch_tokens) -> None:
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens: expected a positive int, got {batch_tokens!r}")


def context_limit(engine, max_text_tokens: int | None = None) -> int | None:
    """The longest sequence accepted: `max_text_tokens` if given, else the model's `max_position_embeddings`."""
    if max_text_tokens is not None:
        if isinstance(max_text_tokens, bool) or not isinstance(max_text_tokens, int) or max_text_tokens < 1:
            raise ValueError(f"max_text_tokens: expected a positive int, got {max_text_tokens!r}")
        return max_text_tokens
    return engine.info().context_length


def token_problem(ids: list[int], limit: int | None) -> tuple[int, str] | None:
    """Why a text's token ids cannot be scored, as (HTTP status, message), or None: no tokens at all (a text made
    only of characters the tokenizer drops), or more than `limit`. Shared by `sprm score` and the server."""
    if not ids:
        return 422, "expected a text with at least one token, got none (characters the tokenizer does not know?)"
    if limit is not None and len(ids) > limit:
        return 413, f"{len(ids)} tokens, over the limit of {limit} tokens"
    return None


def generation_options(engine, prompt_or_messages, **given) -> dict:
    """`generate` / `search` keyword arguments: `given` (None: not given) completed with the model's defaults
    (`core.params.generation_defaults`: the folder's temperature / top_p, budgets fitted to the context). The CLI
    and the server both get them from `generation_plan`, so a bare prompt is sampled the same way by
    `sprm generate` and `POST /generate`."""
    return generation_plan(engine, prompt_or_messages, **given)[0]


def generation_plan(
    engine, prompt_or_messages, *, limit: int | None = None, limit_name: str = "", **given
) -> tuple[dict, str | None]:
    """(`generation_options`, why those budgets run past the model's context, or past a tighter `limit`, or
    None), the prompt tokenized once. `limit_name` (e.g. "--max-text-tokens") is named in the message when the
    tighter limit is the one exceeded."""
    info = engine.info()
    prompt_tokens = len(engine.prompt_ids(prompt_or_messages))
    options = generation_defaults(info.path, info.context_length, prompt_tokens, given)
    total = prompt_tokens + options["max_think_tokens"] + options["max_answer_tokens"]
    context = info.context_length
    overflow = None
    if context is not None and total > context:
        overflow = f"over the model's context of {context} tokens"
    elif limit is not None and (context is None or limit < context) and total > limit:
        overflow = f"over the limit of {limit} tokens" + (f" ({limit_name})" if limit_name else "")
    if overflow is not None:
        overflow = f"prompt ({prompt_tokens} tokens) + max_think_tokens + max_answer_tokens = {total}, {overflow}"
    return options, overflow
