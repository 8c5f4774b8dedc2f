"""Tiny random reflective models for tests, benchmarks and demos: no download, seconds on a CPU.

A character tokenizer (Qwen2's byte-level BPE pipeline, one token per character) with `<think>`, `</think>` and
`.\\n\\n` as single tokens and a chat template whose generation prompt ends with `<think>`, a random Qwen2 or
Llama policy, and an SPRM head scaled so that step probabilities spread over (0, 1). `save_tiny_reflective` writes
them in the official MetaStone-S1 layout (HF model folder + tokenizer + `score_module.pt`). The policy is random:
its thinking is noise, but every code path (hooked features, scoring rule, KV-cache reuse, checkpoint loading) is
real.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from sprm_kernels.model.core.head import SPRMHead

SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
MARKERS = ["<think>", "</think>", ".\n\n"]
CHARS = list("0123456789+=x .\n")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)
# Qwen2's pre-tokenizer split. transformers >= 5 loads every folder whose config says model_type "qwen2" as a
# `Qwen2Tokenizer` that rebuilds this pipeline (NFC, this split, ByteLevel, BPE, ByteLevel decoder) whatever
# tokenizer.json says; 4.x reads tokenizer.json as written. Writing exactly that pipeline makes both agree.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(text: str) -> str:
    """`text` in ByteLevel's alphabet: printable bytes stand for themselves, the others (space, newline, ...) for
    the characters 256 + n (GPT-2's table), e.g. " " -> "Ġ", "\\n" -> "Ċ"."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = {byte: chr(256 + n) for n, byte in enumerate(b for b in range(256) if b not in printable)}
    return "".join(chr(byte) if byte in printable else others[byte] for byte in text.encode())


def save_char_tokenizer(path, markers=MARKERS, chat_template: str = CHAT_TEMPLATE, chars=CHARS) -> None:
    """Write tokenizer.json and tokenizer_config.json of the character tokenizer into `path`.

    Ids: the chat specials, then the markers (added tokens, matched before anything else), then one per character
    of `chars`. It is Qwen2's byte-level BPE pipeline with one vocabulary entry per character and no merges, so
    every transformers version reads the same tokenizer from these files (same ids, exact decode/encode round
    trip). Characters outside `chars` are dropped when encoding, as the byte-level BPE has no unknown token.
    The files are written here rather than by `save_pretrained`, whose output depends on the transformers version.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS + list(markers))}
    for char in chars:
        vocab.setdefault(_byte_level(char), len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in markers])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None, "eos_token": "<|end|>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": ["<|user|>", "<|assistant|>"],
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "chat_template": chat_template,
    }  # fmt: skip
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def make_char_tokenizer(markers=MARKERS, chat_template: str = CHAT_TEMPLATE, chars=CHARS):
    """The tokenizer of `save_char_tokenizer`'s files, loaded by `AutoTokenizer` as any saved folder is."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as path:
        save_char_tokenizer(path, markers, chat_template, chars)
        return AutoTokenizer.from_pretrained(path)


def make_tiny_policy(
    arch: str,
    vocab_size: int,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 3,
    init_std: float = 0.02,
    max_positions: int = 256,
    eos_token_id: int | None = None,
) -> nn.Module:
    """A random causal LM: "qwen2", "qwen2-sliding" (layers 1+ attend to a window of 8) or "llama".

    Special ids come from the tokenizer (`eos_token_id`), never from the config classes' defaults (LlamaConfig's
    eos 2 would be `<|user|>` in the character tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=False, initializer_range=init_std,
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None,
    )  # fmt: skip
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if arch == "qwen2-sliding":
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1)
        return Qwen2ForCausalLM(config).eval()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    raise ValueError(f"arch: expected 'qwen2', 'qwen2-sliding' or 'llama', got {arch!r}")


def make_tiny_head(hidden_size: int = 32, *, seed: int = 1, feature_std: float = 0.02) -> SPRMHead:
    """Scaled so that step probabilities spread over (0, 1) on a random policy's small (std ~0.02) features."""
    gen = torch.Generator().manual_seed(seed)
    head = SPRMHead(hidden_size)
    with torch.no_grad():
        head[0].weight.copy_(torch.randn(2 * hidden_size, hidden_size, generator=gen) * (0.2 / feature_std))
        head[0].bias.copy_(torch.randn(2 * hidden_size, generator=gen) * 0.3)
        head[3].weight.copy_(torch.randn(1, 2 * hidden_size, generator=gen) * 0.5 * (32 / hidden_size) ** 0.5)
        head[3].bias.fill_(0.2)
    return head


def save_tiny_reflective(
    path: str | os.PathLike, *, arch: str = "qwen2", seed: int = 0, hidden_size: int = 32, num_layers: int = 3
) -> str:
    """Writes an official-layout folder (HF model + tokenizer + `score_module.pt`) and returns its path."""
    tokenizer = make_char_tokenizer()
    policy = make_tiny_policy(
        arch, len(tokenizer), seed=seed, hidden_size=hidden_size, num_layers=num_layers,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    head = make_tiny_head(hidden_size, seed=seed + 1)
    os.makedirs(path, exist_ok=True)
    policy.save_pretrained(path)
    save_char_tokenizer(path)
    # The published checkpoints store the head as a torch.save'd state dict of a plain nn.Sequential.
    plain = nn.Sequential(*[module for module in head])
    torch.save(plain.state_dict(), os.path.join(path, "score_module.pt"))
    return str(path)
