"""SPRMHead checkpoints (the published `score_module.pt` and our safetensors) and the tokenizer-derived ids."""

from __future__ import annotations

import collections
import pickle
import subprocess
import sys

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from sprm_kernels import sprm_score
from sprm_kernels.model import SPRMHead, chat_prompt_ids, step_token_ids

H = 8


def reference_sequential(hidden_size: int = H, seed: int = 0) -> nn.Sequential:
    """The module the reference server builds before `load_state_dict(torch.load("score_module.pt"))`."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size * 2), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(hidden_size * 2, 1)
    ).eval()


def test_state_dict_layout_and_kernel_weights_match_the_reference_module():
    sequential = reference_sequential()
    head = SPRMHead.from_state_dict(sequential.state_dict()).eval()
    assert list(head.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    # W1 2H^2, b1 2H, W2 2H, b2 1 (2H^2 + 4H + 1, docs/method.md §2)
    assert head.hidden_size == H and sum(p.numel() for p in head.parameters()) == 2 * H * H + 4 * H + 1
    rows = torch.randn(5, H)
    torch.testing.assert_close(head(rows), sequential(rows))
    w1, b1, w2, b2 = head.kernel_weights()
    assert (w1.shape, b1.shape, w2.shape, b2.shape) == ((2 * H, H), (2 * H,), (1, 2 * H), (1,))
    assert not w1.requires_grad
    scores = sprm_score(
        rows, torch.arange(5), torch.tensor([0, 5]), w1, b1, w2, b2, return_step_scores=True, backend="torch"
    )
    torch.testing.assert_close(scores.step_scores, torch.sigmoid(sequential(rows).float()).flatten())


def test_from_pretrained_reads_the_published_pt(tmp_path):
    sequential = reference_sequential()
    torch.save(sequential.state_dict(), tmp_path / "score_module.pt")
    head = SPRMHead.from_pretrained(tmp_path, dtype=torch.float64)
    assert head.w1.dtype == torch.float64 and not head.training
    torch.testing.assert_close(head.w1, sequential[0].weight.double())


def test_safetensors_wins_over_pt_and_save_pretrained_round_trips(tmp_path):
    torch.save(reference_sequential(seed=0).state_dict(), tmp_path / "score_module.pt")
    saved = SPRMHead.from_state_dict(reference_sequential(seed=1).state_dict())
    saved.save_pretrained(tmp_path)
    assert (tmp_path / "sprm_head.safetensors").is_file()
    torch.testing.assert_close(SPRMHead.from_pretrained(tmp_path).w1, saved.w1)

    saved.save_pretrained(tmp_path / "both", save_pt=True)
    plain = reference_sequential(seed=5)
    plain.load_state_dict(torch.load(tmp_path / "both" / "score_module.pt", weights_only=True))
    torch.testing.assert_close(plain[0].weight, saved.w1)


class _NotATensor:
    pass


def test_pt_is_loaded_with_weights_only(tmp_path):
    state = collections.OrderedDict(reference_sequential().state_dict())
    state["3.bias"] = _NotATensor()  # an arbitrary pickled object is refused, never instantiated
    torch.save(state, tmp_path / "score_module.pt")
    with pytest.raises(ValueError, match=r"score_module.pt: expected a state dict .*weights_only=True") as caught:
        SPRMHead.from_pretrained(tmp_path)
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)


def test_bad_checkpoints_are_rejected_with_the_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sprm_head.safetensors or score_module.pt"):
        SPRMHead.from_pretrained(tmp_path)
    state = reference_sequential().state_dict()
    torch.save({**state, "extra": torch.zeros(1)}, tmp_path / "score_module.pt")
    with pytest.raises(ValueError, match=r"score_module.pt: expected exactly the keys .* unexpected \['extra'\]"):
        SPRMHead.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"0.weight of shape \[2H, H\]"):
        SPRMHead.from_state_dict({**state, "0.weight": torch.zeros(H, H)})
    with pytest.raises(ValueError, match="3.weight"):
        SPRMHead.from_state_dict({**state, "3.weight": torch.zeros(1, H)})
    with pytest.raises(ValueError, match="hidden_size"):
        SPRMHead(0)


def _tokenizer(extra_tokens) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<unk>", *"ab\n。"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def test_step_tokens_en_and_zh_follow_the_reference_rule():
    extra = [".\n\n", "\n\n", "a\n", "ab\n", "。\n", "a。", "ab。", "\n\n\n\n"]
    tokenizer = _tokenizer(extra)
    ids = tokenizer.convert_tokens_to_ids
    assert step_token_ids(tokenizer, "en") == [ids(".\n\n")]
    # zh: contains \n or 。, at most 3 characters, at most one other character (per target character)
    expected = ["\n", "。", ".\n\n", "\n\n", "a\n", "。\n", "a。"]
    assert step_token_ids(tokenizer, "zh") == sorted(ids(t) for t in expected)
    with pytest.raises(ValueError, match="lang"):
        step_token_ids(tokenizer, "fr")


def test_chat_prompt_needs_a_template():
    tokenizer = _tokenizer([])
    with pytest.raises(ValueError, match="tokenizer: expected a chat template"):
        chat_prompt_ids(tokenizer, "ab")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_prompt_ids(tokenizer, "ab") == tokenizer.encode("ab", add_special_tokens=False)
    with pytest.raises(ValueError, match="prompt_or_messages: expected a non-empty prompt"):
        chat_prompt_ids(tokenizer, [{"role": "user", "content": ""}])


def test_imports_stay_light():
    code = (
        "import sys, sprm_kernels; assert 'transformers' not in sys.modules; "
        "import sprm_kernels.model; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
