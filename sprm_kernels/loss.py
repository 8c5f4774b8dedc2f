"""SPR loss: loss = sum_i w_i c_i BCE(s_i, y_i) / (sum_i w_i c_i + 1e-5), w_i = [s_i > 0 iff y_i = 1] (docs/method.md
§6).

Shapes: step_logits (S,) in CSR order, offsets (B+1,) int64, correct (B,), valid (B,) or None. Step i of candidate
b has label y_i = correct[b]. The agreement filter w_i keeps the steps whose current verdict (sigmoid(s_i) > 0.5,
i.e. s_i > 0) agrees with the final outcome ("spr"), or every step ("bce", the ablation baseline); steps of
invalid candidates are left out. Class balancing (the public training code) weights kept steps of correct
candidates positive_factor * N / (P + N) and the others P / (P + N), with P and N the kept steps of each class
plus one. The weights are constants: they are not differentiated.

This is an O(S) elementwise pass and two sums; it is written in PyTorch, not Triton (see `spr_loss`). The
forward also computes dloss/ds (it needs the same terms), so the backward is one multiplication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .validation import check_tensor

MODES = ("spr", "bce")
LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + LOGIT_DTYPES
DENOMINATOR_EPS = 1e-5  # the public training code adds it to the sum of the weights


@dataclass
class SPRLossDetails:
    """What the loss weighed (S steps). Tensors are detached; counts are int64 scalars (no host sync).

    weights:     [S] weight of each step in numerator and denominator: [kept] * (pos_weight or neg_weight).
    kept:        [S] bool, the step teaches: it belongs to a valid candidate and (mode "spr") agrees with it.
    num_pos:     kept steps of correct candidates (P - 1 in docs/method.md §6).
    num_neg:     kept steps of wrong candidates (N - 1).
    pos_weight:  weight of a kept step of a correct candidate: positive_factor * N / (P + N), or 1 unbalanced.
    neg_weight:  weight of a kept step of a wrong candidate: P / (P + N), or 1 unbalanced.
    denominator: sum(weights) + 1e-5.
    """

    weights: torch.Tensor
    kept: torch.Tensor
    num_pos: torch.Tensor
    num_neg: torch.Tensor
    pos_weight: torch.Tensor
    neg_weight: torch.Tensor
    denominator: torch.Tensor


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_label(name: str, value, num_candidates: int, device) -> None:
    check_tensor(name, value, dims=(1,), dtypes=LABEL_DTYPES, device=device)
    if value.numel() != num_candidates:
        _fail(name, f"shape [B] = [{num_candidates}] (one per candidate of `offsets`)", f"shape {tuple(value.shape)}")


def _not_binary(value) -> torch.Tensor:
    if value is None or value.dtype == torch.bool or value.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=value.device if value is not None else "cpu")
    return ((value != 0) & (value != 1)).any().long()


def _check_loss_args(step_logits, offsets, correct, valid, mode, balance, positive_factor, return_details) -> None:
    """Types, shapes and devices, then the values (one host synchronisation): CSR offsets and 0/1 labels."""
    check_tensor("step_logits", step_logits, dims=(1,), dtypes=LOGIT_DTYPES)
    device = step_logits.device
    check_tensor("offsets", offsets, dims=(1,), dtypes=(torch.int64,), device=device)
    if offsets.numel() < 1:
        _fail("offsets", "shape [B+1] with B >= 0", f"shape {tuple(offsets.shape)}")
    num_candidates = offsets.numel() - 1
    _check_label("correct", correct, num_candidates, device)
    if valid is not None:
        _check_label("valid", valid, num_candidates, device)
    if mode not in MODES:
        _fail("mode", f"one of {MODES}", repr(mode))
    if not isinstance(balance, bool):
        _fail("balance", "a bool", repr(balance))
    if not isinstance(return_details, bool):
        _fail("return_details", "a bool", repr(return_details))
    if isinstance(positive_factor, bool) or not isinstance(positive_factor, (int, float)):
        _fail("positive_factor", "a finite real number >= 0", repr(positive_factor))
    if not (math.isfinite(positive_factor) and positive_factor >= 0):
        _fail("positive_factor", "a finite real number >= 0", repr(positive_factor))
    zero = torch.zeros((), dtype=torch.int64, device=device)
    first, last, decreasing, bad_correct, bad_valid = torch.stack(
        [
            offsets[0],
            offsets[-1],
            (offsets[1:] < offsets[:-1]).any().long() if num_candidates else zero,
            _not_binary(correct).to(device),
            _not_binary(valid).to(device),
        ]
    ).tolist()
    num_steps = step_logits.numel()
    if first != 0 or last != num_steps:
        _fail("offsets", f"offsets[0] == 0 and offsets[-1] == len(step_logits) == {num_steps}", f"{first}..{last}")
    if decreasing:
        _fail("offsets", "non-decreasing values (CSR offsets)", "a decreasing pair")
    if bad_correct:
        _fail("correct", "bool or 0/1 values", "other values")
    if bad_valid:
        _fail("valid", "bool or 0/1 values", "other values")


def _per_step(values: torch.Tensor, offsets: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Candidate values [B] -> step values [S] by the CSR offsets (no host synchronisation)."""
    return values.repeat_interleave(offsets[1:] - offsets[:-1], output_size=num_steps)


def _loss_and_grad(logits, offsets, correct, valid, mode, balance, positive_factor):
    """(loss, dloss/dlogits, details) in fp32 (fp64 for fp64 logits); no autograd."""
    num_steps = logits.numel()
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    y = _per_step(correct != 0, offsets, num_steps)
    kept = torch.where(y, x > 0, x < 0) if mode == "spr" else torch.ones_like(y)
    in_valid = None if valid is None else _per_step(valid != 0, offsets, num_steps)
    if in_valid is not None:
        kept &= in_valid
    num_pos = (kept & y).sum()
    num_neg = kept.sum() - num_pos
    if balance:
        pos_count, neg_count = num_pos.to(x.dtype) + 1, num_neg.to(x.dtype) + 1
        pos_weight = positive_factor * neg_count / (pos_count + neg_count)
        neg_weight = pos_count / (pos_count + neg_count)
    else:
        pos_weight = neg_weight = torch.ones((), dtype=x.dtype, device=x.device)
    weights = torch.where(kept, torch.where(y, pos_weight, neg_weight), 0.0)
    denominator = weights.sum() + DENOMINATOR_EPS
    # BCE(s, y) = softplus(-s) for y = 1, softplus(s) for y = 0; relu(z) + log1p(exp(-|z|)) is exact and stable.
    z = torch.where(y, -x, x)
    bce = F.relu(z) + torch.log1p(torch.exp(-z.abs()))
    terms = torch.where(kept, weights * bce, 0.0)
    grad = torch.where(kept, weights * (torch.sigmoid(x) - y.to(x.dtype)), 0.0) / denominator
    # A NaN logit in a valid candidate makes the loss (and its own gradient) NaN, whatever the filter says;
    # candidates marked invalid are left out entirely.
    poisoned = torch.isnan(x) if in_valid is None else torch.isnan(x) & in_valid
    terms = torch.where(poisoned, x, terms)
    grad = torch.where(poisoned, x, grad)
    loss = terms.sum() / denominator
    details = SPRLossDetails(weights, kept, num_pos, num_neg, pos_weight, neg_weight, denominator)
    return loss, grad, details


class _SPRLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step_logits, offsets, correct, valid, mode, balance, positive_factor):
        loss, grad, details = _loss_and_grad(step_logits, offsets, correct, valid, mode, balance, positive_factor)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = step_logits.dtype
        ctx.mark_non_differentiable(details.weights, details.pos_weight, details.neg_weight, details.denominator)
        d = details
        return loss, d.weights, d.kept, d.num_pos, d.num_neg, d.pos_weight, d.neg_weight, d.denominator

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.logits_dtype), None, None, None, None, None, None


def spr_loss(
    step_logits: torch.Tensor,
    offsets: torch.Tensor,
    correct: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    mode: str = "spr",
    balance: bool = True,
    positive_factor: float = 1.5,
    return_details: bool = False,
):
    """The SPR loss of docs/method.md §6 over S step logits of B candidates: a scalar (fp32; fp64 for fp64 logits).

    step_logits [S] (any float dtype; e.g. from `sprm_step_logits`), offsets [B+1] int64 CSR, correct [B] (bool or
    0/1: the final answer is right), valid [B] (bool or 0/1; None: all valid; invalid candidates are left out).
    mode "spr" keeps the steps whose verdict agrees with the outcome (s > 0 for correct, s < 0 for wrong; s == 0
    agrees with neither); "bce" keeps every step. `balance` applies the public code's class balancing, weighting
    kept positives positive_factor * N / (P + N) and kept negatives P / (P + N). Loss = sum of weight * BCE over
    (sum of weights + 1e-5): 0 with a zero gradient when nothing is kept (all steps filtered out, no steps, or
    no valid candidate). A NaN logit in a valid candidate makes the loss NaN. With `return_details`, returns
    (loss, SPRLossDetails). Validation reads the offsets and labels on the host (one synchronisation).

    PyTorch, not Triton: it is O(S) work in about 60 small ops (forward and backward), 0.4 ms at S = 16384 on
    one CPU core and a few hundred microseconds of launches on a GPU, against O(S H^2) for the head's GEMMs and
    far more for the backbone: a fused kernel would save well under 0.1% of a training step.
    """
    _check_loss_args(step_logits, offsets, correct, valid, mode, balance, positive_factor, return_details)
    outputs = _SPRLoss.apply(step_logits, offsets, correct, valid, mode, balance, positive_factor)
    if not return_details:
        return outputs[0]
    return outputs[0], SPRLossDetails(*(t.detach() for t in outputs[1:]))


def spr_loss_reference(
    step_logits: torch.Tensor,
    offsets: torch.Tensor,
    correct: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    mode: str = "spr",
    balance: bool = True,
    positive_factor: float = 1.5,
    return_details: bool = False,
):
    """docs/method.md §6 as the public training code writes it, in eager PyTorch with autograd (float64-capable).

    get_filter_mask, BCEWithLogitsLoss(reduction="none"), pos/neg masks, counts + 1, weights, and
    (loss * weights).sum() / (weights.sum() + 1e-5); the steps of invalid candidates are dropped from the sum.
    """
    logits = step_logits.to(torch.promote_types(step_logits.dtype, torch.float32))
    counts = offsets[1:] - offsets[:-1]
    correct_mask = correct.bool().repeat_interleave(counts)
    valid_mask = torch.ones_like(correct_mask) if valid is None else valid.bool().repeat_interleave(counts)
    labels = correct_mask.to(logits.dtype)
    score_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if mode == "spr":
        filter_mask = torch.zeros_like(correct_mask)
        filter_mask[(logits > 0) & correct_mask] = True
        filter_mask[(logits < 0) & ~correct_mask] = True
    else:
        filter_mask = torch.ones_like(correct_mask)
    final_mask = valid_mask.to(logits.dtype) * filter_mask.to(logits.dtype)
    pos_mask = final_mask * labels
    neg_mask = final_mask * (1 - labels)
    if balance:
        pos_count = pos_mask.sum() + 1
        neg_count = neg_mask.sum() + 1
        total = pos_count + neg_count
        weights = positive_factor * pos_mask * (neg_count / total) + neg_mask * (pos_count / total)
    else:
        weights = final_mask
    weights = weights.detach()
    loss = (score_loss * weights)[valid_mask].sum() / (weights.sum() + DENOMINATOR_EPS)
    if not return_details:
        return loss
    return loss, weights
