"""The character tokenizer of the tiny and shipped folders reads the same on every supported transformers version
(CI runs this file on the oldest and the newest), and `check_round_trip` catches tokenizers that do not.

The ids are pinned: the shipped model.safetensors was trained on them."""

import json
import os
import random
import warnings

import pytest

from sprm_kernels.model import ReflectiveModel
from sprm_kernels.model.core.tokens import check_round_trip
from sprm_kernels.model.shipped import SHIPPED_DIR, tiny
from sprm_kernels.model.shipped.build import CHARS as SHIPPED_CHARS
from sprm_kernels.model.shipped.build import save_tokenizer

SHIPPED = SHIPPED_DIR
# id -> decoded text, as the shipped policy was trained on them
SHIPPED_TOKENS = [
    "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>", ".\n\n",
    *"0123456789", "+", "=", "?", " ", "y", "n", ".", "\n",
]  # fmt: skip
TINY_TOKENS = SHIPPED_TOKENS[:8] + list("0123456789+=x .\n")


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def reference_ids(text: str, tokens: list[str]) -> list[int]:
    """The character tokenizer's ids by hand: the longest multi-character token starting here, else the character."""
    long_tokens = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)
    ids, i = [], 0
    while i < len(text):
        match = next((t for t in long_tokens if text.startswith(t, i)), text[i])
        ids.append(tokens.index(match))
        i += len(match)
    return ids


def random_text(rng: random.Random, tokens: list[str], length: int) -> str:
    return "".join(rng.choice(tokens) for _ in range(length))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The committed shipped tokenizer, and the tiny and shipped tokenizers as their builders write them now."""
    tiny_dir = tmp_path_factory.mktemp("tiny")
    tiny.save_char_tokenizer(tiny_dir)
    shipped_dir = tmp_path_factory.mktemp("shipped")
    save_tokenizer(shipped_dir)
    return {
        "shipped": (SHIPPED, SHIPPED_TOKENS),
        "rebuilt": (shipped_dir, SHIPPED_TOKENS),
        "tiny": (tiny_dir, TINY_TOKENS),
    }


@pytest.mark.parametrize("name", ["shipped", "rebuilt", "tiny"])
def test_character_tokenizer_keeps_its_ids_and_round_trips(folders, name):
    path, tokens = folders[name]
    tokenizer = load(path)
    assert len(tokenizer) == len(tokens)
    assert tokenizer.batch_decode([[i] for i in range(len(tokens))]) == tokens
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id) == (0, 1, 4)
    rng = random.Random(0)
    pieces = [t for t in tokens if t not in ("<pad>", "<unk>")]
    for length in [1, 2, 3, 5, 8, 13, 40, 200] * 25:
        text = random_text(rng, pieces, length)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference_ids(text, tokens), repr(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2=?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>1+2=?<|end|><|assistant|><think>"


def test_shipped_tokenizer_files_are_what_the_builder_writes(folders):
    rebuilt = folders["rebuilt"][0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(SHIPPED, name)) as a, open(os.path.join(rebuilt, name)) as b:
            assert json.load(a) == json.load(b), name
    assert sorted(f for f in os.listdir(SHIPPED) if f.startswith(("tokenizer", "chat_template"))) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert SHIPPED_CHARS == SHIPPED_TOKENS[8:]


def test_unknown_characters_are_dropped_on_every_version(folders):
    tokenizer = load(folders["shipped"][0])
    assert tokenizer.encode("1a2", add_special_tokens=False) == [9, 10]
    assert tokenizer.encode("abc", add_special_tokens=False) == []


def marker_ids(tokenizer):
    return (tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>"))


def tokenizer_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("tokenizer:")]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_round_trip_check_accepts_the_character_tokenizers(folders, lang):
    for path, _ in folders.values():
        tokenizer = load(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_round_trip(tokenizer, marker_ids(tokenizer), [7] if lang == "en" else [7, len(tokenizer) - 1], lang)
        assert tokenizer_warnings(caught) == []


def space_dropping_folder(path):
    """The defect of transformers 5 reading the old files: a byte-level pipeline over a vocabulary that holds a
    literal space, which the byte-level step turns into "Ġ", which the vocabulary lacks: spaces vanish."""
    tiny.save_char_tokenizer(path)
    with open(os.path.join(path, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    vocab[" "] = vocab.pop("Ġ")
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return path


def test_round_trip_check_warns_when_text_does_not_round_trip(tmp_path):
    tokenizer = load(space_dropping_folder(tmp_path))
    assert tokenizer.encode("1 2", add_special_tokens=False) == [9, 10]  # the space is gone
    with pytest.warns(UserWarning, match=r"tokenizer: decode then encode changes the ids .*'<think>1 2"):
        check_round_trip(tokenizer, marker_ids(tokenizer), [7])


def test_reflective_model_warns_on_a_space_dropping_tokenizer(tmp_path):
    tokenizer = load(space_dropping_folder(tmp_path))
    model = tiny.make_tiny_policy("qwen2", len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    with pytest.warns(UserWarning, match="scores of decoded text may differ"):
        ReflectiveModel(model, tokenizer, tiny.make_tiny_head())


def test_reflective_model_refuses_a_tokenizer_whose_step_token_does_not_round_trip():
    from tokenizers import decoders

    tokenizer = tiny.make_char_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\n", "")])
    assert tokenizer.decode([7]) == "."  # `.\n\n` decodes to "." which encodes to another id
    model = tiny.make_tiny_policy("qwen2", len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    with pytest.raises(ValueError, match=r"tokenizer: expected '<think>', '</think>' and the step token\(s\) \[7\]"):
        ReflectiveModel(model, tokenizer, tiny.make_tiny_head())


def test_reflective_model_refuses_a_tokenizer_whose_marker_does_not_round_trip():
    from tokenizers import decoders

    tokenizer = tiny.make_char_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("<think>", "")])
    model = tiny.make_tiny_policy("qwen2", len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    with pytest.raises(ValueError, match=r"did not, so scoring a decoded generation"):
        ReflectiveModel(model, tokenizer, tiny.make_tiny_head())
