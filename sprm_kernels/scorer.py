"""Decode-time scoring: running per-candidate (sum log p, count), updated in place once per decode step."""

from __future__ import annotations

import torch

from . import torch_ops
from .dispatch import resolve_backend
from .reference import SPRMScores, group_argmax
from .validation import check_group_size, check_head, check_tensor


class StepScorer:
    """Scores one new token per candidate per call, with fixed shapes and no host synchronisation.

    >>> scorer = StepScorer(w1, b1, w2, b2, batch_size=k, group_size=k)
    >>> for each decode step: scorer.update(hidden_before_new_token, new_token_is_step)
    >>> scorer.result()  # SPRMScores with score, log_score, num_steps, best (step_scores is None)

    `update(hidden [B, H], is_step [B] bool, want_prob=None)` adds log p of the flagged rows to the running sums;
    it returns this call's step probability of every row ([B] fp32, a buffer reused by the next call). On CUDA it
    is one Triton launch that can be captured in a CUDA graph (the buffers never move).

    Idle steps: pass `want_prob` ([B] bool, the rows whose probability you will read; all False if none) and a call
    where no row is flagged or wanted skips the head on the device (no W1 traffic, no host synchronisation): the
    running sums stay as they are and every entry of the returned step probabilities is NaN. With
    `want_prob=None` every row's probability is wanted, so the head runs on every call.
    """

    def __init__(self, w1, b1, w2, b2, batch_size: int, *, group_size: int | None = None, backend=None):
        check_tensor("w1", w1, dims=(2,))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        check_group_size(group_size, batch_size)
        self.hidden_size = w1.shape[1]
        self.dtype = w1.dtype
        self.device = w1.device
        check_head(self.hidden_size, self.dtype, self.device, w1, b1, w2, b2)
        self.batch_size = batch_size
        self.group_size = group_size
        self.backend = resolve_backend(self.device, backend)
        self.w1, self.b1 = w1, b1.contiguous()
        self.w2, self.b2 = w2.reshape(-1).contiguous(), b2.reshape(-1).contiguous()
        if self.backend == "torch":  # convert once, not on every decode step (W1 is 2H^2 elements)
            self.w1, self.b1, self.w2, self.b2 = (t.float() for t in (self.w1, self.b1, self.w2, self.b2))
        self.sum_log = torch.zeros(batch_size, dtype=torch.float32, device=self.device)
        self.count = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.step_prob = torch.zeros(batch_size, dtype=torch.float32, device=self.device)
        if self.backend == "triton":
            from .kernels.sprm_score import device_gpu_info, pick_score_config

            gpu = device_gpu_info(self.device)
            self.config = pick_score_config(batch_size, self.hidden_size, w1.shape[0], self.dtype, gpu)
            self.partial = torch.empty(self.config.num_splits * batch_size, dtype=torch.float32, device=self.device)
            row_blocks = -(-batch_size // self.config.block_s)
            self.ticket = torch.zeros(row_blocks, dtype=torch.int32, device=self.device)  # one per row block

    def reset(self) -> None:
        self.sum_log.zero_()
        self.count.zero_()

    def update(self, hidden: torch.Tensor, is_step: torch.Tensor, want_prob: torch.Tensor | None = None):
        check_tensor("hidden", hidden, dims=(2,), dtypes=(self.dtype,), device=self.device)
        if hidden.shape != (self.batch_size, self.hidden_size) or (hidden.stride(-1) != 1 and self.hidden_size > 1):
            raise ValueError(
                f"hidden: expected shape [{self.batch_size}, {self.hidden_size}] with unit last stride, "
                f"got shape {tuple(hidden.shape)} strides {hidden.stride()}"
            )
        check_tensor("is_step", is_step, dims=(1,), dtypes=(torch.bool,), device=self.device)
        if is_step.shape[0] != self.batch_size:
            raise ValueError(f"is_step: expected shape [{self.batch_size}], got {tuple(is_step.shape)}")
        if want_prob is not None:
            check_tensor("want_prob", want_prob, dims=(1,), dtypes=(torch.bool,), device=self.device)
            if want_prob.shape[0] != self.batch_size:
                raise ValueError(f"want_prob: expected shape [{self.batch_size}], got {tuple(want_prob.shape)}")
        if self.backend == "triton":
            from .kernels.step_scorer import launch_step_scorer

            launch_step_scorer(
                hidden, is_step, want_prob, self.w1, self.b1, self.w2, self.b2, self.partial, self.ticket,
                self.sum_log, self.count, self.step_prob, self.config,
            )  # fmt: skip
        else:
            torch_ops.step_scorer_update_torch(
                hidden, is_step, self.w1, self.b1, self.w2, self.b2, self.sum_log, self.count, self.step_prob, want_prob
            )
        return self.step_prob

    def result(self) -> SPRMScores:
        """Current scores (new tensors; the running state is untouched). No host synchronisation."""
        has_steps = self.count > 0
        log_score = torch.where(has_steps, self.sum_log / self.count.clamp(min=1), float("-inf"))
        score = torch.where(has_steps, torch.exp(log_score), 0.0)
        best = None if self.group_size is None else group_argmax(score, self.group_size)
        return SPRMScores(score, log_score, self.count.clone(), None, best)
