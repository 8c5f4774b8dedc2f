"""The worker's device-side record (`recorder.StepRecorder`) on synthetic steps, in this process: the per-step path
reads nothing back from the device (every host read of a tensor raises while steps run), the running step scores
equal the scoring rule applied to what was fed so far, and the fetched logits are those of the forward. Chunked
prefills, positions the prefix cache served, a recomputed (preempted) request, `<think>` fed late, unkeyed requests
and padding are covered. Skipped, visibly, where vLLM is absent (the package checks vLLM's version on import)."""

import importlib.util
import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

STEP, THINK = 3, 1
MAX_LEN = 48


def logit(key: str, t: int) -> float:
    """The head's logit at position t of request `key`: any fixed function of the two, exact in fp32."""
    return float(np.float32(4.0 * math.sin(1.7 * t + len(key)) - 0.5))


def reference_running(key: str, ids: list[int], fed_from: int) -> tuple[float, int]:
    """docs/method.md §3 rules 1-3 on the fed ids, after the latest `<think>`, pairs complete; positions before
    `fed_from` never went through the model (no logit: not counted)."""
    last_think = max((t for t, x in enumerate(ids) if x == THINK), default=-1)
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        if t < fed_from or t <= last_think:
            continue
        if ids[t + 1] == STEP and ids[t] != STEP and ids[t] != THINK:
            z = torch.tensor(logit_of[(key, t)])
            total += max(torch.nn.functional.logsigmoid(z).item(), math.log(1e-10))
            count += 1
    return total, count


logit_of = {}  # (key, position) -> the head's logit there


@pytest.fixture
def no_host_reads(monkeypatch):
    """Every way of reading a tensor's values on the host raises while it is active."""

    def boom(*args, **kwargs):
        raise AssertionError("a host read of a tensor in the per-step path")

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "numpy", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    return monkeypatch


def test_steps_read_nothing_back_and_the_running_scores_follow_the_rule(no_host_reads):
    from sprm_kernels.model.engines.vllm.recorder import EXTRA_KEY, StepRecorder

    recorder = StepRecorder([STEP], THINK, MAX_LEN, "cpu", capacity=2)  # grows to 4 slots below
    sequences = {
        "a": [5, 1, 7, 3, 8, 9, 3, 3, 6, 2, 3, 4, 1, 5, 3, 6, 3, 7, 7, 3],  # a second <think> at 12: start moves
        "bb": [9, 9, 1, 4, 3, 5, 3, 8, 8, 3, 2, 2, 3],
        "ccc": [1, 6, 3, 6, 3],
        "dd": [1, 5, 3, 6, 6, 3, 2],
    }
    for key, ids in sequences.items():
        for t in range(len(ids)):
            logit_of[(key, t)] = logit(key, t)
    extras = {"ra": {EXTRA_KEY: "a"}, "rb": {EXTRA_KEY: "bb"}, "rc": {EXTRA_KEY: "ccc"}, "rd": {EXTRA_KEY: "dd"},
              "rx": None}  # fmt: skip
    fed = {key: 0 for key in sequences}  # next position to feed
    first = {"a": 0, "bb": 2, "ccc": 0, "dd": 0}  # "bb": positions 0-1 came from the prefix cache
    fed["bb"] = 2

    def step(plan, pad=2):
        """plan: [(request id, key, tokens)]; an unkeyed request and padding ride along."""
        req_ids, counts, pos, ids, z = [], [], [], [], []
        for req_id, key, n in plan:
            req_ids.append(req_id)
            counts.append(n)
            if key is None:
                tokens = [(t, 7, 9.0) for t in range(n)]
            else:
                tokens = [(t, sequences[key][t], logit_of[(key, t)]) for t in range(fed[key], fed[key] + n)]
                fed[key] += n
            for t, x, value in tokens:
                pos.append(t)
                ids.append(x)
                z.append(value)
        pos += [0] * pad
        ids += [0] * pad
        z += [5.0] * pad
        with torch.inference_mode():  # as vLLM runs its steps (the buffers grow in it, the reads come outside)
            tensors = torch.tensor(pos), torch.tensor(ids), torch.tensor(z)
            recorder.record_step(req_ids, counts, extras.get, *tensors, None)

    step([("ra", "a", 5), ("rb", "bb", 3), ("rx", None, 4)])  # chunked prefills
    step([("ra", "a", 4), ("rb", "bb", 5), ("rc", "ccc", 2)])
    for _ in range(2):
        step([("rb", "bb", 1), ("ra", "a", 1), ("rc", "ccc", 1)])  # decode, batch order changed
    # "a" preempted right after its step token at 10 was fed, then recomputed from position 4 (its first block
    # cached): the step at 9 comes again and must not count twice.
    fed["a"] = 4
    step([("ra", "a", 6)])
    step([("rd", "dd", 3)])  # "dd" preempted right after its step token at 2: recomputed from scratch
    fed["dd"] = 0
    step([("rd", "dd", 7)])
    while fed["a"] < len(sequences["a"]):
        step([("ra", "a", 1), ("rb", "bb", 1)] if fed["bb"] < len(sequences["bb"]) else [("ra", "a", 1)])
    no_host_reads.undo()

    assert recorder.host_reads == 0 and recorder.steps > 10 and recorder.capacity == 4
    running = recorder.running(list(sequences) + ["unknown"])
    assert recorder.host_reads == 1 and "unknown" not in running
    for key, ids in sequences.items():
        want_sum, want_count = reference_running(key, ids[: fed[key]], first[key])
        got_sum, got_count, length, first_fed = running[key]
        assert (got_count, length, first_fed) == (want_count, fed[key], first[key])
        assert got_count > 0 and math.isclose(got_sum, want_sum, rel_tol=1e-6, abs_tol=1e-6)
    assert recorder.tokens({"a": 9, "bb": 0}) == {"a": sequences["a"][9:], "bb": []}  # "bb" 0-1 never fed
    wanted = {"a": [0, 3, 19, 30], "bb": [1, 4]}
    found = recorder.fetch(wanted)
    assert found["a"][0] == [logit_of[("a", t)] for t in (0, 3, 19)] + [None]  # 30: never fed
    assert found["bb"][0] == [None, logit_of[("bb", 4)]]  # 1: from the prefix cache
    assert recorder.host_reads == 3 and set(recorder.slots) == {"ccc", "dd"}
    recorder.drop(["ccc", "dd"])
    assert not recorder.slots and len(recorder.free) == recorder.capacity
    assert recorder.running(["a"]) == {}  # a released slot starts afresh
    assert torch.isnan(recorder.logits[: recorder.capacity]).all() and (recorder.ids[: recorder.capacity] == -1).all()
