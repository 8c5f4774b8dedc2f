"""The pruning rules of best-of-k (`selection.rows_to_prune`, docs/pruning.md) and a pruned row in the choice."""

import math

import pytest

from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.selection import choose_best, rows_to_prune

NAN = math.nan


def prune(rule, means, counts, running=None, pruned=None, **options):
    running = [True] * len(means) if running is None else running
    pruned = [False] * len(means) if pruned is None else pruned
    return rows_to_prune(rule, means, counts, running, pruned, **{"margin": 1.0, "every": 1, "keep": 2, **options})


def test_margin_stops_the_rows_far_below_the_best_worst_first_and_keeps_enough():
    means = [-0.02, -2.0, -0.1, NAN, -1.0]
    assert prune("margin", means, [2] * 5) == ([1, 3], 0)  # -1.0 is within 1.0 of -0.02; NaN ranks lowest
    assert prune("margin", means, [2] * 5, keep=4) == ([3], 0)  # only one may go: the worst
    assert prune("margin", means, [2, 2, 2, 0, 2], every=1) == ([1], 0)  # too few steps to judge row 3
    assert prune("margin", means, [2] * 5, margin=0.05) == ([1, 3, 4], 0)  # keep=2: row 2, behind too, stays
    assert prune("margin", means, [2] * 5, margin=0.05, keep=1) == ([1, 2, 3, 4], 0)


def test_margin_lets_finished_rows_set_the_best_but_never_stops_them():
    means = [-3.0, -0.01, -2.5]
    running = [True, False, False]  # row 1 finished (with no more steps than `every` asks)
    assert prune("margin", means, [3, 0, 3], running=running, every=2) == ([0], 0)
    assert prune("margin", means, [3, 0, 3], running=running, pruned=[False, False, True], every=2) == ([], 0)


def test_halving_keeps_the_better_half_at_each_rung_once_every_running_row_passed_it():
    means = [-0.5, -0.1, -3.0, -0.2, NAN, -0.01, -1.0, -0.3]
    assert prune("halving", means, [1] * 7 + [0]) == ([], 0)  # row 7 has not reached rung 1 yet
    stop, rungs = prune("halving", means, [1] * 8)
    assert (stop, rungs) == ([0, 2, 4, 6], 1)  # kept: 5, 1, 3, 7
    pruned = [j in stop for j in range(8)]
    assert prune("halving", means, [1] * 8, pruned=pruned, rungs=1) == ([], 1)  # rung 2 not passed
    assert prune("halving", means, [2] * 8, pruned=pruned, rungs=1) == ([3, 7], 2)
    assert prune("halving", means, [9] * 8, keep=1) == ([0, 1, 2, 3, 4, 6, 7], 3)  # three rungs at once: 8, 4, 2, 1


def test_halving_keeps_finished_rows_and_stops_only_running_ones():
    means = [-0.1, -2.0, -0.3, -0.2]
    running = [False, True, True, True]  # row 0 finished early: it passed every rung
    assert prune("halving", means, [1, 1, 1, 1], running=running) == ([1, 2], 1)
    assert prune("halving", means, [1, 1, 1, 1], running=[False] * 4) == ([], 0)  # nothing left to stop


def test_a_pruned_row_is_never_chosen_while_another_row_is_kept():
    assert choose_best([0.9, 0.2, 0.1], [False, True, False], pruned=[True, False, False]) == 1
    assert choose_best([0.9, 0.2, 0.3], [False, False, False], pruned=[True, False, False]) == 2
    assert choose_best([0.9, 0.2], [True, True]) == 0
    with pytest.raises(ValueError, match="pruned"):
        choose_best([0.9, 0.2], [True, True], pruned=[True])
    with pytest.raises(ValueError, match="prune: expected one of"):
        rows_to_prune("best", [0.0], [1], [True], [False], margin=1.0, every=1, keep=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"prune": "beam"}, "prune:"), ({"prune_margin": -0.5}, "prune_margin:"), ({"prune_every": 0}, "prune_every:"),
     ({"prune_keep": 0}, "prune_keep:"), ({"prune_keep": 1.5}, "prune_keep:")],
)  # fmt: skip
def test_bad_pruning_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**kwargs)


def test_hybrid_applies_the_margin_then_halves_what_is_left():
    means = [-0.02, -3.0, -0.1, -0.05, -0.2, -0.03]
    assert prune("hybrid", means, [2] * 6, keep=2, every=2) == ([1, 2, 4], 1)  # margin: 1; halving of 5: keep 3
    assert prune("hybrid", means, [1] * 6, keep=2, every=2) == ([], 0)  # too few steps for either
