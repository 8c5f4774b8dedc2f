"""Tiny random reflective models for tests, benchmarks and demos: no download, seconds on a CPU.

A character tokenizer (a real `PreTrainedTokenizerFast`) with `<think>`, `</think>` and `.\\n\\n` as single tokens
and a chat template whose generation prompt ends with `<think>`, a random Qwen2 or Llama policy, and an SPRM head
scaled so that step probabilities spread over (0, 1). `save_tiny_reflective` writes them in the official
MetaStone-S1 layout (HF model folder + tokenizer + `score_module.pt`). The policy is random: its thinking is
noise, but every code path (hooked features, scoring rule, KV-cache reuse, checkpoint loading) is real.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .head import SPRMHead

SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
MARKERS = ["<think>", "</think>", ".\n\n"]
CHARS = list("0123456789+=x .\n")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)


def make_char_tokenizer(markers=MARKERS, chat_template: str = CHAT_TEMPLATE, chars=CHARS):
    """One token per character of `chars`, plus the chat specials and the think / step markers as added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(markers) + list(chars))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )  # fmt: skip
    tokenizer.add_tokens(list(markers))
    tokenizer.chat_template = chat_template
    return tokenizer


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
    tokenizer.save_pretrained(path)
    # The published checkpoints store the head as a torch.save'd state dict of a plain nn.Sequential.
    plain = nn.Sequential(*[module for module in head])
    torch.save(plain.state_dict(), os.path.join(path, "score_module.pt"))
    return str(path)
