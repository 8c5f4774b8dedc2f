"""The vLLM engine against the HF engine: every candidate's score, step scores and positions equal the HF engine's
`score()` on its final ids; choice, answers from the cache, many prompts at once, features, bad input.

Skipped, visibly, where vLLM is absent (CI runs them in a second venv: .ci/run). One vLLM engine per model for the
module (each start costs ~20 s on 2 CPU cores)."""

import importlib.util
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sprm_kernels.model import GenerationParams, ReflectiveModel, choose_best  # noqa: E402
from sprm_kernels.model.engines.base import supports_prompt_lists, supports_search  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402
from sprm_kernels.model.shipped.task import problems  # noqa: E402
from sprm_kernels.model.shipped.tiny import make_tiny_head, save_tiny_reflective  # noqa: E402

TOL = 1e-4
BLOCK = 32  # vLLM's KV block on CPU, as the engine sets it (compat.CPU_BLOCK_SIZE)
PROMPTS = ["1+2=?", "3+4+5=?", "9=?", [{"role": "user", "content": "0+0=?"}], "77+1=?"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    # head_dim 32 (hidden 128, 4 heads): vLLM's CPU attention refuses 16 and below.
    path = save_tiny_reflective(tmp_path_factory.mktemp("tiny") / "qwen2", hidden_size=128, num_layers=3)
    # A head scaled to this model's features (step probabilities spread over (0, 1)), saved as
    # sprm_head.safetensors beside model.safetensors: the layout vLLM's loader must be kept off.
    make_tiny_head(128, seed=1, feature_std=0.5).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engines(tiny_path):
    from sprm_kernels.model.engines.vllm import VLLMReflectiveModel

    # A small step budget splits prefills over steps (the recorder joins them; seeded rows survive it on CPU).
    engine = VLLMReflectiveModel.from_pretrained(tiny_path, max_model_len=256, max_num_batched_tokens=256)
    yield engine, ReflectiveModel.from_pretrained(tiny_path, device="cpu")
    engine.close()


def assert_same_scores(results, hf):
    """Every candidate of every result scores as the HF engine scores its final ids."""
    for result in results:
        sequences = [result.prompt_token_ids + c.token_ids for c in result.candidates]
        for candidate, expected in zip(result.candidates, hf.score(sequences, return_all_scores=True), strict=True):
            assert candidate.score_positions == expected.score_positions
            assert math.isclose(candidate.score, expected.value, rel_tol=TOL, abs_tol=1e-6)
            assert len(candidate.step_scores) == len(expected.all_scores)
            for got, want in zip(candidate.step_scores, expected.all_scores, strict=True):
                assert abs(got - want) <= TOL


def test_many_prompts_at_once_score_choose_and_answer_like_the_hf_engine(engines):
    vllm_engine, hf = engines
    results = vllm_engine.generate(
        PROMPTS, k=6, seed=0, max_think_tokens=48, max_answer_tokens=6, temperature=1.0, top_p=1.0
    )
    assert len(results) == len(PROMPTS)
    assert_same_scores(results, hf)
    candidates = [c for r in results for c in r.candidates]
    assert any(c.finished for c in candidates) and any(not c.finished for c in candidates)  # both kinds covered
    assert sum(len(c.score_positions) for c in candidates) > 20
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.prompt_token_ids == vllm_engine.prompt_ids(prompt)
        assert result.best == choose_best([c.score for c in result.candidates], [c.finished for c in result.candidates])
        for c in result.candidates:
            assert c.finished == (c.token_ids[-1] == vllm_engine.think_end_id)
            assert vllm_engine.think_end_id not in c.token_ids[:-1]  # stopped at the first </think>
            assert len(c.token_ids) == 48 or c.finished  # unfinished rows ran to the budget
            assert c.answer is None and c.step_features is None
        assert 1 <= len(result.answer_token_ids) <= 6
        stats = result.stats
        assert stats.think_generated_tokens == sum(len(c.token_ids) for c in result.candidates)
        # The answer's prompt is prompt + chosen thinking: the prefix cache serves every full KV block the thinking
        # request wrote (all its tokens but the last, never fed), and only the rest goes through the model.
        chosen = result.candidates[result.best]
        written = len(result.prompt_token_ids) + len(chosen.token_ids) - 1
        assert stats.answer_cached_tokens == written // BLOCK * BLOCK
        answer_prompt = written + 1 + (0 if chosen.finished else 1)
        assert (
            stats.answer_cached_tokens + stats.answer_decode_tokens == answer_prompt + len(result.answer_token_ids) - 1
        )
    assert sum(r.stats.answer_cached_tokens for r in results) > 0


def test_single_prompt_gives_one_result_and_a_seed_reproduces_it(engines):
    vllm_engine, _ = engines
    options = dict(k=3, seed=7, max_think_tokens=20, max_answer_tokens=3, temperature=1.0, top_p=0.9)
    first, second = vllm_engine.generate("5+5=?", **options), vllm_engine.generate("5+5=?", **options)
    assert not isinstance(first, list)
    assert [c.token_ids for c in first.candidates] == [c.token_ids for c in second.candidates]
    assert first.answer_token_ids == second.answer_token_ids
    assert len({tuple(c.token_ids) for c in first.candidates}) > 1  # rows sample differently


def test_answer_all_answers_every_candidate_and_keeps_the_chosen_answer(engines):
    vllm_engine, hf = engines
    result = vllm_engine.generate(
        "2+2=?", k=3, seed=1, max_think_tokens=30, max_answer_tokens=4, temperature=1.0, top_p=1.0, answer_all=True
    )
    assert all(c.answer_token_ids for c in result.candidates)
    assert result.candidates[result.best].answer_token_ids == result.answer_token_ids
    assert_same_scores([result], hf)


def test_scoring_rule_edge_cases_match_the_hf_engine(engines):
    vllm_engine, hf = engines
    texts = [
        "<think>1+2=3.\n\n3+4=7.\n\n</think>7",
        "12.\n\n.\n\n3<think>4.\n\n5.\n\n</think>",  # steps before <think>, a run of step tokens
        "<think>1.\n\n<think>2.\n\n</think>3.\n\n",  # a second <think>: start = 0; a step after </think>
        "1.\n\n2.\n\n</think>",  # no <think>; a step straddling the end
        "",
        "7",
    ]
    got, want = vllm_engine.score(texts, return_all_scores=True), hf.score(texts, return_all_scores=True)
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids and a.score_positions == b.score_positions
        assert math.isclose(a.value, b.value, rel_tol=TOL, abs_tol=1e-6)
        assert all(abs(x - y) <= TOL for x, y in zip(a.all_scores, b.all_scores, strict=True))
    single = vllm_engine.score(texts[0])
    assert single.all_scores is None and math.isclose(single.value, want[0].value, rel_tol=TOL)
    ids = vllm_engine.encode([texts[1]])[0]
    assert vllm_engine.score(ids, return_all_scores=True).score_positions == want[1].score_positions


def test_markers_in_the_prompt_score_prompt_positions_even_from_the_prefix_cache(engines):
    """A prompt with steps and its own `<think>`: a row writing `<think>` again moves the span start to 0, so prompt
    positions are scored, and k rows share the prompt (the prefix cache may serve it to all but one)."""
    vllm_engine, hf = engines
    prompt = "".join(f"{i % 10}.\n\n" for i in range(20)) + "<think>1.\n\n"
    options = dict(k=4, max_think_tokens=40, max_answer_tokens=2, temperature=1.0, top_p=1.0)
    first = vllm_engine.generate(prompt, seed=3, **options)
    again = vllm_engine.generate([prompt, prompt], seed=4, **options)  # the prompt's first block is cached now
    prompt_len = len(first.prompt_token_ids)
    assert prompt_len > BLOCK and any(t < prompt_len for c in first.candidates for t in c.score_positions)
    assert again[0].stats.prefill_tokens <= 4 * (prompt_len - BLOCK)  # so those positions never ran again
    assert_same_scores([first, *again], hf)


def test_features_are_the_layer_l_minus_2_rows_at_the_scored_positions(engines):
    vllm_engine, hf = engines
    result = vllm_engine.generate(
        "8+1=?", k=3, seed=2, max_think_tokens=40, max_answer_tokens=1, temperature=1.0, top_p=1.0,
        return_features=True,
    )  # fmt: skip
    assert sum(len(c.score_positions) for c in result.candidates) > 0
    for c in result.candidates:
        ids = torch.tensor([result.prompt_token_ids + c.token_ids])
        rows = hf.penultimate_hidden_states(ids)[0][c.score_positions]
        assert c.step_features.shape == rows.shape
        torch.testing.assert_close(c.step_features, rows, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k:"),
        ({"mode": "x"}, "mode:"),
        ({"temperature": -1.0}, "temperature:"),
        ({"top_p": 1.5}, "top_p:"),
        ({"max_think_tokens": 0}, "max_think_tokens:"),
        ({"max_answer_tokens": -1}, "max_answer_tokens:"),
        ({"seed": 1.5}, "seed:"),
        ({"answer_all": 1}, "answer_all:"),
    ],
)
def test_bad_generate_options_give_the_hf_engine_errors(engines, kwargs, match):
    vllm_engine, hf = engines
    messages = []
    for engine in (vllm_engine, hf):
        with pytest.raises(ValueError, match=match) as error:
            engine.generate("1+1=?", **{"max_think_tokens": 4, "max_answer_tokens": 1, **kwargs})
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    with pytest.raises(ValueError, match=match):
        GenerationParams(**{"max_think_tokens": 4, "max_answer_tokens": 1, **kwargs})


def test_bad_prompts_and_score_inputs_give_the_hf_engine_errors(engines):
    vllm_engine, hf = engines
    for engine in (vllm_engine, hf):
        with pytest.raises(ValueError, match="prompt_or_messages"):
            engine.generate("   ", max_think_tokens=2)
        with pytest.raises(ValueError, match="texts_or_token_ids"):
            engine.score(3.5)
        with pytest.raises(ValueError, match="texts_or_token_ids"):
            engine.score(["ok", 1.5])
        with pytest.raises(ValueError, match="batch_tokens"):
            engine.score("ok", batch_tokens=0)
    with pytest.raises(ValueError, match="prompt_or_messages"):
        vllm_engine.generate([], max_think_tokens=2)
    with pytest.raises(ValueError, match="texts_or_token_ids: item 0 has 300 tokens"):
        vllm_engine.score([[5] * 300])
    with pytest.raises(ValueError, match="progress"):
        vllm_engine.generate("1+1=?", progress="yes")


def test_info_describes_the_vllm_engine(engines, tiny_path):
    vllm_engine, hf = engines
    info, hf_info = vllm_engine.info(), hf.info()
    assert info.engine == "vllm" and supports_prompt_lists(vllm_engine) and supports_search(vllm_engine)
    assert (info.hidden_size, info.num_layers, info.dtype) == (hf_info.hidden_size, hf_info.num_layers, "float32")
    assert info.context_length == 256 and info.path == tiny_path


def test_shipped_model_many_prompts_match_the_hf_engine(vllm_shipped):
    """The shipped model's folder holds sprm_head.safetensors beside model.safetensors (vLLM reads both)."""
    hf = ReflectiveModel.from_pretrained(SHIPPED_DIR, device="cpu")
    prompts = [problem.prompt for problem in problems("test", 6, seed=5)]  # the task it was trained on: 6 terms
    results = vllm_shipped.generate(prompts, k=4, seed=0, max_think_tokens=60, max_answer_tokens=4)
    assert_same_scores(results, hf)
    assert sum(len(c.score_positions) for r in results for c in r.candidates) >= 4 * len(prompts)
    for r in results:  # every full KV block of the chosen thinking came from the prefix cache
        written = len(r.prompt_token_ids) + len(r.candidates[r.best].token_ids) - 1
        assert r.stats.answer_cached_tokens == written // BLOCK * BLOCK
    assert sum(r.stats.answer_cached_tokens for r in results) > 0
    sums = [str(sum(int(term) for term in p.removesuffix("=?").split("+"))) for p in prompts]
    assert sum(r.answer.strip() == total for total, r in zip(sums, results, strict=True)) >= 4  # the model works


def test_train_collect_takes_the_vllm_engine(engines):
    """`train collect --engine vllm`: rollouts with the layer L-2 rows of every scored step."""
    from sprm_kernels.model.training.collect import collect

    vllm_engine, hf = engines
    rollouts = collect(
        vllm_engine, ["1+2=?", "3+4=?"], lambda prompt, answer: True, 3, label_from="thinking",
        max_think_tokens=30, temperature=1.0, top_p=1.0, progress=False,
    )  # fmt: skip
    assert rollouts.features.shape[1] == 128 and rollouts.features.shape[0] == rollouts.offsets[-1]
    assert rollouts.features.shape[0] > 0


def test_the_step_path_reads_nothing_back_from_the_device(engines):
    """The worker reads its device buffers once per fetch (a prompt's rows once they are done), never per step."""
    import sprm_kernels.model.engines.vllm.compat as compat

    vllm_engine, hf = engines
    before = compat.recorder_stats(vllm_engine.llm)
    results = vllm_engine.generate(PROMPTS[:3], k=4, seed=5, max_think_tokens=40, max_answer_tokens=2,
                                   temperature=1.0, top_p=1.0)  # fmt: skip
    after = compat.recorder_stats(vllm_engine.llm)
    steps, reads = after["steps"] - before["steps"], after["host_reads"] - before["host_reads"]
    assert steps >= 40 and 1 <= reads <= len(results) and after["records"] == 0
    assert_same_scores(results, hf)
