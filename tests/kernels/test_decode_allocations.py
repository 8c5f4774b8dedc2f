"""The decode paths allocate nothing per call: self-resetting tickets, reused buffers, no validation sync on request.

Each test warms the path once (compiles, grows the cached buffers), then patches torch's allocating factories
(and the host reads behind validation) to raise, and runs the same call again: an allocation or a sync that comes
back fails the test. Results are compared bit for bit with the allocating or validating call.
"""

import pytest
import torch
from helpers import INTERPRETING, random_csr, random_head

from sprm_kernels import StepScorer, sprm_score

FACTORIES = ("empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like")
needs_kernels = pytest.mark.skipif(
    not (INTERPRETING or torch.cuda.is_available()), reason="the Triton route: CUDA or TRITON_INTERPRET=1"
)


def kernel_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def no_allocations(monkeypatch):
    """`arm(names)`: from then on in the test, each torch factory in `names` (default: all of FACTORIES) raises."""

    def arm(names=FACTORIES):
        for name in names:

            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"torch.{_name} called on a decode path")

            monkeypatch.setattr(torch, name, refuse)

    return arm


def forbid_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation (Tensor.tolist / .item) on the fast path")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)


def case(device, dtype=torch.float32, hidden_size=40):
    hidden = torch.randn(60, hidden_size, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    head = [t.to(device) for t in random_head(hidden_size, dtype, seed=6)]
    step_index, offsets = random_csr(60, [3, 0, 7, 2], seed=7, device=device)
    return hidden, step_index, offsets, head


@pytest.mark.parametrize("group_size", [None, 2])
def test_validate_false_gives_the_same_bits_without_a_host_read(route, monkeypatch, group_size):
    device, backend = route
    hidden, step_index, offsets, head = case(device)
    options = dict(group_size=group_size, return_step_scores=True, backend=backend)
    checked = sprm_score(hidden, step_index, offsets, *head, **options)
    sprm_score(hidden, step_index, offsets, *head, validate=False, **options)  # warm-up (compiles)
    forbid_host_reads(monkeypatch)
    fast = sprm_score(hidden, step_index, offsets, *head, validate=False, **options)
    monkeypatch.undo()
    for field in ("score", "log_score", "num_steps", "step_scores", "best"):
        expected, got = getattr(checked, field), getattr(fast, field)
        assert (expected is None) == (got is None) == (field == "best" and group_size is None), field
        if expected is not None:
            assert torch.equal(got.cpu().nan_to_num(), expected.cpu().nan_to_num()), field


def test_validate_false_still_checks_metadata():
    hidden, step_index, offsets, head = case("cpu")
    with pytest.raises(ValueError, match="^step_index:"):
        sprm_score(hidden, step_index.int(), offsets, *head, validate=False)
    with pytest.raises(ValueError, match="^validate:"):
        sprm_score(hidden, step_index, offsets, *head, validate=1)
    with pytest.raises(ValueError, match="^step_index:"):  # the default still reads the values
        sprm_score(hidden, torch.tensor([0, 99, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), offsets, *head)


@needs_kernels
def test_sprm_score_takes_self_resetting_tickets_from_the_cache(no_allocations):
    """After a warm-up, the fused kernel's tickets come from the per-stream cache (no torch.zeros), and every
    launch leaves them at zero for the next one: repeated calls give the same bits."""
    from sprm_kernels.kernels import sprm_score as module

    hidden, step_index, offsets, head = case(kernel_device())
    first = sprm_score(hidden, step_index, offsets, *head, group_size=2, backend="triton")
    cached = module._TICKETS[module._ticket_key(hidden.device)]
    assert not cached.any(), "tickets left non-zero after a launch"
    no_allocations(("zeros", "zeros_like", "full", "ones", "arange"))  # the outputs are new (torch.empty) by contract
    for _ in range(3):  # (validate=False: the default validation builds a scalar with torch.zeros)
        again = sprm_score(hidden, step_index, offsets, *head, group_size=2, backend="triton", validate=False)
        assert torch.equal(first.log_score, again.log_score) and torch.equal(first.best, again.best)
    assert module._TICKETS[module._ticket_key(hidden.device)] is cached
    assert not cached.any()


def test_a_failed_launch_drops_the_cached_tickets():
    from sprm_kernels.kernels import sprm_score as module

    device = torch.device("cpu")
    tickets = module.zeroed_tickets(device, 8)
    tickets[3] = 2  # as a launch that stopped part-way would leave them
    with pytest.raises(RuntimeError), module.tickets_dropped_on_error(device):
        raise RuntimeError("launch failed")
    assert module._ticket_key(device) not in module._TICKETS
    assert not module.zeroed_tickets(device, 8).any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_logits_with_buffers_and_no_index_allocates_nothing(no_allocations, dtype):
    """The vLLM head's launch: hidden's rows in order (no arange index), output and workspace reused, tickets
    reset by the kernel; equal to the gathered launch bit for bit."""
    from sprm_kernels.kernels.step_logits import StepLogitsBuffers, launch_step_logits

    device = kernel_device()
    hidden, _, _, (w1, b1, w2, b2) = case(device, dtype)
    w2 = w2.reshape(-1)
    gathered = launch_step_logits(hidden, torch.arange(hidden.shape[0], device=device), w1, b1, w2, b2)
    buffers = StepLogitsBuffers()
    launch_step_logits(hidden, None, w1, b1, w2, b2, buffers=buffers)  # warm-up: compiles, grows the buffers
    kept = (buffers.logits, buffers.partial, buffers.tickets)
    no_allocations()
    for rows in (60, 17, 60):  # fewer rows reuse the same buffers
        logits = launch_step_logits(hidden[:rows], None, w1, b1, w2, b2, buffers=buffers)
        assert torch.equal(logits, gathered[:rows]) if rows == 60 else logits.shape == (rows,)
    assert (buffers.logits, buffers.partial, buffers.tickets) == kept
    assert not buffers.tickets.any()


@needs_kernels
def test_step_scorer_update_allocates_nothing(no_allocations):
    device = kernel_device()
    head = [t.to(device) for t in random_head(40, seed=8)]
    scorer = StepScorer(*head, batch_size=4, group_size=2, backend="triton")
    reference = StepScorer(*head, batch_size=4, group_size=2, backend="triton")
    states = torch.randn(4, 40, generator=torch.Generator().manual_seed(9)).to(device)
    flags = torch.tensor([True, False, True, True], device=device)
    idle, want = torch.zeros(4, dtype=torch.bool, device=device), torch.zeros(4, dtype=torch.bool, device=device)
    scorer.update(states, flags, want)  # warm-up
    reference.update(states, flags, want)
    no_allocations()
    for _ in range(3):
        scorer.update(states, flags, want)
        scorer.update(states, idle, want)  # an idle step: skipped on the device
        reference.update(states, flags, want)
    assert torch.equal(scorer.sum_log, reference.sum_log) and torch.equal(scorer.count, reference.count)
    assert not scorer.ticket.any()


def test_buffers_made_under_inference_mode_stay_usable_outside_it():
    """An HF engine decodes under torch.inference_mode; the ticket cache and step_logits buffers it creates there
    must still be reset and written by a later launch outside it (training), not be inference tensors."""
    from sprm_kernels.kernels import sprm_score as module
    from sprm_kernels.kernels.step_logits import StepLogitsBuffers

    device = torch.device("cpu")
    module._TICKETS.pop(module._ticket_key(device), None)
    buffers = StepLogitsBuffers()
    with torch.inference_mode():
        module.zeroed_tickets(device, 8)
        logits, partial, tickets = buffers.take(4, 8, 2, device)
    module.zeroed_tickets(device, 8)[3] = 2  # in place, outside inference mode
    module._TICKETS.pop(module._ticket_key(device), None)
    logits, partial, tickets = buffers.take(4, 8, 2, device)
    tickets.add_(1)
    logits.fill_(0.0)
    assert not torch.is_inference(logits) and not torch.is_inference(tickets)
