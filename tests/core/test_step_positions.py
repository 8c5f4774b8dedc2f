"""step_positions: every route equals the token-by-token reference of docs/method.md §3, pinned by hand examples."""

import pytest
import torch
from helpers import CLOSE, OPEN, STEP, random_token_rows

from sprm_kernels import step_positions, step_positions_reference

RULE = dict(step_token_ids=[STEP], think_start_id=OPEN, think_end_id=CLOSE)
A, B_, C, D, E = 5, 6, 7, 8, 9


def run(route, input_ids, **kwargs):
    device, backend = route
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    index, offsets = step_positions(input_ids.to(device), backend=backend, **{**RULE, **moved})
    assert index.dtype == offsets.dtype == torch.int64
    return index.cpu(), offsets.cpu()


def assert_matches_reference(route, input_ids, **kwargs):
    expected = step_positions_reference(input_ids, **{**RULE, **kwargs})
    actual = run(route, input_ids, **kwargs)
    assert torch.equal(actual[0], expected[0]), (actual[0], expected[0])
    assert torch.equal(actual[1], expected[1]), (actual[1], expected[1])
    return expected


# Hand-checked cases of the rule (positions are 0-based flat indices).
HAND_CASES = [
    # <think> a b . c . . d </think> e .  -> before the first '.', before the second; not inside the run, not after
    ([A, OPEN, A, B_, STEP, C, STEP, STEP, D, CLOSE, E, STEP], [3, 5]),
    # no markers: start = 0 (position 0 never scores), end = L
    ([A, STEP, B_, STEP, C], [2]),
    # <think> directly followed by a step token is not scored; the token after it is
    ([OPEN, STEP, A, STEP], [2]),
    # two <think>: the markers are ignored, so the span is the whole sequence ('<think>' itself is never scored)
    ([A, OPEN, B_, STEP, OPEN, STEP, C, STEP], [2, 6]),
    # two </think>: end = L, so the step after the first </think> counts
    ([OPEN, A, STEP, CLOSE, B_, STEP, CLOSE], [1, 4]),
    # a step token at t+1 beyond </think> is not scored (t < end)
    ([OPEN, A, STEP, CLOSE, STEP], [1]),
    # a single token and an empty-ish row
    ([STEP], []),
    ([A, STEP], []),
]


@pytest.mark.parametrize("tokens,expected", HAND_CASES)
def test_reference_follows_the_rule_by_hand(tokens, expected, route):
    ids = torch.tensor([tokens])
    index, offsets = step_positions_reference(ids, **RULE)
    assert index.tolist() == expected
    assert offsets.tolist() == [0, len(expected)]
    assert_matches_reference(route, ids)


def test_padded_random_rows(route):
    ids = random_token_rows(batch=9, length=53, seed=1)
    expected = assert_matches_reference(route, ids)
    assert expected[0].numel() > 20  # the data exercises the rule, not just empty results


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_mask_padding_never_scores(route, side):
    ids = random_token_rows(batch=6, length=40, seed=2)
    mask = torch.ones_like(ids)
    lengths = [40, 31, 17, 1, 0, 25]
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, n:] = 0
        else:
            mask[b, : 40 - n] = 0
    ids[mask == 0] = STEP  # padding made of step tokens must still never score nor count as 'next token'
    expected = assert_matches_reference(route, ids, attention_mask=mask)
    # for contiguous padding the rule equals the rule applied to the real tokens alone
    for b, n in enumerate(lengths):
        real = ids[b][mask[b].bool()].unsqueeze(0)
        alone, _ = step_positions_reference(real, **RULE)
        start = 0 if side == "right" else 40 - n
        mine = expected[0][expected[1][b] : expected[1][b + 1]] - b * 40 - start
        assert mine.tolist() == alone.tolist()


def test_bool_and_int_masks_agree(route):
    ids = random_token_rows(batch=3, length=20, seed=3)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) > 0.2  # holes break adjacency
    a = run(route, ids, attention_mask=mask)
    b = run(route, ids, attention_mask=mask.long())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_matches_reference(route, ids, attention_mask=mask)


def test_packed_layout_matches_padded(route):
    lengths = [12, 0, 1, 33, 7]
    rows = [random_token_rows(1, n, seed=10 + i)[0] if n else torch.empty(0, dtype=torch.int64)
            for i, n in enumerate(lengths)]  # fmt: skip
    packed = torch.cat(rows)
    cu = torch.tensor([0] + lengths).cumsum(0)
    index, offsets = assert_matches_reference(route, packed, cu_seqlens=cu)
    for b, row in enumerate(rows):
        alone, _ = step_positions_reference(row.unsqueeze(0), **RULE) if row.numel() else (torch.empty(0), None)
        assert (index[offsets[b] : offsets[b + 1]] - cu[b]).tolist() == alone.tolist()


def test_long_rows_cross_chunk_boundaries(route):
    ids = random_token_rows(batch=2, length=2500, seed=4)  # kernel chunks are 1024 tokens
    assert_matches_reference(route, ids)


def test_many_step_ids_and_int32_input(route):
    ids = random_token_rows(batch=4, length=30, seed=5, vocab=40)
    rule = dict(step_token_ids=[STEP, 11, 17, 23, 39], think_start_id=OPEN, think_end_id=CLOSE)
    expected = step_positions_reference(ids, **rule)
    device, backend = route
    actual = step_positions(ids.to(device, torch.int32), backend=backend, **rule)
    assert torch.equal(actual[0].cpu(), expected[0]) and torch.equal(actual[1].cpu(), expected[1])


def test_single_token_rows_and_zero_candidates(route):
    assert_matches_reference(route, torch.tensor([[STEP], [A]]))
    index, offsets = run(route, torch.empty(0, 5, dtype=torch.int64))
    assert index.numel() == 0 and offsets.tolist() == [0]


def test_outputs_are_fully_written(route, poisoned_allocations):
    ids = random_token_rows(batch=5, length=37, seed=6)
    assert_matches_reference(route, ids)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_ids=torch.zeros(2, 3)), "input_ids"),
        (dict(input_ids=torch.zeros(2, 3, 4, dtype=torch.long)), "input_ids"),
        (dict(attention_mask=torch.ones(2, 4)), "attention_mask"),
        (dict(cu_seqlens=torch.tensor([0, 2, 6])), "input_ids"),  # padded ids with cu_seqlens
        (dict(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 2, 6])), "cu_seqlens"),
        (dict(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5])), "cu_seqlens"),
        (
            dict(input_ids=torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)),
            "cu_seqlens",
        ),  # fmt: skip
        (dict(step_token_ids=[-1]), "step_token_ids"),
        (dict(step_token_ids=[]), "step_token_ids"),
        (dict(step_token_ids=3), "step_token_ids"),
        (dict(think_start_id=None), "think_start_id"),
        (dict(think_end_id=2.0), "think_end_id"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    args = dict(input_ids=torch.zeros(2, 3, dtype=torch.long), **RULE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        step_positions(args.pop("input_ids"), **args)


# -- the engines' shared rule (sprm_kernels.model.core.steps): offline lists, streaming, prompt positions ---------


def test_engine_rule_streamed_token_by_token_equals_the_offline_rule():
    """`ThinkSpan` fed one token at a time plus rules 1-3 (`could_score`) give `scored_positions` on the final ids,
    which is the reference rule; `prompt_step_positions` is rules 1-3 on a prompt."""
    from sprm_kernels.model.core.steps import (
        ThinkSpan,
        could_score,
        is_scorable_pair,
        prompt_step_positions,
        scored_positions,
    )

    rows = random_token_rows(8, 40, seed=5).tolist() + [case for case, _ in HAND_CASES]
    offline = scored_positions(rows, **RULE, backend="torch")
    for row, expected in zip(rows, offline, strict=True):
        reference, _ = step_positions_reference(torch.tensor([row]), **RULE)
        assert expected == reference.tolist()
        span = ThinkSpan(row[:1], 1, OPEN, CLOSE, "cpu")
        for t in range(1, len(row)):
            span.observe(torch.tensor([row[t]]), t, torch.tensor([True]))
        step_ids, one = torch.tensor([STEP]), torch.tensor([True])
        streamed = [
            t
            for t in range(len(row) - 1)
            if bool(could_score(torch.tensor([row[t + 1]]), torch.tensor([row[t]]), one, step_ids, OPEN))
            and bool(span.contains(t))
        ]
        assert streamed == expected
        rules_1_to_3 = [t for t in range(1, len(row) - 1) if is_scorable_pair(row[t], row[t + 1], {STEP}, OPEN)]
        assert prompt_step_positions(row, [STEP], OPEN) == rules_1_to_3
        assert set(expected) <= set(rules_1_to_3)
    assert scored_positions([], **RULE) == []


@pytest.mark.parametrize("seed", range(3))
def test_the_pure_python_rule_equals_the_offline_rule(seed):
    """`core.steps.scored_positions_list` (the vLLM search's host reads) against the reference, on random rows
    with markers once, twice or not at all, their every prefix (a partial row), and the hand cases."""
    from sprm_kernels.model.core.steps import scored_positions_list

    rows = random_token_rows(12, 48, seed=seed).tolist() + [case for case, _ in HAND_CASES]
    for row in rows:
        for end in range(0, len(row) + 1, 5 if len(row) > 20 else 1):
            prefix = row[:end]
            expected = step_positions_reference(torch.tensor([prefix]), **RULE)[0].tolist() if prefix else []
            assert scored_positions_list(prefix, {STEP}, OPEN, CLOSE) == expected, prefix
