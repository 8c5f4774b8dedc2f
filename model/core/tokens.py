"""Token ids the scoring rule needs, taken from the tokenizer as the reference server does (docs/method.md §3)."""

from __future__ import annotations

import warnings

from sprm_kernels.model.core.types import TextPrompt

# Step-token choices (docs/method.md §3). "en" and "zh" are the reference's; "newline" and "period" are for
# tokenizers where `.\n\n` is not one token (docs/real_model.md shows what each does on a byte-level BPE).
LANGS = ("en", "zh", "newline", "period")
THINK_START, THINK_END = "<think>", "</think>"
EN_STEP_TEXT = ".\n\n"
ZH_STEP_CHARS = ("\n", "。")
VOCAB_SCAN_LANGS = ("zh", "newline", "period")  # step tokens found by reading the whole vocabulary
# A model folder's own step-token choice: a field of its tokenizer_config.json (kept by transformers in
# `tokenizer.init_kwargs`, and written back by `save_pretrained`), one of LANGS. Used where lang is "en", the default.
STEP_TOKENS_KEY = "sprm_step_tokens"


def think_marker_ids(tokenizer) -> tuple[int, int]:
    """Ids of `<think>` and `</think>`; each must be a single token (the reference silently took the first piece)."""
    ids = []
    for marker in (THINK_START, THINK_END):
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"tokenizer: expected {marker!r} to encode to a single token id, got {encoded}; "
                "the SPRM needs a reasoning tokenizer with think markers in its vocabulary"
            )
        ids.append(encoded[0])
    return ids[0], ids[1]


def folder_step_tokens(tokenizer) -> str | None:
    """The step-token choice a tokenizer's folder records (`STEP_TOKENS_KEY` in tokenizer_config.json), or None."""
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    choice = init_kwargs.get(STEP_TOKENS_KEY) if isinstance(init_kwargs, dict) else None
    if choice is not None and choice not in LANGS:
        raise ValueError(f"tokenizer_config.json: expected {STEP_TOKENS_KEY} to be one of {LANGS}, got {choice!r}")
    return choice


def resolve_lang(tokenizer, lang: str = "en") -> str:
    """The step-token choice that applies: `lang` when it is not the default "en", else the folder's own choice
    (`folder_step_tokens`) when it records one, else "en" (the reference's `.\\n\\n`)."""
    if lang not in LANGS:
        raise ValueError(f"lang: expected one of {LANGS}, got {lang!r}")
    return (folder_step_tokens(tokenizer) or lang) if lang == "en" else lang


def step_token_ids(tokenizer, lang: str = "en") -> list[int]:
    """The step-token ids of a choice (`lang`, taken as given: see `resolve_lang` for the folder's own choice).

    en: the ids of `.\\n\\n` encoded without special tokens (the reference). zh: every vocabulary token whose decoded
    text contains `\\n` or `。`, is at most 3 characters long and has at most one other character (the reference).
    newline: every vocabulary token whose decoded text is whitespace only and holds a line break (`\\n`, `\\n\\n`,
    `\\n    `, `\\r\\n`, ...): a step ends at each line break, or run of them. period: every vocabulary token whose
    decoded text is `.` with only whitespace around it (`.`, ` .`): a step ends at each full stop."""
    if lang not in LANGS:
        raise ValueError(f"lang: expected one of {LANGS}, got {lang!r}")
    if lang == "en":
        ids = tokenizer.encode(EN_STEP_TEXT, add_special_tokens=False)
    else:
        vocab_ids = sorted(set(tokenizer.get_vocab().values()))
        texts = tokenizer.batch_decode([[token_id] for token_id in vocab_ids])
        ids = [token_id for token_id, text in zip(vocab_ids, texts, strict=True) if is_step_text(text, lang)]
    if not ids:
        raise ValueError(f"tokenizer: expected at least one step token for lang={lang!r}, found none")
    return sorted(set(ids))


def is_step_text(text: str, lang: str) -> bool:
    """Whether a vocabulary token's decoded text is a step token of a vocabulary-scan choice (zh, newline, period)."""
    if lang == "zh":
        return len(text) <= 3 and any(char in text and len(text.replace(char, "")) <= 1 for char in ZH_STEP_CHARS)
    if lang == "newline":
        return text.isspace() and "\n" in text
    if lang == "period":
        return text.strip() == "."
    raise ValueError(f"lang: expected one of {VOCAB_SCAN_LANGS}, got {lang!r}")


def check_round_trip(tokenizer, think_ids: tuple[int, int], step_ids: list[int], lang: str = "en") -> None:
    """Decode then encode must give back the ids the scoring rule looks for, or text scoring (`score(text)`, the
    server, the CLI) would find other steps than generation did.

    Refuses (ValueError) when a think marker or an English step token does not survive `decode` then `encode`.
    Warns (UserWarning) when a step token of a vocabulary-scan choice (zh, newline, period) does not (a vocabulary
    may hold tokens its own encoder never produces), and when ordinary text of digits, spaces and newlines does
    not: e.g. transformers 5 reading a tokenizer.json that is not Qwen2's byte-level pipeline as a
    `Qwen2Tokenizer`, which then drops spaces."""

    def round_trips(ids: list[int]) -> bool:
        return tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids

    broken_markers = [tokenizer.decode([i]) for i in think_ids if not round_trips([i])]
    if broken_markers or (lang == "en" and not round_trips(step_ids)):
        raise ValueError(
            f"tokenizer: expected {THINK_START!r}, {THINK_END!r} and the step token(s) {step_ids} to encode back to "
            f"their ids after decoding; {broken_markers or [tokenizer.decode(step_ids)]} did not, so scoring a "
            "decoded generation would score other positions (is the tokenizer folder written for another version "
            "of transformers?)"
        )
    broken = [i for i in step_ids if not round_trips([i])] if lang in VOCAB_SCAN_LANGS else []
    step_text = tokenizer.decode(step_ids[:1])
    probe = f"{THINK_START}1 2{step_text}3\n4{step_text}{THINK_END}"  # no " ." (some decoders clean it up)
    ids = tokenizer.encode(probe, add_special_tokens=False)
    if broken or tokenizer.decode(ids) != probe or not round_trips(ids):
        seen = tokenizer.decode(ids)
        warnings.warn(
            f"tokenizer: decode then encode changes the ids (step tokens {broken}, {probe!r} -> {seen!r}): "
            "scores of decoded text may differ from scores of the generated ids",
            UserWarning,
            stacklevel=3,
        )


def chat_prompt_ids(tokenizer, prompt_or_messages) -> list[int]:
    """The chat template applied to a user prompt (str) or a list of {"role", "content"} messages, with the
    generation prompt, tokenized without adding special tokens again (the template writes them); a `TextPrompt`
    tokenized as written."""
    if isinstance(prompt_or_messages, TextPrompt):
        if not prompt_or_messages.text.strip():
            raise ValueError("prompt_or_messages: expected a non-empty prompt, got no text")
        return list(tokenizer(prompt_or_messages.text)["input_ids"])
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    elif isinstance(prompt_or_messages, (list, tuple)) and all(
        isinstance(message, dict) and "role" in message and "content" in message for message in prompt_or_messages
    ):
        messages = list(prompt_or_messages)
    else:
        raise ValueError(
            "prompt_or_messages: expected a prompt string or a list of {'role', 'content'} dicts, "
            f"got {type(prompt_or_messages).__name__}"
        )
    if not any(isinstance(m["content"], str) and m["content"].strip() for m in messages):
        raise ValueError("prompt_or_messages: expected a non-empty prompt, got no text")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer: expected a chat template (tokenizer.chat_template) to build the prompt, got None")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
