"""`serving.text_pieces`: a growing answer's stream pieces add up to its final text, cut at the first stop string,
never sending what could still become one."""

import pytest

from sprm_kernels.model.serving.text_pieces import TextPieces, answer_pieces, cut_at_stop, held_back


class Chars:
    """A tokenizer whose ids are characters (ord), so any text is a token list."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("hello world", (), "hello world"),
        ("hello world", ("o w",), "hell"),
        ("hello world", ("xyz", "wor", "llo"), "he"),  # the earliest stop string wins, not the first listed
        ("abcabc", ("ca",), "ab"),
        ("ab", ("abc",), "ab"),  # a stop string's start at the very end is text once nothing more comes
    ],
)
def test_pieces_add_up_to_the_text_cut_at_the_first_stop(text, stop, expected):
    assert cut_at_stop(text, stop)[0] == expected
    pieces = list(answer_pieces(Chars(), ids(text), stop))
    assert "".join(pieces) == expected


def test_a_possible_start_of_a_stop_string_is_held_back_until_it_is_decided():
    pieces = TextPieces(Chars(), ("END",))
    assert pieces.update(ids("abE")) == "ab"  # "E" may begin "END"
    assert pieces.update(ids("abEN")) == ""
    assert pieces.update(ids("abENx")) == "ENx"  # it did not
    assert pieces.update(ids("abENxEND and more")) == "" and pieces.stopped
    assert pieces.update(ids("abENxEND and more"), final=True) == ""
    assert (
        held_back("xxEN", ("END", "NO")) == 2 and held_back("xxN", ("END", "NO")) == 1 and held_back("x", ("END",)) == 0
    )


def test_a_partial_character_is_held_back():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    euro = list("€".encode())
    pieces = TextPieces(Bytes())
    assert pieces.update(euro[:1]) == "" and pieces.update(euro[:2]) == ""
    assert pieces.update(euro) == "€"


class CountingChars(Chars):
    """Chars, counting the ids it is asked to decode."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return super().decode(ids)


def test_a_stream_decodes_each_id_a_bounded_number_of_times():
    """Linear, not quadratic: a 2000-token stream decodes about CONTEXT_TOKENS + 2 ids per token, plus the whole
    answer once at the end (the old pieces decoded the whole answer at every token: 2 million ids here)."""
    from sprm_kernels.model.serving.text_pieces import CONTEXT_TOKENS

    tokenizer = CountingChars()
    text = "step one. step two.\n" * 100
    pieces = list(answer_pieces(tokenizer, ids(text), ("STOP", "\n\n")))
    assert "".join(pieces) == text
    assert tokenizer.decoded <= (2 * CONTEXT_TOKENS + 2) * len(text) + len(text)


@pytest.mark.parametrize("seed", range(4))
def test_pieces_in_any_chunks_equal_the_whole_decode_on_a_real_tokenizer(seed):
    """The shipped model's tokenizer, random texts and stop strings, ids arriving in random chunks: the pieces
    add up to the final text cut at its first stop string, as the quadratic reference computes it."""
    import random

    from transformers import AutoTokenizer

    from sprm_kernels.model.shipped import SHIPPED_DIR

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    rng = random.Random(seed)
    alphabet = "0123456789+=yn.\n "
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        stop = tuple(
            {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 4))}
        )
        expected = cut_at_stop(tokenizer.decode(token_ids, skip_special_tokens=True), stop)[0]
        pieces, got, end = TextPieces(tokenizer, stop), [], 0
        while end < len(token_ids):
            end = min(len(token_ids), end + rng.randint(1, 4))
            got.append(pieces.update(token_ids[:end], final=end == len(token_ids)))
        if not token_ids:
            got.append(pieces.update([], final=True))
        assert "".join(got) == expected, (text, stop)
