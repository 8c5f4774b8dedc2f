"""Argument checks shared by every route. They run before any launch and name the argument at fault."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # token ids are compared as int64


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_tensor(name: str, value, *, dims=None, dtypes=None, device=None) -> None:
    if not isinstance(value, torch.Tensor):
        _fail(name, "a torch.Tensor", type(value).__name__)
    if dims is not None and value.dim() not in dims:
        _fail(name, f"{' or '.join(f'{d}-D' for d in dims)} tensor", f"shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        _fail(name, f"dtype in {[str(d) for d in dtypes]}", value.dtype)
    if device is not None and value.device != device:
        _fail(name, f"a tensor on {device} (the device of `hidden`)", value.device)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_ids(step_token_ids, think_start_id, think_end_id) -> list[int]:
    """The think marker ids: Python ints in int64's range; the step ids: a non-empty list (or 1-D integer tensor)
    of ints in [0, 2**63) (a string is not a list of ids, nor is 1.7 an id). Returns the step ids as Python ints."""
    for name, value in (("think_start_id", think_start_id), ("think_end_id", think_end_id)):
        if not isinstance(value, int) or isinstance(value, bool) or not INT64_MIN <= value <= INT64_MAX:
            _fail(name, "an int token id within int64's range", repr(value))
    if isinstance(step_token_ids, torch.Tensor):
        if step_token_ids.dim() > 1 or step_token_ids.dtype.is_floating_point or step_token_ids.dtype.is_complex:
            _fail("step_token_ids", "a list or 1-D integer tensor of token ids", repr(step_token_ids))
        values = step_token_ids.tolist() if step_token_ids.dim() else [step_token_ids.item()]
    elif isinstance(step_token_ids, (str, bytes)) or not isinstance(step_token_ids, Iterable):
        _fail("step_token_ids", "a list of int token ids", repr(step_token_ids))
    else:
        values = list(step_token_ids)
    if not values or not all(_is_int(value) and 0 <= value <= INT64_MAX for value in values):
        _fail("step_token_ids", "at least one token id, each an int in [0, 2**63)", repr(values))
    return [int(value) for value in values]


def check_head(
    hidden_size: int, dtype: torch.dtype, device: torch.device, w1, b1, w2, b2, *, vector_dtypes=FLOAT_DTYPES
) -> int:
    """Checks the nn.Linear layout W1 [F, H] (in `dtype`), b1 [F], W2 [1, F], b2 [1]; returns F (2H for SPRM).
    W1 is checked against `vector_dtypes` first, so that a caller that takes `dtype` from W1 (StepScorer) blames
    the weights, not the hidden states it later receives."""
    check_tensor("w1", w1, dims=(2,), dtypes=vector_dtypes, device=device)
    if w1.dtype != dtype:
        _fail("w1", f"dtype {dtype} (the dtype of `hidden`)", w1.dtype)
    width = w1.shape[0]
    if w1.shape[1] != hidden_size:
        _fail("w1", f"shape [F, {hidden_size}] (H of `hidden`)", f"shape {tuple(w1.shape)}")
    if w1.stride(-1) != 1:
        _fail("w1", "unit stride in its last dimension", f"strides {w1.stride()}")
    if width == 0:
        _fail("w1", "at least one output feature", f"shape {tuple(w1.shape)}")
    check_tensor("b1", b1, dims=(1,), dtypes=vector_dtypes, device=device)
    if b1.shape[0] != width:
        _fail("b1", f"shape [{width}]", f"shape {tuple(b1.shape)}")
    check_tensor("w2", w2, dims=(1, 2), dtypes=vector_dtypes, device=device)
    if w2.numel() != width or (w2.dim() == 2 and w2.shape[0] != 1):
        _fail("w2", f"shape [1, {width}]", f"shape {tuple(w2.shape)}")
    check_tensor("b2", b2, dims=(0, 1), dtypes=vector_dtypes, device=device)
    if b2.numel() != 1:
        _fail("b2", "shape [1]", f"shape {tuple(b2.shape)}")
    return width


def check_hidden(hidden, *, dtypes=FLOAT_DTYPES) -> int:
    """[N, H] or [B, T, H] with unit last stride; returns the number of rows N (or B*T)."""
    check_tensor("hidden", hidden, dims=(2, 3), dtypes=dtypes)
    if hidden.shape[-1] == 0:
        _fail("hidden", "H >= 1", f"shape {tuple(hidden.shape)}")
    if hidden.stride(-1) != 1 and hidden.shape[-1] > 1:
        _fail("hidden", "unit stride in its last dimension (any row strides are fine)", f"strides {hidden.stride()}")
    return hidden.shape[0] if hidden.dim() == 2 else hidden.shape[0] * hidden.shape[1]


def check_group_size(group_size, num_candidates: int) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        _fail("group_size", "a positive int or None", repr(group_size))
    if num_candidates % group_size != 0:
        _fail("group_size", f"a divisor of the number of candidates B={num_candidates}", group_size)


def check_csr(step_index, offsets, num_rows: int, device: torch.device, *, values: bool = True) -> None:
    """Shapes and dtypes, then (values=True) the values, with one host synchronisation: monotonic offsets from 0
    to S and indices in range. values=False checks only what the tensors' metadata says (no synchronisation)."""
    check_tensor("step_index", step_index, dims=(1,), dtypes=(torch.int64,), device=device)
    check_tensor("offsets", offsets, dims=(1,), dtypes=(torch.int64,), device=device)
    if offsets.numel() < 1:
        _fail("offsets", "shape [B+1] with B >= 0", f"shape {tuple(offsets.shape)}")
    if not values:
        return
    num_steps = step_index.numel()
    zero = torch.zeros((), dtype=torch.int64, device=device)
    facts = torch.stack(
        [
            offsets[0],
            offsets[-1],
            (offsets[1:] < offsets[:-1]).any().long() if offsets.numel() > 1 else zero,
            step_index.min() if num_steps else zero,
            step_index.max() if num_steps else zero,
        ]
    ).tolist()
    first, last, decreasing, low, high = facts
    if first != 0 or last != num_steps:
        _fail("offsets", f"offsets[0] == 0 and offsets[-1] == len(step_index) == {num_steps}", f"{first}..{last}")
    if decreasing:
        _fail("offsets", "non-decreasing values (CSR offsets)", "a decreasing pair")
    _check_index_range(num_steps, low, high, num_rows)


def check_step_index(step_index, num_rows: int, device: torch.device) -> None:
    """int64 [S] row indices in [0, num_rows) (one host synchronisation when S > 0)."""
    check_tensor("step_index", step_index, dims=(1,), dtypes=(torch.int64,), device=device)
    if step_index.numel():
        low, high = torch.stack([step_index.min(), step_index.max()]).tolist()
        _check_index_range(step_index.numel(), low, high, num_rows)


def _check_index_range(num_steps: int, low: int, high: int, num_rows: int) -> None:
    if num_steps and (low < 0 or high >= num_rows):
        _fail("step_index", f"indices in [0, {num_rows}) (rows of `hidden`)", f"values in [{low}, {high}]")
