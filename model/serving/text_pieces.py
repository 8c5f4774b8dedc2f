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


CONTEXT_TOKENS = 4  # tokens decoded before the new ones, so that a token's text is read in context


class TextPieces:
    """The stream pieces of one answer. Each `update` decodes only the new ids with a few tokens of context before
    them (`CONTEXT_TOKENS`), and searches for stop strings only in the new text and the stop strings' length
    before it, so a stream costs time linear in its length (decoding the whole answer at every token made a
    4096-token answer quadratic on the server's event loop). Where the windowed text disagrees with what came
    before it (a tokenizer whose decoding is not a concatenation at that point), that update decodes the whole
    answer; `final` always does, so that the pieces add up to the final text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""  # the answer's text so far, sent or held back
        self.sent = 0  # characters of `text` sent
        self.searched = 0  # characters of `text` searched for a stop string
        self.read = 0  # ids whose text is in `text`
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _grow(self, ids: list[int], final: bool) -> None:
        """`text` extended by what ids[read:] add."""
        if final or len(ids) < self.read:
            whole = self._decode(ids)
            if whole.startswith(self.text[: self.sent]):  # else pieces were sent that the final text lacks
                self.text, self.searched = whole, min(self.searched, self.sent)
            self.read = len(ids)
            return
        start = max(self.read - CONTEXT_TOKENS, 0)
        before, after = self._decode(ids[start : self.read]), self._decode(ids[start:])
        if after.endswith("\ufffd"):  # the new ids end inside a character: wait for the rest of it
            return
        if after.startswith(before):
            self.text += after[len(before) :]
        else:  # decoding in context disagrees here: the whole answer, once
            whole = self._decode(ids)
            if not whole.startswith(self.text[: self.sent]):
                return
            self.text, self.searched = whole, min(self.searched, self.sent)
        self.read = len(ids)

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text of `ids` (cumulative) since the last call; `final`: no more ids will come."""
        if self.stopped:
            return ""
        self._grow(ids, final)
        text = self.text
        # A stop string that ends in the new text starts at most `longest - 1` characters before it.
        begin = max(self.searched - self.longest + 1, 0)
        found = first_stop(text[begin:], self.stop) if self.stop else None
        self.searched = len(text)
        if found is not None:
            end, self.stopped = begin + found, True
        elif final:
            end = len(text)
        else:
            end = len(text) - held_back(text[max(len(text) - self.longest, 0) :], self.stop)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent : end], end
        return piece


def answer_pieces(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """The answer's text one token at a time (`TextPieces`)."""
    pieces = TextPieces(tokenizer, stop)
    for end in range(1, len(ids) + 1):
        piece = pieces.update(ids[:end], final=end == len(ids))
        if piece:
            yield piece
