"""Argument checks shared by every route. They run before any launch and name the argument at fault."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


def check_head(
    hidden_size: int, dtype: torch.dtype, device: torch.device, w1, b1, w2, b2, *, vector_dtypes=FLOAT_DTYPES
) -> int:
    """Checks the nn.Linear layout W1 [F, H] (in `dtype`), b1 [F], W2 [1, F], b2 [1]; returns F (2H for SPRM)."""
    check_tensor("w1", w1, dims=(2,), dtypes=(dtype,), device=device)
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


def check_csr(step_index, offsets, num_rows: int, device: torch.device) -> None:
    """Shapes and dtypes, then the values (one host synchronisation): monotonic offsets and indices in range."""
    check_tensor("step_index", step_index, dims=(1,), dtypes=(torch.int64,), device=device)
    check_tensor("offsets", offsets, dims=(1,), dtypes=(torch.int64,), device=device)
    if offsets.numel() < 1:
        _fail("offsets", "shape [B+1] with B >= 0", f"shape {tuple(offsets.shape)}")
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
