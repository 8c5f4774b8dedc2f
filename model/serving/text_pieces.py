"""An answer's text as it grows, for streams: what each longer prefix of its token ids adds, held back while it
ends in a partial character or in what could be the start of a stop string, and cut at the first stop string
(OpenAI's `stop`). The pieces always add up to the final text."""

from __future__ import annotations

from collections.abc import Iterator

MAX_STOP_STRINGS = 4  # OpenAI's limit


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(the text before the first stop string, whether one was found)."""
    cut = first_stop(text, stop)
    return (text, False) if cut is None else (text[:cut], True)


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could begin a stop string still to come."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextPieces:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.sent, self.stopped = "", False

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text of `ids` (cumulative) since the last call; `final`: no more ids will come."""
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)
        if not (final or self.stopped):
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - held_back(text, self.stop)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def answer_pieces(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """The answer's text one token at a time (`TextPieces`)."""
    pieces = TextPieces(tokenizer, stop)
    for end in range(1, len(ids) + 1):
        piece = pieces.update(ids[:end], final=end == len(ids))
        if piece:
            yield piece
