"""The server's input bounds, known before any request: the characters a text may have, the bytes a body may."""

from __future__ import annotations


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
