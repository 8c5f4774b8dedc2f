"""Step-level search (beam, DVTS) on the HF engine: forked rows continue exactly as unforked ones, the rule and the
choice are generate's, bad input is refused before any work."""

import json
import math

import pytest
import torch

from sprm_kernels.model import ReflectiveModel, load_engine
from sprm_kernels.model.engines.hf.search import SearchParams, SearchRows, StepSearch
from sprm_kernels.model.shipped import SHIPPED_DIR, tiny

PROMPT = "4+8+1+6+9+3=?"
SAMPLING = dict(temperature=1.0, top_p=1.0, max_think_tokens=100, max_answer_tokens=4)


@pytest.fixture(scope="module")
def rm():
    return load_engine(SHIPPED_DIR, device="cpu", backend="torch")  # the Triton route: test_search_on_triton


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def random_rm(request):
    """A random tiny policy biased toward `.\\n\\n` and `</think>`: rows reach their step tokens at different
    times, so rows wait with masked padding (holes in their KV) before being forked."""
    tokenizer = tiny.make_char_tokenizer()
    model = tiny.make_tiny_policy(request.param, len(tokenizer), seed=0, hidden_size=32)
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.convert_tokens_to_ids(".\n\n")] = 2.0
    bias[tokenizer.convert_tokens_to_ids("</think>")] = -2.0
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias.to(logits))
    return ReflectiveModel(model, tokenizer, tiny.make_tiny_head(32, seed=1), backend="torch")


@pytest.mark.parametrize("method", ["beam", "dvts"])
def test_forked_rows_with_holes_score_like_an_unforked_forward(random_rm, method):
    """Every finished beam went through forks and masked waits; its step scores must equal a plain forward over its
    final ids (same positions; fp32: the attention sums run over more, masked, keys)."""
    result = random_rm.search("4+5=", method=method, beam_width=3, expansions=3, seed=1, **SAMPLING)
    assert result.stats.padded_decode_tokens > 0  # rows did wait: their KV has holes
    assert any(len(c.score_positions) >= 2 for c in result.candidates)
    rescored = random_rm.score(
        [result.prompt_token_ids + c.token_ids for c in result.candidates], return_all_scores=True
    )
    for candidate, again in zip(result.candidates, rescored, strict=True):
        assert candidate.score_positions == again.score_positions
        assert candidate.step_scores == pytest.approx(again.all_scores, rel=1e-5, abs=1e-6)
        assert math.isclose(candidate.score, again.value, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("method", ["beam", "dvts"])
def test_forked_rows_score_like_an_unforked_forward(rm, method):
    """The same on the shipped model, whose steps have one length (rows mostly reach them together)."""
    result = rm.search(PROMPT, method=method, beam_width=3, expansions=3, seed=1, **SAMPLING)
    rescored = rm.score([result.prompt_token_ids + c.token_ids for c in result.candidates], return_all_scores=True)
    for candidate, again in zip(result.candidates, rescored, strict=True):
        assert candidate.score_positions == again.score_positions
        assert candidate.step_scores == pytest.approx(again.all_scores, rel=1e-5, abs=1e-6)
        assert math.isclose(candidate.score, again.value, rel_tol=1e-5, abs_tol=1e-7)


def test_answer_from_forked_cache_equals_greedy_reprefill(random_rm):
    """The chosen row's KV (forked, with holes, compacted) continues token for token like a fresh prefill of prompt
    + its thinking."""
    rm = random_rm
    result = rm.search(
        "4+5=", beam_width=2, expansions=3, seed=3, answer_temperature=0.0, **dict(SAMPLING, max_answer_tokens=12)
    )
    assert result.stats.padded_decode_tokens > 0
    chosen = result.candidates[result.best]
    ids = torch.tensor([result.prompt_token_ids + chosen.token_ids + ([] if chosen.finished else [rm.think_end_id])])
    answer = []
    with torch.inference_mode():
        for _ in range(len(result.answer_token_ids)):
            token = int(rm.model(input_ids=ids).logits[0, -1].argmax())
            answer.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert answer == result.answer_token_ids


def test_width_one_greedy_search_is_greedy_generation(rm):
    """One beam, one child, greedy: no choice is ever made, so the search is plain greedy decoding."""
    searched = rm.search(PROMPT, beam_width=1, expansions=1, seed=0, **dict(SAMPLING, temperature=0.0))
    generated = rm.generate(PROMPT, k=1, seed=0, **dict(SAMPLING, temperature=0.0))
    assert searched.candidates[0].token_ids == generated.candidates[0].token_ids
    assert searched.candidates[0].score == pytest.approx(generated.candidates[0].score, rel=1e-6)
    assert searched.answer_token_ids == generated.answer_token_ids
    assert searched.stats.think_generated_tokens == len(generated.candidates[0].token_ids)


def test_pruned_rows_tokens_are_counted(random_rm):
    """Every sampled thinking token counts, pruned rows' too: with two survivors of six rows per round, the rows
    sample more tokens than the finished beams hold together."""
    result = random_rm.search("4+5=", method="beam", beam_width=2, expansions=3, seed=2, **SAMPLING)
    assert result.stats.rounds >= 2
    assert result.stats.think_generated_tokens > sum(len(c.token_ids) for c in result.candidates)


def test_search_on_the_triton_route():
    """The streaming scorer through the Triton kernel (interpreted on CPU) gives the torch route's result."""
    torch_rm = load_engine(SHIPPED_DIR, device="cpu", backend="torch")
    options = dict(beam_width=1, expansions=2, seed=0, **dict(SAMPLING, max_think_tokens=30))
    expected = torch_rm.search(PROMPT, **options)
    got = torch_rm.search(PROMPT, backend="triton", **options)
    assert [c.token_ids for c in got.candidates] == [c.token_ids for c in expected.candidates]
    for a, b in zip(got.candidates, expected.candidates, strict=True):
        assert a.step_scores == pytest.approx(b.step_scores, rel=1e-5, abs=1e-6)


def test_search_is_deterministic_for_a_seed_and_counts_pruned_tokens(rm):
    first = rm.search(PROMPT, method="dvts", beam_width=2, expansions=2, seed=7, **SAMPLING)
    again = rm.search(PROMPT, method="dvts", beam_width=2, expansions=2, seed=7, **SAMPLING)
    assert [c.token_ids for c in first.candidates] == [c.token_ids for c in again.candidates]
    assert first.answer_token_ids == again.answer_token_ids
    assert first.stats.think_decode_tokens <= first.stats.think_generated_tokens


def test_budget_exhaustion_gives_unfinished_candidates_and_an_answer(rm):
    result = rm.search(PROMPT, beam_width=2, expansions=2, seed=0, **dict(SAMPLING, max_think_tokens=20))
    assert result.candidates and not any(c.finished for c in result.candidates)
    assert all(len(c.token_ids) == 20 for c in result.candidates)
    assert len(result.answer_token_ids) >= 1


def test_survivors_rank_by_score_nan_last_ties_lowest(rm):
    rows = SearchRows(rm, [1, 2, 3], 5, 4, cache=None, logits=torch.zeros(5, 3), hidden=torch.zeros(5, 2))
    rows.count[:] = 1
    rows.sum_log[:] = torch.tensor([0.5, 0.9, float("nan"), 0.9, 0.1]).log()
    rows.subtree = torch.tensor([0, 0, 1, 1, 1])
    search = StepSearch.__new__(StepSearch)
    search.rm = rm
    search.shape = SearchParams(method="beam", beam_width=3)
    assert search.survivors(rows, torch.arange(5)).tolist() == [1, 3, 0]
    search.shape = SearchParams(method="dvts", beam_width=2)
    assert search.survivors(rows, torch.arange(5)).tolist() == [1, 3]
    assert search.survivors(rows, torch.tensor([2, 4])).tolist() == [4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "mcts"}, "method:"),
        ({"beam_width": 0}, "beam_width:"),
        ({"expansions": 0}, "expansions:"),
        ({"aggregate": "max"}, "aggregate:"),
        ({"temperature": -1.0}, "temperature:"),
        ({"max_think_tokens": 0}, "max_think_tokens:"),
    ],
)
def test_bad_search_arguments_are_named(rm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rm.search(PROMPT, **kwargs)


def test_cli_generate_search_prints_the_search(capsys):
    from sprm_kernels.model.cli.main import main

    argv = ["generate", PROMPT, "--search", "dvts", "--beam-width", "2", "--expansions", "2", "--seed", "0",
            "--max-think-tokens", "60", "--max-answer-tokens", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["rounds"] >= 1 and len(out["candidates"]) >= 2
    assert main(["generate", PROMPT, "--search", "beam", "--k", "4"]) == 2
    assert "--search" in capsys.readouterr().err


def test_compute_view_goals_from_hand_made_rows():
    """Best-of-8 reaches 0.8 with 800 tokens; beam reaches 0.8 at 400 tokens (50%) and lies above the interpolated
    best-of-k curve at 2 of its 3 budgets (at 100 tokens it is below: 0.3 < 0.5)."""
    from sprm_kernels.model.evaluation.compute_view import goals

    rows = [{"method": "sprm", "budget": f"k={k}", "tokens": 100.0 * k, "accuracy": a}
            for k, a in ((1, 0.5), (2, 0.6), (4, 0.7), (8, 0.8))]  # fmt: skip
    rows += [{"method": "beam", "budget": f"B={b}", "tokens": t, "accuracy": a}
             for b, t, a in ((1, 100.0, 0.3), (2, 200.0, 0.7), (4, 400.0, 0.85))]  # fmt: skip
    assert goals(rows) == {"beam": {"tokens_share_to_reach_best_of_8": 0.5, "budgets_above_best_of_k": 2}}
