"""Differentiable step logits for training the head: logit[s] = w2 . relu(W1 h[idx[s]] + b1) + b2, with backward.

`sprm_step_logits` is the training sibling of `sprm_score`: it returns the raw per-step logits (the input of the
SPR loss) and supports autograd for W1, b1, W2, b2 and, when `hidden.requires_grad`, the hidden states. As in
the public training code (`features * 1e-4 + features.detach() * (1 - 1e-4)`), only `feature_grad_scale` of the
hidden-state gradient reaches the backbone; it is scattered back to the gathered rows (duplicates accumulate).

Forward: one Triton launch on the triton route (kernels/step_logits.py: the [S, F] activations never reach
memory), fp32 PyTorch on the torch route and whenever dropout is on (the public code trains the head with its
Dropout(0.5) active). Backward recomputes the activations (and replays the dropout mask from the saved generator
state) instead of saving them: it holds one transient [S, F] buffer in the GEMM dtype while it runs, and nothing
of size [S, F] lives between forward and backward. Its three GEMMs (recompute, dW1, dX) run in PyTorch (cuBLAS
on GPUs) in hidden's dtype with fp32 accumulation; the [S]- and [F]-sized work runs in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dispatch import resolve_backend
from .reference import gather_rows
from .validation import FLOAT_DTYPES, check_head, check_hidden, check_step_index

# The torch route also takes float64 (for gradcheck and float64 references); the triton route does not.
GRAD_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_args(hidden, step_index, w1, b1, w2, b2, feature_grad_scale, dropout, generator) -> None:
    """hidden, the head (nn.Linear layout, float64 allowed), the step rows (one host synchronisation), the options."""
    num_rows = check_hidden(hidden, dtypes=GRAD_FLOAT_DTYPES)
    device = hidden.device
    check_head(hidden.shape[-1], hidden.dtype, device, w1, b1, w2, b2, vector_dtypes=GRAD_FLOAT_DTYPES)
    if isinstance(feature_grad_scale, bool) or not isinstance(feature_grad_scale, (int, float)):
        _fail("feature_grad_scale", "a real number in [0, inf)", repr(feature_grad_scale))
    if not (math.isfinite(feature_grad_scale) and feature_grad_scale >= 0):
        _fail("feature_grad_scale", "a real number in [0, inf)", repr(feature_grad_scale))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        _fail("dropout", "a probability in [0, 1)", repr(dropout))
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            _fail("generator", "a torch.Generator or None", type(generator).__name__)
        if generator.device.type != device.type:
            _fail("generator", f"a generator on {device.type} (the device of `hidden`)", generator.device)
    check_step_index(step_index, num_rows, device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs, fp64 for fp64: the dtype of the logits and of the small-vector work."""
    return torch.promote_types(dtype, torch.float32)


def _head_logits(rows, w1, b1, w2, b2, keep=None, dropout=0.0) -> torch.Tensor:
    """The torch route's forward: the head on the gathered rows in fp32 (fp64 for fp64 inputs), [S, H] -> [S];
    with a dropout mask `keep` [S, F], the kept activations are scaled by 1 / (1 - dropout) as nn.Dropout does."""
    dtype = _compute_dtype(rows.dtype)
    act = F.relu(F.linear(rows.to(dtype), w1.to(dtype), b1.to(dtype)))
    if keep is not None:
        act = act.mul_(keep).mul_(1 / (1 - dropout))
    return F.linear(act, w2.reshape(1, -1).to(dtype), b2.reshape(1).to(dtype)).squeeze(-1)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _dropout_keep(shape, dropout: float, device, generator: torch.Generator) -> torch.Tensor:
    """Bool [S, F] mask, True with probability 1 - dropout, drawn from (and advancing) `generator`."""
    return torch.rand(shape, generator=generator, device=device) >= dropout


def _replay_keep(shape, dropout: float, device, state: torch.Tensor) -> torch.Tensor:
    """The same mask again, from the generator state saved before it was drawn (nothing [S, F] is saved)."""
    generator = torch.Generator(device=device)
    generator.set_state(state)
    return _dropout_keep(shape, dropout, device, generator)


def _head_backward(hidden, step_index, w1, b1, w2, b2, grad_logits, needs, feature_grad_scale, keep, dropout):
    """Gradients of sum_s g[s] * logit[s] for (hidden, w1, b1, w2, b2), recomputing the [S, F] activations.

    One [S, F] buffer in hidden's dtype: it holds a = relu(X W1^T + b1) * keep (for dW2 = g^T a / (1 - p)), then,
    in place, the gradient of the pre-activation g[s] * w2[f] / (1 - p) * [a > 0] (for db1, dW1 = G^T X and
    dX = G W1). Without dropout, keep is all True and p = 0.
    """
    need_hidden, need_w1, need_b1, need_w2, need_b2 = needs
    gemm_dtype, small_dtype = w1.dtype, _compute_dtype(w1.dtype)
    g = grad_logits.to(small_dtype)
    grad_b2 = g.sum().reshape(b2.shape).to(b2.dtype) if need_b2 else None
    if not (need_hidden or need_w1 or need_b1 or need_w2):
        return None, None, None, None, grad_b2
    rows = gather_rows(hidden, step_index)  # [S, H]
    buffer = F.linear(rows, w1, b1.to(gemm_dtype)).relu_()  # [S, F] activations, recomputed
    if keep is not None:
        buffer.mul_(keep)
    inv_keep = 1 / (1 - dropout)
    grad_w2 = None
    if need_w2:
        grad_w2 = ((g.to(gemm_dtype) @ buffer).to(small_dtype) * inv_keep).reshape(w2.shape).to(w2.dtype)
    w2_row = (w2.reshape(1, -1).to(small_dtype) * inv_keep).to(gemm_dtype)
    grad_pre = buffer.gt_(0).mul_(w2_row).mul_(g.to(gemm_dtype)[:, None])
    grad_b1 = grad_pre.sum(0, dtype=small_dtype).to(b1.dtype) if need_b1 else None
    grad_w1 = (grad_pre.t() @ rows).to(w1.dtype) if need_w1 else None
    grad_hidden = None
    if need_hidden and feature_grad_scale != 0:
        grad_rows = (grad_pre @ w1).mul_(feature_grad_scale).to(hidden.dtype)  # [S, H]
        grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_hidden.view(-1, hidden.shape[-1]).index_add_(0, step_index, grad_rows)
    return grad_hidden, grad_w1, grad_b1, grad_w2, grad_b2


class _StepLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, step_index, w1, b1, w2, b2, feature_grad_scale, use_triton, dropout, generator):
        ctx.dropout, ctx.rng_state = float(dropout), None
        with torch.autocast(hidden.device.type, enabled=False):
            if dropout > 0:  # PyTorch: the backward must replay torch's mask, which a Triton RNG cannot draw
                generator = generator or _default_generator(hidden.device)
                ctx.rng_state = generator.get_state()
                keep = _dropout_keep((step_index.numel(), w1.shape[0]), dropout, hidden.device, generator)
                logits = _head_logits(gather_rows(hidden, step_index), w1, b1, w2, b2, keep, dropout)
                del keep
            elif use_triton:
                from .kernels.step_logits import launch_step_logits

                logits = launch_step_logits(
                    hidden, step_index, w1, b1.contiguous(), w2.reshape(-1).contiguous(), b2.reshape(-1).contiguous()
                )
            else:
                logits = _head_logits(gather_rows(hidden, step_index), w1, b1, w2, b2)
        # References, not copies: nothing of size [S, F] is kept for backward.
        ctx.save_for_backward(hidden, step_index, w1, b1, w2, b2)
        ctx.feature_grad_scale = float(feature_grad_scale)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits):
        hidden, step_index, w1, b1, w2, b2 = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5))
        keep = None
        if ctx.rng_state is not None:
            keep = _replay_keep((step_index.numel(), w1.shape[0]), ctx.dropout, hidden.device, ctx.rng_state)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = _head_backward(
                hidden, step_index, w1, b1, w2, b2, grad_logits, needs, ctx.feature_grad_scale, keep, ctx.dropout
            )
        grad_hidden, grad_w1, grad_b1, grad_w2, grad_b2 = grads
        return grad_hidden, None, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None


def sprm_step_logits(
    hidden: torch.Tensor,
    step_index: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    feature_grad_scale: float = 1e-4,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-step head logits [S] (fp32; fp64 for fp64 inputs) at the flat rows `step_index`, differentiable.

    hidden [N, H] or [B, T, H] (any row strides, unit last stride; bf16, fp16, fp32, or fp64 on the torch route);
    step_index [S] int64 flat rows (b*T + t for [B, T, H]; repeats allowed); W1 [F, H] in hidden's dtype, b1 [F],
    W2 [1, F] or [F], b2 [1] (F = 2H). Gradients flow to every head tensor that requires grad, and to `hidden`
    when it requires grad, multiplied by `feature_grad_scale` (the forward value is not scaled), scattered back
    to the gathered rows with index_add (repeated rows accumulate). Deterministic when the rows are distinct, as
    `step_positions` makes them; on CUDA, repeated rows add in an unspecified order unless
    `torch.use_deterministic_algorithms(True)`.
    dropout = p > 0 applies the head's Dropout(p) between ReLU and the second layer, as the public training code
    does (its head stays in train mode): a mask drawn from `generator` (default: the device's default generator),
    kept activations scaled by 1 / (1 - p). The backward replays the mask from the saved generator state instead
    of saving it. With dropout the head runs in PyTorch on either route. The default p = 0 is the eval-mode head.
    Validation reads the index range on the host (one synchronisation) so that bad indices fail before launch.
    """
    _check_args(hidden, step_index, w1, b1, w2, b2, feature_grad_scale, dropout, generator)
    if hidden.dtype == torch.float64 and backend == "triton":
        _fail("hidden", "bf16, fp16 or fp32 on the triton route (float64 runs on backend='torch')", hidden.dtype)
    use_triton = resolve_backend(hidden.device, backend) == "triton" and hidden.dtype != torch.float64
    return _StepLogits.apply(hidden, step_index, w1, b1, w2, b2, feature_grad_scale, use_triton, dropout, generator)


def sprm_step_logits_reference(
    hidden: torch.Tensor,
    step_index: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    feature_grad_scale: float = 1e-4,
) -> torch.Tensor:
    """Eager autograd reference: the public training code's feature blend, then the head in the inputs' dtype.

    features * s + features.detach() * (1 - s) passes s of the gradient to `hidden` (its value equals `hidden`
    up to rounding); the logits are cast to float as in `sprm_score_reference` (fp64 stays fp64).
    """
    features = hidden * feature_grad_scale + hidden.detach() * (1 - feature_grad_scale)
    rows = gather_rows(features, step_index)
    logits = F.linear(F.relu(F.linear(rows, w1, b1)), w2.reshape(1, -1), b2.reshape(1)).squeeze(-1)
    return logits.to(_compute_dtype(logits.dtype))
