"""Bad input to the library fails before any work with a ValueError that names the argument (or the file and key),
never an OverflowError, IndexError, AttributeError or a silently reinterpreted value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_head
from torch import nn

from sprm_kernels import StepScorer, sprm_score, step_positions
from sprm_kernels.model import ReflectiveModel, SPRMHead
from sprm_kernels.model.shipped import tiny

RULE = dict(step_token_ids=[3], think_start_id=1, think_end_id=2)
IDS = torch.tensor([[1, 5, 3, 5, 3, 2]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(think_start_id=2**70), r"think_start_id: expected an int token id within int64's range, got 1180591"),
        (dict(think_end_id=-(2**64)), "think_end_id: expected an int token id within int64's range"),
        (dict(think_start_id=np.int64(1)), "think_start_id"),
        (dict(step_token_ids="12"), r"step_token_ids: expected a list of int token ids, got '12'"),
        (dict(step_token_ids=b"\x03"), "step_token_ids: expected a list of int token ids"),
        (dict(step_token_ids=[1.7]), r"step_token_ids: expected at least one token id, each an int .*got \[1.7\]"),
        (dict(step_token_ids=[3.0]), "step_token_ids"),
        (dict(step_token_ids=[True]), "step_token_ids"),
        (dict(step_token_ids=[2**63]), "step_token_ids"),
        (dict(step_token_ids=["3"]), "step_token_ids"),
        (dict(step_token_ids=torch.tensor([3.0])), "step_token_ids: expected a list or 1-D integer tensor"),
        (dict(step_token_ids=torch.tensor([[3]])), "step_token_ids: expected a list or 1-D integer tensor"),
    ],
)
def test_step_positions_names_bad_token_ids(kwargs, match):
    with pytest.raises(ValueError, match=match):
        step_positions(IDS, **(RULE | kwargs), backend="torch")


@pytest.mark.parametrize(
    "step_token_ids", [[3], (3,), {3}, range(3, 4), [np.int64(3)], torch.tensor([3]), torch.tensor(3)]
)
def test_step_positions_still_takes_every_kind_of_id_list(step_token_ids):
    step_index, offsets = step_positions(IDS, **(RULE | dict(step_token_ids=step_token_ids)), backend="torch")
    assert step_index.tolist() == [1, 3] and offsets.tolist() == [0, 2]


def test_step_positions_takes_large_ids_within_int64():
    ids = torch.tensor([[2**62, 5, 3, 5, 3, 2**62 + 1]])
    step_index, _ = step_positions(ids, step_token_ids=[3], think_start_id=2**62, think_end_id=2**62 + 1)
    assert step_index.tolist() == [1, 3]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.bool])
def test_step_scorer_blames_weights_of_a_wrong_dtype(dtype):
    w1, b1, w2, b2 = random_head(8, width=16)
    with pytest.raises(
        ValueError, match=r"w1: expected dtype in \['torch.bfloat16', 'torch.float16', 'torch.float32'\]"
    ):
        StepScorer(w1.to(dtype), b1, w2, b2, batch_size=2, backend="torch")


def test_sprm_score_blames_w1_of_another_dtype_than_hidden():
    w1, b1, w2, b2 = random_head(8, width=16)
    hidden, step_index, offsets = torch.randn(4, 8), torch.tensor([0, 2]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"w1: expected dtype torch.float16 \(the dtype of `hidden`\)"):
        sprm_score(hidden.half(), step_index, offsets, w1, b1, w2, b2, backend="torch")
    with pytest.raises(ValueError, match=r"w1: expected dtype in"):
        sprm_score(hidden, step_index, offsets, w1.long(), b1, w2, b2, backend="torch")


@pytest.fixture(scope="module")
def reflective():
    tokenizer = tiny.make_char_tokenizer()
    model = tiny.make_tiny_policy("qwen2", len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return ReflectiveModel(model, tokenizer, tiny.make_tiny_head(), backend="torch")


@pytest.mark.parametrize(
    "ids, bad",
    [([[5, 999999]], 999999), ([5, -1], -1), ([[5, 6], [7, 2**70]], 2**70), ([torch.tensor([5, 24])], 24)],
)
def test_score_refuses_ids_outside_the_vocabulary(reflective, ids, bad):
    with pytest.raises(ValueError, match=rf"texts_or_token_ids: expected token ids in \[0, 24\) .* got {bad} in item"):
        reflective.score(ids)
    assert reflective.score([[5, 23]])[0].token_ids == [5, 23]  # the last id of the vocabulary is fine


def head_state(hidden_size: int = 8) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in SPRMHead(hidden_size).state_dict().items()}


def write_pt(directory, state) -> None:
    torch.save(state, directory / "score_module.pt")


@pytest.mark.parametrize(
    "state, match",
    [
        ({k: v for k, v in head_state().items() if k != "3.bias"}, r"missing \['3.bias'\]"),
        (head_state() | {"0.weight": torch.zeros(16)}, r"0.weight of shape \[2H, H\] with H >= 1, got \(16,\)"),
        (head_state() | {"0.weight": torch.zeros(0, 0)}, r"0.weight of shape \[2H, H\] with H >= 1, got \(0, 0\)"),
        (head_state() | {"0.bias": torch.zeros(3)}, "0.bias"),
        (head_state() | {"3.weight": torch.zeros(2, 16)}, "3.weight"),
        (head_state() | {"3.bias": torch.zeros(())}, "3.bias"),
        (head_state() | {"0.bias": torch.zeros(16, dtype=torch.long)}, "expected 0.bias to be a floating-point tensor"),
        (head_state() | {"3.bias": 1.5}, "expected 3.bias to be a floating-point tensor, got float"),
        ([torch.zeros(1)], "expected a state dict, got list"),
        (torch.zeros(3), "expected a state dict, got Tensor"),
    ],
)
def test_bad_head_pt_files_are_named_with_their_key(tmp_path, state, match):
    write_pt(tmp_path, state)
    with pytest.raises(ValueError, match=match) as caught:
        SPRMHead.from_pretrained(tmp_path)
    assert str(tmp_path / "score_module.pt") in str(caught.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the garbage that starts like a pickle
@pytest.mark.parametrize("name", ["score_module.pt", "sprm_head.safetensors"])
@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x80\x04\x95garbage", b"{" * 100])
def test_corrupt_head_files_give_a_value_error_naming_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: expected .*could not read it"):
        SPRMHead.from_pretrained(tmp_path)


def test_truncated_head_files_give_a_value_error(tmp_path):
    head = SPRMHead(8)
    head.save_pretrained(tmp_path, save_pt=True)
    for name in ("sprm_head.safetensors", "score_module.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="sprm_head.safetensors: expected a safetensors file"):
        SPRMHead.from_pretrained(tmp_path)
    (tmp_path / "sprm_head.safetensors").unlink()
    with pytest.raises(ValueError, match="score_module.pt: expected a state dict"):
        SPRMHead.from_pretrained(tmp_path)


def test_a_pickled_module_is_refused_as_a_value_error(tmp_path):
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 1)), tmp_path / "score_module.pt")
    with pytest.raises(ValueError, match=r"score_module.pt: expected a state dict .*no pickled objects"):
        SPRMHead.from_pretrained(tmp_path)


def test_safetensors_head_with_a_missing_key_is_named(tmp_path):
    from safetensors.torch import save_file

    state = head_state()
    del state["0.bias"]
    save_file(state, tmp_path / "sprm_head.safetensors")
    with pytest.raises(ValueError, match=r"sprm_head.safetensors: expected exactly the keys .* missing \['0.bias'\]"):
        SPRMHead.from_pretrained(tmp_path)
