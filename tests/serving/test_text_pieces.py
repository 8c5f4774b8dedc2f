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
