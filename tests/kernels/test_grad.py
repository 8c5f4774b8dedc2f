"""sprm_step_logits: forward and gradients of every route against float64 autograd on the eager reference.

Tolerances. The truth is `sprm_step_logits_reference` under autograd in float64 on the same (already rounded)
inputs; errors are measured relative to the largest magnitude of the truth (max |a - b| / max |b|).
- gradcheck (float64, torch route, feature_grad_scale=1 so that the backward is the true derivative) checks the
  closed-form backward against finite differences.
- fp32: the forward accumulates in fp32 (IEEE products on the triton route), the backward runs fp32 GEMMs;
  with H <= 67, F <= 134 and O(1) terms the summation bound n * eps32 is <= 8e-6 relative; we assert 2e-5.
- bf16 / fp16: the forward still accumulates in fp32 (same 2e-5 bound); the backward's GEMMs run in the input
  dtype, as autograd through the eager head in that dtype does (the public training code's autocast). Flash-
  attention's rule: the route's gradient error is at most 2x that of eager autograd in the input dtype, plus a
  floor of a few units of the dtype's rounding (2^-8 bf16, 2^-11 fp16) for the cases where eager is lucky.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import CUDA_MARKS, INTERPRETING, random_csr, random_head

from sprm_kernels import sprm_score
from sprm_kernels.grad import sprm_step_logits, sprm_step_logits_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_LEVEL = 2e-5
FLOOR = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11, torch.float32: FP32_LEVEL}
NAMES = ("hidden", "w1", "b1", "w2", "b2")


def rel_error(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (actual - expected).abs().max().item() / max(scale, 1e-30) if expected.numel() else 0.0


def leaves(tensors, device="cpu", dtype=None, hidden_grad=True):
    out = []
    for i, t in enumerate(tensors):
        t = t.detach().to(device=device, dtype=dtype or t.dtype)
        out.append(t.requires_grad_(hidden_grad or i > 0))
    return out


def run(fn, tensors, step_index, weight, **kwargs):
    """Logits and the gradients of sum(weight * logits) for (hidden, w1, b1, w2, b2)."""
    logits = fn(tensors[0], step_index, *tensors[1:], **kwargs)
    (logits * weight.to(logits)).sum().backward()
    return logits, [t.grad for t in tensors]


def padded_case(dtype, seed=0, batch=4, length=13, hidden_size=40, strided=True):
    gen = torch.Generator().manual_seed(seed)
    storage = torch.randn(batch, length + 2, hidden_size + 3, generator=gen).to(dtype)
    hidden = storage[:, 1 : 1 + length, :hidden_size] if strided else storage[:, :length, :hidden_size].contiguous()
    step_index, _ = random_csr(batch * length, [3, 0, 7, 5], seed=seed)
    step_index = torch.cat([step_index, step_index[:4]])  # repeated rows: their gradients must add up
    return hidden, step_index, random_head(hidden_size, dtype, seed=seed)


def packed_case(dtype, seed=1, num_rows=50, hidden_size=67):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen).to(dtype)
    step_index = torch.randint(0, num_rows, (37,), generator=gen)  # random, with repeats
    return hidden, step_index, random_head(hidden_size, dtype, seed=seed)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck_float64(layout):
    """Finite differences on the torch route: all five inputs, strided [B, T, H], repeated step rows."""
    gen = torch.Generator().manual_seed(7)
    if layout == "padded":
        hidden = torch.randn(3, 6, 7, dtype=torch.float64, generator=gen)[:, 1:, :5]
        step_index = torch.tensor([0, 4, 4, 9, 14, 2, 9])
    else:
        hidden = torch.randn(8, 5, dtype=torch.float64, generator=gen)
        step_index = torch.tensor([7, 0, 3, 3, 5, 0])
    head = random_head(5, torch.float64, width=9, seed=8)
    inputs = leaves([hidden, *head])

    def fn(h, w1, b1, w2, b2):
        return sprm_step_logits(h, step_index, w1, b1, w2, b2, feature_grad_scale=1.0, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [padded_case, packed_case])
def test_routes_against_float64_autograd(route, dtype, case):
    device, backend = route
    hidden, step_index, head = case(dtype)
    weight = torch.randn(step_index.numel(), generator=torch.Generator().manual_seed(3))
    scale = 0.25  # not 1e-4: a visible hidden gradient, so its error is measured at a useful magnitude
    truth, truth_grads = run(
        sprm_step_logits_reference, leaves([hidden, *head], dtype=torch.float64), step_index, weight,
        feature_grad_scale=scale,
    )  # fmt: skip
    eager, eager_grads = run(sprm_step_logits_reference, leaves([hidden, *head]), step_index, weight,
                             feature_grad_scale=scale)  # fmt: skip
    tensors = leaves([hidden, *head], device=device)
    logits, grads = run(sprm_step_logits, tensors, step_index.to(device), weight, feature_grad_scale=scale,
                        backend=backend)  # fmt: skip
    assert logits.dtype == torch.float32 and logits.shape == step_index.shape
    assert rel_error(logits, truth) <= FP32_LEVEL
    for name, grad, eager_grad, truth_grad, leaf in zip(NAMES, grads, eager_grads, truth_grads, tensors, strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        err, err_eager = rel_error(grad, truth_grad), rel_error(eager_grad, truth_grad)
        if dtype == torch.float32:
            assert err <= FP32_LEVEL, f"{name}: {err:.3g}"
        else:
            assert err <= 2 * err_eager + FLOOR[dtype], f"{name}: {err:.3g} vs eager-in-dtype {err_eager:.3g}"


@pytest.mark.parametrize("scale", [1e-4, 0.0, 3.0])
def test_feature_grad_scale_and_repeated_rows(route, scale):
    """hidden.grad is scale * the true gradient, scattered to the gathered rows; repeated rows accumulate."""
    device, backend = route
    hidden, _, head = packed_case(torch.float32, num_rows=6)
    step_index = torch.tensor([2, 2, 2, 5, 0, 2])
    weight = torch.tensor([1.0, -2.0, 0.5, 1.0, 3.0, 1.5])
    _, full = run(sprm_step_logits, leaves([hidden, *head], device=device), step_index.to(device), weight,
                  feature_grad_scale=1.0, backend=backend)  # fmt: skip
    _, scaled = run(sprm_step_logits, leaves([hidden, *head], device=device), step_index.to(device), weight,
                    feature_grad_scale=scale, backend=backend)  # fmt: skip
    if scale == 0.0:
        assert scaled[0] is None  # no gradient reaches the backbone
    else:
        torch.testing.assert_close(scaled[0], full[0] * scale, rtol=1e-6, atol=0)
    for name, a, b in zip(NAMES[1:], scaled[1:], full[1:], strict=True):
        assert torch.equal(a, b), f"{name}: the head's gradients do not depend on the feature scale"
    # Row 2 is gathered four times: its gradient is the sum of four single-row contributions.
    singles = []
    for pos in (0, 1, 2, 5):
        _, g = run(sprm_step_logits, leaves([hidden, *head], device=device), step_index[pos : pos + 1].to(device),
                   weight[pos : pos + 1], feature_grad_scale=1.0, backend=backend)  # fmt: skip
        singles.append(g[0][2])
    torch.testing.assert_close(full[0][2], sum(singles), rtol=1e-5, atol=1e-6)
    for row in (1, 3, 4):
        assert not full[0][row].any(), "rows never gathered get no gradient"


def test_matches_the_public_feature_blend():
    """The reference blend features * s + features.detach() * (1 - s) gives hidden exactly our scaled gradient."""
    hidden, step_index, head = packed_case(torch.float64)
    weight = torch.randn(step_index.numel(), dtype=torch.float64)
    _, ours = run(sprm_step_logits, leaves([hidden, *head]), step_index, weight, backend="torch")
    _, blend = run(sprm_step_logits_reference, leaves([hidden, *head]), step_index, weight)
    for name, a, b in zip(NAMES, ours, blend, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15, msg=name)


def test_frozen_inputs_get_no_gradient(route):
    """Only what requires grad is computed: frozen features (head-only training) and a frozen first layer."""
    device, backend = route
    hidden, step_index, head = packed_case(torch.float32)
    hidden, w1, b1, w2, b2 = [t.to(device) for t in (hidden, *head)]
    w2.requires_grad_(True)
    b1.requires_grad_(True)
    sprm_step_logits(hidden, step_index.to(device), w1, b1, w2, b2, backend=backend).sum().backward()
    assert hidden.grad is None and w1.grad is None and b2.grad is None
    assert w2.grad is not None and b1.grad is not None


def test_zero_steps(route):
    device, backend = route
    hidden, _, head = packed_case(torch.float32)
    tensors = leaves([hidden, *head], device=device)
    logits, grads = run(sprm_step_logits, tensors, torch.empty(0, dtype=torch.int64, device=device),
                        torch.empty(0), backend=backend)  # fmt: skip
    assert logits.shape == (0,)
    for name, grad, leaf in zip(NAMES, grads, tensors, strict=True):
        assert grad.shape == leaf.shape and not grad.any(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_sprm_score(route, dtype):
    """sigmoid(logits) is sprm_score's step probability (same head, same fp32 accumulation)."""
    device, backend = route
    hidden, _, head = padded_case(dtype)
    step_index, offsets = random_csr(hidden.shape[0] * hidden.shape[1], [4, 6, 0, 5], seed=3)
    hidden, head, step_index, offsets = hidden.to(device), [t.to(device) for t in head], step_index.to(device), \
        offsets.to(device)  # fmt: skip
    logits = sprm_step_logits(hidden, step_index, *head, backend=backend)
    scores = sprm_score(hidden, step_index, offsets, *head, return_step_scores=True, backend=backend)
    torch.testing.assert_close(torch.sigmoid(logits), scores.step_scores, rtol=1e-5, atol=1e-6)


# The Triton kernel compiled on CUDA (marked `cuda`), or interpreted on CPU.
KERNEL_DEVICES = [
    pytest.param("cuda", id="cuda", marks=CUDA_MARKS),
    pytest.param("cpu", id="interpreter", marks=pytest.mark.skipif(not INTERPRETING, reason="needs the interpreter")),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_kernel_splits_are_deterministic(poisoned_allocations, splits, device):
    """Each column split count (direct store, and the per-row-block ticket reduction) writes every logit, gives
    the same bits on every run, and agrees with the other split counts to fp32 rounding."""
    from sprm_kernels.kernels.sprm_score import ScoreConfig
    from sprm_kernels.kernels.step_logits import launch_step_logits

    hidden, step_index, head = padded_case(torch.float32, hidden_size=40)
    hidden, step_index = hidden.to(device), step_index.to(device)
    w1, b1, w2, b2 = head[0].to(device), head[1].to(device), head[2].to(device).reshape(-1), head[3].to(device)
    width = w1.shape[0]
    cfg = ScoreConfig(block_s=16, block_n=16, block_k=16, num_splits=splits, granule=8, group_splits=2,
                      num_warps=4, num_stages=1, split_tile=2)  # fmt: skip
    assert width // 8 >= splits
    first = launch_step_logits(hidden, step_index, w1, b1, w2, b2, config=cfg)
    again = launch_step_logits(hidden, step_index, w1, b1, w2, b2, config=cfg)
    assert not first.isnan().any()
    assert torch.equal(first, again)
    expected = sprm_step_logits_reference(hidden.double(), step_index, *[t.double().to(device) for t in head])
    assert rel_error(first, expected) <= FP32_LEVEL


def test_training_steps_match_across_routes(route):
    """A few Adam steps of SPR training give the same head on this route as on the torch route."""
    from sprm_kernels.loss import spr_loss

    device, backend = route
    hidden, _, head = packed_case(torch.float32, num_rows=40, hidden_size=24)
    step_index, offsets = random_csr(40, [5, 3, 0, 6, 4, 2], seed=9)
    correct = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    results = []
    for b in ("torch", backend):
        params = leaves(head, device=device if b == backend else "cpu")
        h = hidden.to(params[0].device).requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(4):
            logits = sprm_step_logits(h, step_index.to(h.device), *params, backend=b)
            loss = spr_loss(logits, offsets.to(h.device), correct.to(h.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append([p.detach().cpu() for p in params] + [h.grad.cpu()])
    for name, a, b in zip(NAMES[1:] + ("hidden.grad",), *results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def masked_reference(hidden, step_index, w1, b1, w2, b2, keep, dropout, feature_grad_scale):
    """The eager head with an explicit dropout mask, under autograd (nn.Dropout's scaling 1 / (1 - p))."""
    features = hidden * feature_grad_scale + hidden.detach() * (1 - feature_grad_scale)
    act = torch.relu(torch.nn.functional.linear(features[step_index], w1, b1)) * keep / (1 - dropout)
    return torch.nn.functional.linear(act, w2.reshape(1, -1), b2.reshape(1)).squeeze(-1)


def test_dropout_gradcheck_float64():
    """The same generator seed on every evaluation gives the same mask: finite differences see a fixed network."""
    hidden = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    head = random_head(5, torch.float64, width=12, seed=2)
    step_index = torch.tensor([7, 0, 3, 3, 5, 0])

    def fn(h, w1, b1, w2, b2):
        return sprm_step_logits(h, step_index, w1, b1, w2, b2, feature_grad_scale=1.0, dropout=0.5,
                                generator=torch.Generator().manual_seed(3), backend="torch")  # fmt: skip

    assert torch.autograd.gradcheck(fn, tuple(leaves([hidden, *head])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_an_explicit_mask(route, dtype):
    """Forward and gradients equal the eager head with the mask drawn from the same generator state, although
    the generator (and the global one) moves on between forward and backward: the backward replays the mask."""
    device, backend = route
    hidden, step_index, head = packed_case(dtype)
    dropout, scale = 0.3, 0.5
    keep = torch.rand((step_index.numel(), head[0].shape[0]), generator=torch.Generator().manual_seed(11)) >= dropout
    weight = torch.randn(step_index.numel(), generator=torch.Generator().manual_seed(3))
    truth, truth_grads = run(masked_reference, leaves([hidden, *head], dtype=torch.float64), step_index, weight,
                             keep=keep, dropout=dropout, feature_grad_scale=scale)  # fmt: skip
    eager, eager_grads = run(masked_reference, leaves([hidden, *head]), step_index, weight, keep=keep,
                             dropout=dropout, feature_grad_scale=scale)  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(11)
    tensors = leaves([hidden, *head], device=device)
    logits = sprm_step_logits(tensors[0], step_index.to(device), *tensors[1:], feature_grad_scale=scale,
                              dropout=dropout, generator=generator, backend=backend)  # fmt: skip
    torch.rand(1000, generator=generator, device=device), torch.rand(1000)  # both generators move on
    (logits * weight.to(logits)).sum().backward()
    assert rel_error(logits, truth) <= FP32_LEVEL
    for name, leaf, eager_grad, truth_grad in zip(NAMES, tensors, eager_grads, truth_grads, strict=True):
        err, err_eager = rel_error(leaf.grad, truth_grad), rel_error(eager_grad, truth_grad)
        assert err <= (FP32_LEVEL if dtype == torch.float32 else 2 * err_eager + FLOOR[dtype]), f"{name}: {err:.3g}"


def test_dropout_draws_a_fresh_mask_each_call():
    hidden, step_index, head = packed_case(torch.float32)
    torch.manual_seed(0)
    first = sprm_step_logits(hidden, step_index, *head, dropout=0.5, backend="torch")
    second = sprm_step_logits(hidden, step_index, *head, dropout=0.5, backend="torch")
    torch.manual_seed(0)
    replay = sprm_step_logits(hidden, step_index, *head, dropout=0.5, backend="torch")
    assert not torch.equal(first, second) and torch.equal(first, replay)
    no_dropout = sprm_step_logits(hidden, step_index, *head, backend="torch")
    assert not torch.equal(first, no_dropout)


def test_float64_routes():
    hidden, step_index, head = packed_case(torch.float64)
    logits = sprm_step_logits(hidden, step_index, *head)  # auto: float64 always takes the torch route
    assert logits.dtype == torch.float64
    with pytest.raises(ValueError, match="^hidden:"):
        sprm_step_logits(hidden, step_index, *head, backend="triton")


def _bad_inputs():
    hidden, step_index, head = packed_case(torch.float32, num_rows=10, hidden_size=8)
    w1, b1, w2, b2 = head
    ok = dict(hidden=hidden, step_index=step_index.clamp(max=9), w1=w1, b1=b1, w2=w2, b2=b2)
    yield "hidden", dict(ok, hidden=hidden.int())
    yield "hidden", dict(ok, hidden=hidden[:, :1].expand(10, 8))  # zero last stride
    yield "hidden", dict(ok, hidden=hidden[0])
    yield "w1", dict(ok, w1=w1[:, :4])
    yield "w1", dict(ok, w1=w1.half())
    yield "b1", dict(ok, b1=b1[:3])
    yield "w2", dict(ok, w2=w2.reshape(2, -1))
    yield "b2", dict(ok, b2=torch.zeros(2))
    yield "step_index", dict(ok, step_index=step_index.int())
    yield "step_index", dict(ok, step_index=torch.tensor([0, 10]))
    yield "step_index", dict(ok, step_index=torch.tensor([-1]))
    yield "step_index", dict(ok, step_index=step_index.reshape(1, -1))
    yield "feature_grad_scale", dict(ok, feature_grad_scale=-1.0)
    yield "feature_grad_scale", dict(ok, feature_grad_scale=float("nan"))
    yield "feature_grad_scale", dict(ok, feature_grad_scale=True)
    yield "backend", dict(ok, backend="cuda")
    yield "dropout", dict(ok, dropout=1.0)
    yield "dropout", dict(ok, dropout=-0.1)
    yield "dropout", dict(ok, dropout=True)
    yield "generator", dict(ok, dropout=0.5, generator=0)
    if torch.cuda.is_available():
        yield "generator", dict(ok, dropout=0.5, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("name,kwargs", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_before_launch(monkeypatch, name, kwargs):
    import sprm_kernels.kernels.step_logits as kernel_module

    def no_launch(*args, **kw):
        raise AssertionError("launched before validation")

    monkeypatch.setattr(kernel_module, "launch_step_logits", no_launch)
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("hidden", "step_index", "w1", "b1", "w2", "b2")]
    with pytest.raises(ValueError, match=f"^{name}:"):
        sprm_step_logits(*args, **kwargs)


def test_torch_route_without_triton():
    """The CPU path imports nothing from triton: forward and backward run with triton unimportable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sprm_kernels.grad import sprm_step_logits\n"
        "from sprm_kernels.loss import spr_loss\n"
        "h = torch.randn(9, 4, requires_grad=True); w1 = torch.randn(8, 4, requires_grad=True)\n"
        "b1, w2, b2 = torch.zeros(8), torch.randn(1, 8, requires_grad=True), torch.zeros(1)\n"
        "logits = sprm_step_logits(h, torch.tensor([1, 2, 8]), w1, b1, w2, b2)\n"
        "spr_loss(logits, torch.tensor([0, 2, 3]), torch.tensor([True, False]), mode='bce').backward()\n"
        "assert h.grad is not None and w1.grad is not None and 'triton' not in str(sys.modules.get('triton'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
