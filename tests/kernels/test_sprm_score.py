"""sprm_score: every route against float64 truth and against the eager reference run in the input dtype.

Tolerances. The truth is docs/method.md §4 in float64 on the same (already rounded) inputs. Two bounds must hold:
- flash-attention's rule: the route's error is at most 2x the error of the eager reference in the input dtype
  (which, like the public implementation, runs the head in that dtype), plus a small floor;
- fp32 accumulation: every route multiplies exactly-representable inputs and accumulates in fp32, so its error is
  at fp32 level whatever the input dtype. With H, F <= 200 and O(1) terms, the fp32 summation bound
  n * eps32 * sum|terms| is below 1e-4 for logits and mean log-probabilities; we assert that.
"""

import pytest
import torch
from helpers import max_abs_error, random_csr, random_head, truth

from sprm_kernels import sprm_score, sprm_score_reference
from sprm_kernels.reference import LOG_PROB_EPS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_LEVEL = 1e-4
FLOOR = 1e-5


def score(route, hidden, step_index, offsets, head, **kwargs):
    device, backend = route
    return sprm_score(
        hidden.to(device), step_index.to(device), offsets.to(device), *[t.to(device) for t in head],
        backend=backend, **kwargs,
    )  # fmt: skip


def check_against_truth(result, hidden, step_index, offsets, head, group_size=None):
    expected = truth(hidden, step_index, offsets, *head, group_size=group_size)
    low = sprm_score_reference(
        hidden.cpu(), step_index.cpu(), offsets.cpu(), *[t.cpu() for t in head], return_step_scores=True
    )
    assert result.score.dtype == result.log_score.dtype == torch.float32
    assert torch.equal(result.num_steps.cpu(), expected.num_steps)
    for field in ("log_score", "score", "step_scores"):
        err = max_abs_error(getattr(result, field), getattr(expected, field))
        err_low = max_abs_error(getattr(low, field), getattr(expected, field))
        assert err <= 2 * err_low + FLOOR, f"{field}: error {err:.3g} vs eager-in-dtype {err_low:.3g}"
        assert err <= FP32_LEVEL, f"{field}: error {err:.3g} is above fp32-accumulation level"
    if group_size is not None:
        check_best(result.best.cpu(), expected.score.view(-1, group_size))
    return expected


def check_best(best, truth_scores):
    """The chosen index is the truth's argmax, unless the top two are closer than fp32 noise."""
    for g, row in enumerate(truth_scores):
        top2 = row.topk(min(2, row.numel())).values
        if row.numel() > 1 and (top2[0] - top2[1]).abs() < 1e-5:
            assert row[best[g]] >= top2[0] - 1e-5
        else:
            assert best[g].item() == int(row.argmax())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [40, 67])  # neither is a power of two; 67 is not a multiple of 16
def test_padded_layout_against_truth(route, dtype, hidden_size):
    batch, length = 6, 23
    hidden = torch.randn(batch, length, hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    head = random_head(hidden_size, dtype)
    step_index, offsets = random_csr(batch * length, [5, 0, 1, 9, 3, 17], seed=2)  # one candidate has no steps
    result = score(route, hidden, step_index, offsets, head, group_size=3, return_step_scores=True)
    expected = check_against_truth(result, hidden, step_index, offsets, head, group_size=3)
    assert result.score[1] == 0 and result.log_score[1] == float("-inf")
    assert expected.score[0] > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_layout_with_row_strides(route, dtype):
    hidden_size = 48
    storage = torch.randn(70, 2, hidden_size + 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    hidden = storage[:, 1, 2 : 2 + hidden_size]  # [N, H], row stride 2*(H+5), offset start
    assert not hidden.is_contiguous() and hidden.stride(-1) == 1
    head = random_head(hidden_size, dtype, seed=4)
    step_index, offsets = random_csr(70, [7, 12, 1, 20], seed=5)
    result = score(route, hidden, step_index, offsets, head, group_size=2, return_step_scores=True)
    check_against_truth(result, hidden, step_index, offsets, head, group_size=2)


def test_non_contiguous_padded_layout(route):
    base = torch.randn(4, 30, 36, generator=torch.Generator().manual_seed(6))
    hidden = base[:, ::2, :]  # [B, 15, H] with stride 2 between rows and 60*H between sequences
    head = random_head(36, seed=7)
    step_index, offsets = random_csr(4 * 15, [3, 4, 5, 6], seed=8)
    result = score(route, hidden, step_index, offsets, head, return_step_scores=True)
    check_against_truth(result, hidden, step_index, offsets, head)
    assert result.best is None


@pytest.mark.parametrize("steps", [[1], [0], [40], [1] * 8, [0, 0, 0, 0]])
def test_one_candidate_one_step_and_empty(route, steps):
    hidden = torch.randn(50, 24, generator=torch.Generator().manual_seed(9))
    head = random_head(24, seed=10)
    step_index, offsets = random_csr(50, steps, seed=11)
    result = score(route, hidden, step_index, offsets, head, group_size=len(steps), return_step_scores=True)
    check_against_truth(result, hidden, step_index, offsets, head, group_size=len(steps))
    if sum(steps) == 0:
        assert result.best.tolist() == [0]  # all scores are 0: the lowest index wins the tie
        assert result.step_scores.numel() == 0


def test_no_steps_launches_one_program_without_columns():
    """S = 0: the launcher's grid is one program and its column range is empty (no W1 traffic); outputs written."""
    from sprm_kernels.kernels.sprm_score import prepare_sprm_score

    head = random_head(16)
    step_index, offsets = torch.empty(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    _, grid, args, _ = prepare_sprm_score(
        torch.randn(5, 16), step_index, offsets, head[0], head[1], head[2].view(-1), head[3],
        group_size=None, return_step_scores=False,
    )  # fmt: skip
    names = ("num_row_blocks", "num_splits", "num_granules")
    from sprm_kernels.kernels.sprm_score import sprm_score_kernel

    values = dict(zip(sprm_score_kernel.arg_names, args, strict=False))
    assert grid == (1,) and [values[n] for n in names] == [1, 1, 0]


def test_no_candidates(route):
    head = random_head(16)
    result = score(route, torch.randn(5, 16), torch.empty(0, dtype=torch.int64), torch.zeros(1, dtype=torch.long), head)
    assert result.score.shape == result.log_score.shape == result.num_steps.shape == (0,)


def test_duplicate_rows_are_scored_each_time(route):
    hidden = torch.randn(10, 20, generator=torch.Generator().manual_seed(12))
    head = random_head(20, seed=13)
    step_index, offsets = torch.tensor([3, 3, 3, 7, 3]), torch.tensor([0, 3, 5])
    result = score(route, hidden, step_index, offsets, head, return_step_scores=True)
    check_against_truth(result, hidden, step_index, offsets, head)


def test_group_argmax_ties_pick_the_lowest_index(route):
    hidden = torch.randn(8, 32, generator=torch.Generator().manual_seed(14))
    head = random_head(32, seed=15)
    # candidates 1 and 2 see identical rows in the same order: bit-identical scores; 3 is no better than them
    step_index = torch.tensor([0, 1, 4, 5, 4, 5, 2, 6, 7])
    offsets = torch.tensor([0, 2, 4, 6, 9])
    result = score(route, hidden, step_index, offsets, head, group_size=4)
    assert result.score[1] == result.score[2]
    best = result.best.item()
    assert result.score[best] == result.score.max()
    assert best == int(torch.nonzero(result.score == result.score.max())[0])


def test_outputs_are_fully_written(route, poisoned_allocations):
    hidden = torch.randn(3, 17, 40, generator=torch.Generator().manual_seed(16))
    head = random_head(40, seed=17)
    step_index, offsets = random_csr(51, [4, 0, 6, 2, 2, 9], seed=18)
    result = score(route, hidden, step_index, offsets, head, group_size=2, return_step_scores=True)
    check_against_truth(result, hidden, step_index, offsets, head, group_size=2)


def test_repeat_runs_are_bit_identical(route):
    hidden = torch.randn(2, 40, 56, generator=torch.Generator().manual_seed(19)).to(torch.bfloat16)
    head = random_head(56, torch.bfloat16, seed=20)
    step_index, offsets = random_csr(80, [11, 30, 0, 6], seed=21)
    first = score(route, hidden, step_index, offsets, head, group_size=2, return_step_scores=True)
    for _ in range(2):
        again = score(route, hidden, step_index, offsets, head, group_size=2, return_step_scores=True)
        for field in ("score", "log_score", "num_steps", "step_scores", "best"):
            assert torch.equal(getattr(first, field), getattr(again, field)), field


def test_log_sigmoid_is_stable_and_clamped(route):
    """logit = z exactly (H = 1 head: relu(z) - relu(-z)); log p matches float64 for |z| up to 100."""
    z = torch.linspace(-100, 100, 81)
    hidden = z.view(-1, 1)
    head = [torch.tensor([[1.0], [-1.0]]), torch.zeros(2), torch.tensor([[1.0, -1.0]]), torch.zeros(1)]
    step_index, offsets = torch.arange(81), torch.arange(82)
    result = score(route, hidden, step_index, offsets, head, return_step_scores=True)
    expected = torch.nn.functional.logsigmoid(z.double()).clamp(min=LOG_PROB_EPS)
    assert (result.log_score.cpu().double() - expected).abs().max() < 1e-6
    assert (result.step_scores.cpu().double() - torch.sigmoid(z.double())).abs().max() < 1e-6
    assert result.log_score[0] == pytest.approx(LOG_PROB_EPS, abs=1e-5)  # p < 1e-10 is clamped
    assert -1e-30 < result.log_score[-1] <= 0.0  # log sigmoid(100) = -3.7e-44, not a rounding of 1 - 1e-44


def test_nan_never_wins_and_is_reported(route):
    hidden = torch.randn(12, 16, generator=torch.Generator().manual_seed(22))
    head = random_head(16, seed=23)
    hidden[5, 3] = float("nan")  # a step row of candidate 1 ...
    hidden[11, 0] = float("nan")  # ... and a row nobody scores, which must not matter
    step_index = torch.tensor([0, 1, 5, 2, 3, 6, 7, 5, 5])
    offsets = torch.tensor([0, 2, 3, 5, 7, 8, 9])  # candidates 4 and 5 are all-NaN (one group of two)
    result = score(route, hidden, step_index, offsets, head, group_size=2, return_step_scores=True)
    assert torch.isnan(result.log_score[[1, 4, 5]]).all() and torch.isnan(result.score[[1, 4, 5]]).all()
    assert torch.isfinite(result.score[[0, 2, 3]]).all()
    assert result.best.tolist()[0] == 0  # candidate 1 (NaN) never beats candidate 0
    assert result.best.tolist()[2] == -1  # a group whose candidates are all NaN reports -1
    clean = hidden.clone()
    clean[11, 0] = 0.0
    again = score(route, clean, step_index, offsets, head, group_size=2)
    assert torch.equal(result.score[[0, 2, 3]], again.score[[0, 2, 3]])


@pytest.mark.bigmem
def test_offsets_past_2_31_elements_use_int64(route):
    """Row 1 starts 2^31 + 64 elements into the storage: an int32 offset would wrap and read row 0's memory."""
    device, backend = route
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 4.3 GB of device memory")
    hidden_size, row_stride = 64, 2**31 + 64
    storage = torch.empty(row_stride + hidden_size, dtype=torch.float16, device=device)
    hidden = storage.as_strided((2, hidden_size), (row_stride, 1))
    hidden.copy_(torch.randn(2, hidden_size, generator=torch.Generator().manual_seed(24)).half())
    storage[:hidden_size].copy_(hidden[0])
    storage[2**31 - 2**20 : 2**31].fill_(7.0)  # what a wrapped 32-bit offset could land on instead
    head = random_head(hidden_size, torch.float16, seed=25)
    step_index, offsets = torch.tensor([1, 0, 1]), torch.tensor([0, 1, 3])
    result = score(route, hidden, step_index, offsets, head, return_step_scores=True)
    compact = hidden.cpu().clone()
    check_against_truth(result, compact, step_index, offsets, head)
    del storage, hidden


def test_tile_configurations_give_the_same_answer():
    """Every schedule of the launcher agrees: one BLOCK_N tile per split, one split for all columns, uneven splits
    (granules of 8 columns over 3 splits), grouped orders with full, partial and oversized groups, a split
    reduction in several SPLIT_TILE steps."""
    from helpers import INTERPRETING

    if not INTERPRETING:
        pytest.skip("configurations are forced through the Triton launcher (CUDA or the interpreter)")
    from sprm_kernels.kernels.sprm_score import ScoreConfig, launch_sprm_score

    hidden = torch.randn(90, 40, generator=torch.Generator().manual_seed(26))
    head = random_head(40, seed=27)
    step_index, offsets = random_csr(90, [20, 1, 0, 33, 13], seed=28)
    expected = truth(hidden, step_index, offsets, *head)
    tiles = dict(num_warps=4, num_stages=2, block_k=16)
    configs = [
        ScoreConfig(block_s=16, block_n=16, num_splits=5, granule=16, group_splits=2, split_tile=2, **tiles),
        ScoreConfig(block_s=32, block_n=32, num_splits=1, granule=96, group_splits=1, **tiles),
        ScoreConfig(block_s=16, block_n=16, num_splits=3, granule=8, group_splits=4, split_tile=4, **tiles),
        ScoreConfig(block_s=16, block_n=32, num_splits=2, granule=8, group_splits=9, split_tile=2, **tiles,
                    block_b=2, block_j=4),  # final means: several tiles per candidate
    ]  # fmt: skip
    for cfg in configs:
        out = launch_sprm_score(
            hidden, step_index, offsets, head[0], head[1], head[2].view(-1), head[3],
            group_size=5, return_step_scores=True, config=cfg,
        )  # fmt: skip
        assert max_abs_error(out[1], expected.log_score) < FP32_LEVEL, cfg
        assert torch.equal(out[2], expected.num_steps)
        assert out[4].item() == int(expected.score.argmax())


BAD = [
    ("hidden", lambda a: a.update(hidden=torch.randn(4, 5, 6, 8)), "hidden"),
    ("hidden dtype", lambda a: a.update(hidden=a["hidden"].double()), "hidden"),
    ("hidden last stride", lambda a: a.update(hidden=torch.randn(8, 20).t()), "hidden"),
    ("w1 dtype", lambda a: a.update(w1=a["w1"].half()), "w1"),
    ("w1 shape", lambda a: a.update(w1=torch.randn(16, 9)), "w1"),
    ("b1 shape", lambda a: a.update(b1=torch.randn(15)), "b1"),
    ("w2 shape", lambda a: a.update(w2=torch.randn(2, 8)), "w2"),
    ("b2 shape", lambda a: a.update(b2=torch.randn(2)), "b2"),
    ("w1 device", lambda a: a.update(w1=a["w1"].to("meta")), "w1"),
    ("step_index dtype", lambda a: a.update(step_index=a["step_index"].int()), "step_index"),
    ("offsets decreasing", lambda a: a.update(offsets=torch.tensor([0, 3, 1, 4])), "offsets"),
    ("offsets end", lambda a: a.update(offsets=torch.tensor([0, 1, 2, 3])), "offsets"),
    ("offsets start", lambda a: a.update(offsets=torch.tensor([1, 2, 3, 4])), "offsets"),
    ("index too large", lambda a: a.update(step_index=torch.tensor([0, 1, 5, 8])), "step_index"),
    ("index negative", lambda a: a.update(step_index=torch.tensor([0, -1, 5, 2])), "step_index"),
    ("group size", lambda a: a.update(group_size=2), "group_size"),
    ("group size zero", lambda a: a.update(group_size=0), "group_size"),
]


@pytest.mark.parametrize("name,mutate,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_before_launch(name, mutate, argument, monkeypatch):
    import sprm_kernels.kernels.sprm_score as kernel_module
    from sprm_kernels import torch_ops

    def no_launch(*args, **kwargs):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(kernel_module, "launch_sprm_score", no_launch)
    monkeypatch.setattr(torch_ops, "sprm_score_torch", no_launch)
    w1, b1, w2, b2 = random_head(8, width=16)
    args = dict(hidden=torch.randn(8, 8), step_index=torch.tensor([0, 1, 5, 2]), offsets=torch.tensor([0, 1, 3, 4]),
                w1=w1, b1=b1, w2=w2, b2=b2, group_size=None)  # fmt: skip
    mutate(args)
    with pytest.raises(ValueError, match=argument):
        sprm_score(**args)
