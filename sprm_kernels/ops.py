"""Public functional API: `step_positions` and `sprm_score`, validated and dispatched (see dispatch.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import torch_ops
from .dispatch import resolve_backend
from .reference import SPRMScores
from .validation import check_csr, check_group_size, check_head, check_hidden, check_tensor, check_token_ids

INT_DTYPES = (torch.int32, torch.int64)


def _check_step_position_args(input_ids, step_token_ids, think_start_id, think_end_id, attention_mask, cu_seqlens):
    check_tensor("input_ids", input_ids, dims=(1, 2), dtypes=INT_DTYPES)
    device = input_ids.device
    step_ids = check_token_ids(step_token_ids, think_start_id, think_end_id)
    if cu_seqlens is not None:
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected packed shape [N] with cu_seqlens, got {tuple(input_ids.shape)}")
        if attention_mask is not None:
            raise ValueError("attention_mask: packed input (cu_seqlens given) has no padding; pass None")
        check_tensor("cu_seqlens", cu_seqlens, dims=(1,), dtypes=(torch.int64,), device=device)
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens: expected shape [B+1] with B >= 0, got an empty tensor")
        first, last, decreasing = torch.stack(
            [cu_seqlens[0], cu_seqlens[-1], (cu_seqlens[1:] < cu_seqlens[:-1]).any().long()]
        ).tolist()
        if first != 0 or last != input_ids.numel() or decreasing:
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to N={input_ids.numel()}, "
                f"got {first}..{last}{' with a decreasing pair' if decreasing else ''}"
            )
    else:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected padded shape [B, T] (or [N] with cu_seqlens), got {input_ids.shape}")
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, dims=(2,), device=device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
                )
    return step_ids


def step_positions(
    input_ids: torch.Tensor,
    *,
    step_token_ids: Iterable[int],
    think_start_id: int,
    think_end_id: int,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to score by docs/method.md §3, as (step_index [S] int64, offsets [B+1] int64).

    `input_ids` is padded [B, T] (optional `attention_mask`, left or right padding; padding never scores) or
    packed [N] with `cu_seqlens` [B+1]. `step_index` holds flat row indices in the flattening of the hidden
    states (b*T + t padded, the packed row for varlen); candidate b owns step_index[offsets[b]:offsets[b+1]].
    Sizing the output reads S on the host (one synchronisation).
    """
    step_ids = _check_step_position_args(
        input_ids, step_token_ids, think_start_id, think_end_id, attention_mask, cu_seqlens
    )
    input_ids = input_ids.long()
    args = (input_ids, step_ids, think_start_id, think_end_id, attention_mask, cu_seqlens)
    if resolve_backend(input_ids.device, backend) == "triton":
        from .kernels.step_positions import launch_step_positions

        return launch_step_positions(*args)
    return torch_ops.step_positions_torch(*args)


def sprm_score(
    hidden: torch.Tensor,
    step_index: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    group_size: int | None = None,
    return_step_scores: bool = False,
    backend: str | None = None,
    validate: bool = True,
) -> SPRMScores:
    """SPRM scores of B candidates from the hidden states at their step rows (docs/method.md §4, §7).

    hidden [N, H] or [B, T, H] (any row strides, unit last stride; bf16, fp16 or fp32); step_index [S] int64
    flat rows; offsets [B+1] int64 CSR; W1 [F, H] in hidden's dtype, b1 [F], W2 [1, F], b2 [1] (F = 2H).
    On CUDA this is one fused Triton launch (gather, both layers in fp32, log-sigmoid, means, group argmax).
    Validation reads a few values on the host (one synchronisation) so that bad indices fail before launch.

    validate=False is the fast path for callers whose step_index and offsets are known to be valid (e.g. straight
    from `step_positions`): shapes, dtypes and devices are still checked, but not the values, so there is no
    host synchronisation. The results are the same bits; with an index out of range or non-CSR offsets they are
    undefined (the kernel reads wherever the index points).
    """
    if not isinstance(validate, bool):
        raise ValueError(f"validate: expected True or False, got {validate!r}")
    num_rows = check_hidden(hidden)
    device = hidden.device
    check_head(hidden.shape[-1], hidden.dtype, device, w1, b1, w2, b2)
    check_csr(step_index, offsets, num_rows, device, values=validate)
    check_group_size(group_size, offsets.numel() - 1)
    w2, b2 = w2.reshape(-1), b2.reshape(-1)
    if resolve_backend(device, backend) == "triton":
        from .kernels.sprm_score import launch_sprm_score

        results = launch_sprm_score(
            hidden, step_index, offsets, w1, b1.contiguous(), w2.contiguous(), b2.contiguous(),
            group_size=group_size, return_step_scores=return_step_scores,
        )  # fmt: skip
    else:
        results = torch_ops.sprm_score_torch(
            hidden, step_index, offsets, w1, b1, w2, b2, group_size, return_step_scores
        )
    return SPRMScores(*results)
