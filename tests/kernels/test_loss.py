"""spr_loss: against the float64 eager reference (the public training code's formula), by hand on a tiny case,
at the edges (all correct, all wrong, no steps, invalid candidates, NaN, huge logits), its validation, and a
short training run on synthetic features in which the head must learn a real signal.

Tolerances. float64: the two implementations sum the same terms in a different order, 1e-12 relative. fp32 and
16-bit logits: both compute in fp32 from the same (already rounded) logits, S <= 60 terms, so the loss agrees with
the float64 reference to n * eps32 ~ 4e-6 relative; the gradient is returned in the logits' dtype, so 16-bit
gradients carry one rounding (2^-8 bf16, 2^-11 fp16).
"""

import math

import pytest
import torch

from sprm_kernels import sprm_score
from sprm_kernels.grad import sprm_step_logits
from sprm_kernels.loss import spr_loss, spr_loss_reference

CONFIGS = [(mode, balance) for mode in ("spr", "bce") for balance in (True, False)]
LOSS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def random_case(seed=0, counts=(4, 0, 7, 3, 0, 9, 1, 5, 6, 2, 8, 0), dtype=torch.float64, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor((0,) + counts).cumsum(0)
    logits = (torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64) * scale).to(dtype)
    correct = torch.rand(len(counts), generator=gen) < 0.5
    valid = torch.rand(len(counts), generator=gen) < 0.75
    return logits, offsets, correct, valid


def loss_and_grad(fn, logits, *args, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    out = fn(logits, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), logits.grad, out


def rel_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (actual - expected).abs().max().item() / max(scale, 1e-30) if expected.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,balance", CONFIGS)
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_float64_reference(dtype, mode, balance, with_valid, seed):
    logits, offsets, correct, valid = random_case(seed, dtype=dtype)
    valid = valid if with_valid else None
    kwargs = dict(mode=mode, balance=balance)
    loss, grad, (_, details) = loss_and_grad(spr_loss, logits, offsets, correct, valid, return_details=True, **kwargs)
    ref_loss, ref_grad, (_, ref_weights) = loss_and_grad(
        spr_loss_reference, logits.double(), offsets, correct, valid, return_details=True, **kwargs
    )
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL[dtype] * abs(ref_loss.item())
    assert rel_error(grad, ref_grad) <= GRAD_TOL[dtype]
    assert rel_error(details.weights, ref_weights) <= LOSS_TOL[dtype]
    assert 0 < loss.item() < 10 and details.kept.any()


def test_by_hand():
    """Two candidates: correct with logits (2, -1), wrong with logit -3; every weight written out."""
    offsets, correct = torch.tensor([0, 2, 3]), torch.tensor([True, False])
    logits = torch.tensor([2.0, -1.0, -3.0], dtype=torch.float64)

    def sp(x):  # softplus: BCE(s, 1) = sp(-s), BCE(s, 0) = sp(s)
        return math.log1p(math.exp(x))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    # spr + balance: kept steps 0 (correct, s > 0) and 2 (wrong, s < 0); P = 1 + 1, N = 1 + 1.
    pos_w, neg_w = 1.5 * 2 / 4, 2 / 4
    den = pos_w + neg_w + 1e-5
    loss, grad, (_, d) = loss_and_grad(spr_loss, logits, offsets, correct, return_details=True)
    assert math.isclose(loss.item(), (pos_w * sp(-2) + neg_w * sp(-3)) / den, rel_tol=1e-12)
    expected = [pos_w * (sig(2) - 1) / den, 0.0, neg_w * sig(-3) / den]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert d.kept.tolist() == [True, False, True] and d.num_pos.item() == 1 and d.num_neg.item() == 1
    assert math.isclose(d.pos_weight.item(), pos_w) and math.isclose(d.neg_weight.item(), neg_w)
    assert math.isclose(d.denominator.item(), den)
    # bce, unbalanced: the plain mean of the three BCE terms (denominator 3 + 1e-5).
    loss, grad, _ = loss_and_grad(spr_loss, logits, offsets, correct, mode="bce", balance=False)
    assert math.isclose(loss.item(), (sp(-2) + sp(1) + sp(-3)) / (3 + 1e-5), rel_tol=1e-12)
    expected = [(sig(2) - 1) / (3 + 1e-5), (sig(-1) - 1) / (3 + 1e-5), sig(-3) / (3 + 1e-5)]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # bce + balance: P = 2 + 1, N = 1 + 1: positives weigh 1.5 * 2/5, the negative 3/5.
    loss, _, _ = loss_and_grad(spr_loss, logits, offsets, correct, mode="bce")
    pos_w, neg_w = 1.5 * 2 / 5, 3 / 5
    expected = (pos_w * (sp(-2) + sp(1)) + neg_w * sp(-3)) / (2 * pos_w + neg_w + 1e-5)
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


@pytest.mark.parametrize("mode,balance", CONFIGS)
@pytest.mark.parametrize("outcome", [True, False])
@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
def test_one_sided_batches_are_finite(mode, balance, outcome, sign):
    """All-correct or all-wrong batches, with every step agreeing, disagreeing or exactly undecided (s = 0)."""
    offsets = torch.tensor([0, 3, 3, 8, 10])
    correct = torch.full((4,), outcome)
    logits = sign * (torch.rand(10, generator=torch.Generator().manual_seed(0)) + 0.5)
    loss, grad, (_, details) = loss_and_grad(spr_loss, logits, offsets, correct, mode=mode, balance=balance,
                                             return_details=True)  # fmt: skip
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    agrees = (sign > 0) == outcome and sign != 0
    if mode == "spr" and not agrees:
        assert loss.item() == 0 and not grad.any() and not details.kept.any()  # nothing teaches: no NaN, no push
    else:
        assert loss.item() > 0 and grad.abs().sum() > 0
        assert (grad < 0).all() if outcome else (grad > 0).all()  # every kept step moves toward its outcome
    ref_loss, ref_grad, _ = loss_and_grad(spr_loss_reference, logits.double(), offsets, correct, mode=mode,
                                          balance=balance)  # fmt: skip
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * max(ref_loss.item(), 1)
    assert rel_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("mode", ["spr", "bce"])
def test_no_steps_and_no_candidates(mode):
    for offsets, correct in ((torch.tensor([0, 0, 0, 0]), torch.tensor([True, False, True])),
                             (torch.tensor([0]), torch.zeros(0, dtype=torch.bool))):  # fmt: skip
        loss, grad, _ = loss_and_grad(spr_loss, torch.zeros(0), offsets, correct, mode=mode)
        assert loss.item() == 0 and grad.shape == (0,)


@pytest.mark.parametrize("mode", ["spr", "bce"])
def test_invalid_candidates_are_left_out(mode):
    logits, offsets, correct, valid = random_case(3, dtype=torch.float32)
    steps_valid = valid.repeat_interleave(offsets[1:] - offsets[:-1])
    base, grad, _ = loss_and_grad(spr_loss, logits, offsets, correct, valid, mode=mode)
    assert not grad[~steps_valid].any()
    junk = torch.tensor([float("nan"), 1e4, -float("inf")]).repeat(logits.numel())[: logits.numel()]
    changed = torch.where(steps_valid, logits, junk)
    again, grad_again, _ = loss_and_grad(spr_loss, changed, offsets, correct, valid, mode=mode)
    assert torch.equal(base, again) and torch.equal(grad, grad_again)
    none_valid, grad_none, _ = loss_and_grad(spr_loss, changed, offsets, correct, torch.zeros_like(valid), mode=mode)
    assert none_valid.item() == 0 and not grad_none.any()


@pytest.mark.parametrize("mode", ["spr", "bce"])
def test_nan_in_a_valid_candidate_is_not_hidden(mode):
    logits, offsets, correct, _ = random_case(4, dtype=torch.float32)
    logits[5] = float("nan")  # in a valid candidate: the filter must not silently drop it
    loss, grad, _ = loss_and_grad(spr_loss, logits, offsets, correct, mode=mode)
    assert torch.isnan(loss) and torch.isnan(grad[5])


@pytest.mark.parametrize("mode,balance", CONFIGS)
def test_huge_logits(mode, balance):
    """|s| up to 1e30 and inf: BCE in log space (relu(z) + log1p(exp(-|z|))) never overflows to NaN."""
    offsets, correct = torch.tensor([0, 3, 6]), torch.tensor([True, False])
    logits = torch.tensor([1e4, -1e30, float("inf"), -1e4, 1e30, -float("inf")])
    loss, grad, _ = loss_and_grad(spr_loss, logits, offsets, correct, mode=mode, balance=balance)
    assert not torch.isnan(loss) and not torch.isnan(grad).any()
    if mode == "spr":  # every kept step is confidently right: zero loss; the wrong ones are filtered out
        assert loss.item() == 0 and not grad.any()
    else:  # the two wrong-signed steps cost about 1e30 each; the gradient stays bounded by the weights
        assert 1e29 < loss.item() < float("inf") and grad.abs().max() < 1
    flipped, grad, _ = loss_and_grad(spr_loss, -logits, offsets, correct, mode="bce", balance=balance)
    assert flipped.item() == float("inf") and torch.isfinite(grad).all()  # an infinitely wrong step costs inf


def test_weights_are_constants():
    """The gradient is sum_i weights_i * (sigmoid(s_i) - y_i) / denominator: no derivative of the filter or P, N."""
    logits, offsets, correct, valid = random_case(5)
    logits = logits.detach().requires_grad_(True)
    loss, d = spr_loss(logits, offsets, correct, valid, return_details=True)
    (2.5 * loss).backward()  # the incoming gradient scales the result
    y = correct.repeat_interleave(offsets[1:] - offsets[:-1]).double()
    expected = 2.5 * d.weights * (torch.sigmoid(logits.detach()) - y) / d.denominator
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=0)
    assert not any(t.requires_grad for t in (d.weights, d.pos_weight, d.neg_weight, d.denominator))


def test_integer_labels_and_positive_factor():
    logits, offsets, correct, valid = random_case(6)
    as_bool = spr_loss(logits, offsets, correct, valid, positive_factor=2.5)
    as_int = spr_loss(logits, offsets, correct.long(), valid.float(), positive_factor=2.5)
    assert torch.equal(as_bool, as_int)
    assert torch.equal(as_bool, spr_loss_reference(logits, offsets, correct, valid, positive_factor=2.5))


def _bad_inputs():
    logits, offsets, correct, valid = random_case(0, dtype=torch.float32)
    ok = dict(step_logits=logits, offsets=offsets, correct=correct, valid=valid)
    yield "step_logits", dict(ok, step_logits=logits.long())
    yield "step_logits", dict(ok, step_logits=logits.reshape(5, -1))
    yield "step_logits", dict(ok, step_logits=logits.tolist())
    yield "offsets", dict(ok, offsets=offsets.int())
    yield "offsets", dict(ok, offsets=offsets + 1)
    yield "offsets", dict(ok, offsets=offsets.flip(0))
    yield "offsets", dict(ok, offsets=torch.cat([offsets[:-1], offsets[-1:] + 1]))
    yield "offsets", dict(ok, offsets=torch.zeros(0, dtype=torch.int64))
    yield "correct", dict(ok, correct=correct[:-1])
    yield "correct", dict(ok, correct=correct.float() * 2)
    yield "correct", dict(ok, correct=torch.complex(correct.float(), correct.float()))
    yield "valid", dict(ok, valid=valid[:3])
    yield "valid", dict(ok, valid=valid.float() - 0.5)
    yield "mode", dict(ok, mode="SPR")
    yield "balance", dict(ok, balance=1)
    yield "positive_factor", dict(ok, positive_factor=-1.0)
    yield "positive_factor", dict(ok, positive_factor=float("inf"))
    yield "positive_factor", dict(ok, positive_factor=torch.tensor(1.5))
    yield "return_details", dict(ok, return_details="yes")


@pytest.mark.parametrize("name,kwargs", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises(monkeypatch, name, kwargs):
    import sprm_kernels.loss as loss_module

    monkeypatch.setattr(loss_module, "_loss_and_grad", lambda *a: pytest.fail("computed before validation"))
    with pytest.raises(ValueError, match=f"^{name}:"):
        spr_loss(**kwargs)


# --- a short training run: the head must learn a real signal ------------------------------------------------------

HIDDEN = 16


def synthetic_batch(gen, problems=8, k=8, max_steps=6, lucky=0.1):
    """k candidates for each of `problems` problems. A step is good or bad; a feature is +-1 along axis 0 by
    goodness, plus unit noise, plus a per-problem offset (0.5 per axis) and the problem's difficulty along axis 1.
    A wrong candidate is good up to its first error and bad after it; a correct one is good except for a few
    lucky bad steps (right answer, wrong step). Some candidates have no steps."""
    rows, counts, correct, problem = [], [], [], []
    for p in range(problems):
        difficulty = torch.rand((), generator=gen).item()
        offset = torch.randn(HIDDEN, generator=gen) * 0.5
        for _ in range(k):
            ok = torch.rand((), generator=gen).item() > 0.2 + 0.6 * difficulty
            n = int(torch.randint(0, max_steps + 1, (), generator=gen))
            good = torch.rand(n, generator=gen) > (lucky if ok else 0.0)
            if not ok and n:
                good[int(torch.randint(0, n, (), generator=gen)) :] = False
            x = torch.randn(n, HIDDEN, generator=gen) + offset
            x[:, 0] += good.float() * 2 - 1
            x[:, 1] += difficulty
            rows.append(x), counts.append(n), correct.append(ok), problem.append(p)
    offsets = torch.tensor([0] + counts).cumsum(0)
    return torch.cat(rows), offsets, torch.tensor(correct), torch.tensor(problem)


def roc_auc(scores, labels) -> float:
    diff = scores[labels][:, None] - scores[~labels][None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def evaluate(head, batches, k=8):
    """Over candidates with steps: score gap (correct - wrong) and ROC AUC of the SPRM scores; the mean
    within-problem gap; and best-of-k accuracy, the fraction of problems whose top-scored candidate is correct."""
    scores, labels, within, chosen = [], [], [], []
    for hidden, offsets, correct, problem in batches:
        result = sprm_score(hidden, torch.arange(hidden.shape[0]), offsets, *head, group_size=k, backend="torch")
        has = result.num_steps > 0
        scores.append(result.score[has])
        labels.append(correct[has])
        chosen.append(correct.view(-1, k).gather(1, result.best[:, None]).squeeze(1))
        for p in problem.unique():
            good, bad = result.score[(problem == p) & has & correct], result.score[(problem == p) & has & ~correct]
            if good.numel() and bad.numel():
                within.append((good.mean() - bad.mean()).item())
    s, y = torch.cat(scores), torch.cat(labels)
    best_of_k = torch.cat(chosen).double().mean().item()
    return (s[y].mean() - s[~y].mean()).item(), roc_auc(s, y), sum(within) / len(within), best_of_k


def baselines(batches, k=8) -> str:
    correct = torch.cat([b[2] for b in batches]).view(-1, k)
    return f"pass@1 {correct.double().mean():.3f}, oracle pass@{k} {correct.any(1).double().mean():.3f}"


def train_head(mode, steps=300, log_every=50, seed=0, lr=3e-3):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine's contention
    try:
        return _train_head(mode, steps, log_every, seed, lr)
    finally:
        torch.set_num_threads(threads)


def _train_head(mode, steps, log_every, seed, lr):
    torch.manual_seed(seed)
    first, second = torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.Linear(2 * HIDDEN, 1)
    head = [first.weight, first.bias, second.weight, second.bias]
    optimizer = torch.optim.Adam(head, lr=lr)
    train_gen, eval_gen = torch.Generator().manual_seed(1000 + seed), torch.Generator().manual_seed(99)
    held_out = [synthetic_batch(eval_gen) for _ in range(8)]
    curve = []
    for step in range(steps + 1):
        if step % log_every == 0:
            with torch.no_grad():
                curve.append((step, *evaluate([t.detach() for t in head], held_out)))
        if step == steps:
            return curve
        hidden, offsets, correct, _ = synthetic_batch(train_gen)
        logits = sprm_step_logits(hidden, torch.arange(hidden.shape[0]), *head, backend="torch")
        loss = spr_loss(logits, offsets, correct, mode=mode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def format_curve(mode, curve) -> str:
    lines = [f"{mode}: step    gap    AUC  within-problem gap  best-of-8"]
    lines += [
        f"{mode}: {step:4d} {gap:6.3f} {auc:6.3f} {within:19.3f} {best:10.3f}" for step, gap, auc, within, best in curve
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("mode", ["spr", "bce"])
def test_training_learns_the_step_signal(mode):
    """300 Adam steps on 64 candidates per batch (~220 steps), scored on 8 held-out batches. Run with -s for the
    curve. Both losses must lift the held-out AUC by >= 0.1 to >= 0.75, the score gap by >= 0.08, and leave a
    within-problem gap >= 0.1 (a problem-difficulty shortcut alone would not)."""
    curve = train_head(mode)
    print("\n" + format_curve(mode, curve))
    (_, gap0, auc0, _, _), (_, gap, auc, within, _) = curve[0], curve[-1]
    assert auc >= auc0 + 0.1 and auc >= 0.75
    assert gap >= gap0 + 0.08
    assert within >= 0.1


if __name__ == "__main__":  # python tests/kernels/test_loss.py: the curves for SPR and BCE, side by side
    eval_gen = torch.Generator().manual_seed(99)
    print("held-out batches:", baselines([synthetic_batch(eval_gen) for _ in range(8)]))
    for mode in ("spr", "bce"):
        print(format_curve(mode, train_head(mode)))
