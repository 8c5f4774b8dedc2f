"""ReflectiveModel on tiny random Qwen2 / Llama policies with a character tokenizer built here (CPU, seconds).

The policy is random, so its thinking is noise; what is tested is the plumbing: the hooked features, the scoring
rule, streaming against batch scoring, the KV cache reuse for the answer, the checkpoint layout and the errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import requires_cuda
from torch import nn

from sprm_kernels import sprm_score_reference, step_positions_reference
from sprm_kernels.model import ReflectiveModel, SPRMHead, choose_best, sample_tokens
from sprm_kernels.model.engines.hf import decode as reflective_module
from sprm_kernels.model.engines.hf.compat import masks_packed_sequences
from sprm_kernels.model.shipped import tiny

HIDDEN = 32
MARKERS = tiny.MARKERS
TEMPLATE = tiny.CHAT_TEMPLATE
TEMPLATE_WITHOUT_THINK = TEMPLATE.replace("<think>", "")  # the policy must open its thinking itself
PROMPT = "1+2=3.\n\n4+5="  # a step inside the prompt: scored only when a row writes a second <think>


def make_tokenizer(markers=MARKERS):
    return tiny.make_char_tokenizer(markers)


def make_policy(arch: str, vocab_size: int, seed: int = 0, init_std: float = 0.02) -> nn.Module:
    return tiny.make_tiny_policy(arch, vocab_size, seed=seed, hidden_size=HIDDEN, init_std=init_std)


def make_head(seed: int = 1, hidden_size: int = HIDDEN) -> SPRMHead:
    return tiny.make_tiny_head(hidden_size, seed=seed)


def add_logit_bias(model, bias: dict[int, float]) -> None:
    vector = torch.zeros(model.config.vocab_size)
    for token, value in bias.items():
        vector[token] = value
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + vector.to(logits))


def bias_toward_steps(model, tokenizer) -> None:
    """Make the random policy write `.\\n\\n` often (several steps and some runs of step tokens per row)."""
    add_logit_bias(model, {tokenizer.convert_tokens_to_ids(".\n\n"): 1.5})


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def reflective(request, tokenizer):
    model = make_policy(request.param, len(tokenizer))
    bias_toward_steps(model, tokenizer)
    return ReflectiveModel(model, tokenizer, make_head())


def eager_score(model, head, tokenizer, ids: list[int]):
    """docs/method.md §3-4 by the references, on HF's own `output_hidden_states[-2]`."""
    input_ids = torch.tensor([ids])
    hidden = model(input_ids, output_hidden_states=True).hidden_states[-2]
    step_index, offsets = step_positions_reference(
        input_ids, step_token_ids=tokenizer.encode(".\n\n", add_special_tokens=False),
        think_start_id=tokenizer.convert_tokens_to_ids("<think>"),
        think_end_id=tokenizer.convert_tokens_to_ids("</think>"),
    )  # fmt: skip
    scores = sprm_score_reference(hidden, step_index, offsets, *head.kernel_weights(), return_step_scores=True)
    return scores.score.item(), scores.step_scores.tolist(), step_index.tolist()


TEXTS = [
    "<|user|>1+1<|end|><|assistant|><think>1+1=2.\n\n2+2=4.\n\n.\n\n</think>4.\n\n",
    "no markers.\n\nat all.\n\n",
    "<|assistant|><think>x.\n\n<think>y.\n\n</think>",  # two <think>: the span starts at 0
    "<think>.\n\n",  # the step right after <think> is not scored
    "7",
    "",
]


# -- features and scoring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@torch.inference_mode()
def test_hooked_features_are_hidden_states_minus_two(arch, tokenizer):
    model = make_policy(arch, len(tokenizer))
    reflective = ReflectiveModel(model, tokenizer, make_head())
    input_ids = torch.randint(0, len(tokenizer), (2, 17), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(reflective.penultimate_hidden_states(input_ids), expected, rtol=0, atol=0)


@torch.inference_mode()
def test_score_matches_eager_reference(reflective, tokenizer):
    results = reflective.score(TEXTS, return_all_scores=True, backend="torch")
    assert len(results) == len(TEXTS)
    for text, result in zip(TEXTS, results, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert result.token_ids == ids
        if not ids:
            assert (result.value, result.all_scores, result.score_positions) == (0.0, [], [])
            continue
        value, step_scores, positions = eager_score(reflective.model, reflective.head, tokenizer, ids)
        assert result.score_positions == positions
        assert result.value == pytest.approx(value, rel=1e-5, abs=1e-7)
        assert result.all_scores == pytest.approx(step_scores, rel=1e-5, abs=1e-7)
    assert results[0].score_positions and not results[4].score_positions  # both kinds present


@torch.inference_mode()
def test_score_batches_packed_and_padded_agree(reflective, tokenizer):
    one_batch = reflective.score(TEXTS, return_all_scores=True, backend="torch")
    for packed in (False, True):
        if packed and not masks_packed_sequences():  # transformers < 4.53 without flash-attention
            with pytest.raises(ValueError, match="packed: expected False"):
                reflective.score(TEXTS, packed=True)
            continue
        for budget in (1, 30, 10_000):  # 1: one sequence a batch
            results = reflective.score(
                TEXTS, return_all_scores=True, batch_tokens=budget, packed=packed, backend="torch"
            )
            for got, want in zip(results, one_batch, strict=True):
                assert got.score_positions == want.score_positions and got.token_ids == want.token_ids
                assert got.value == pytest.approx(want.value, rel=1e-5, abs=1e-7)
                assert got.all_scores == pytest.approx(want.all_scores, rel=1e-5, abs=1e-7)
    single = reflective.score(tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"], backend="torch")
    assert single.value == pytest.approx(one_batch[0].value, rel=1e-5) and single.all_scores is None
    assert reflective.score([]) == [] and reflective.score([[]])[0].value == 0.0


# -- generation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [TEMPLATE, TEMPLATE_WITHOUT_THINK], ids=["think-in-template", "policy-opens"])
@torch.inference_mode()
def test_streamed_scores_equal_batch_scores(reflective, template):
    reflective.tokenizer.chat_template = template
    try:
        result = reflective.generate(
            PROMPT, k=8, max_think_tokens=32, max_answer_tokens=4, temperature=1.0, top_p=0.95, seed=3, backend="torch"
        )
    finally:
        reflective.tokenizer.chat_template = TEMPLATE
    prompt_len = len(result.prompt_token_ids)
    for candidate in result.candidates:
        batch = reflective.score(result.prompt_token_ids + candidate.token_ids, return_all_scores=True, backend="torch")
        assert candidate.score_positions == batch.score_positions
        assert candidate.score == pytest.approx(batch.value, rel=1e-4, abs=1e-7)
        assert candidate.step_scores == pytest.approx(batch.all_scores, rel=1e-4, abs=1e-7)
    scored = [c for c in result.candidates if c.score_positions]
    assert scored, "no candidate has a scored step: the test exercises nothing"
    if template == TEMPLATE:  # a row that writes a second <think> moves the span to 0 and scores the prompt's step
        assert any(min(c.score_positions) < prompt_len - 1 for c in scored)
        assert any(min(c.score_positions) >= prompt_len - 1 for c in scored)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2-sliding"])
@torch.inference_mode()
def test_answer_from_reused_cache_equals_greedy_reprefill(arch, tokenizer, monkeypatch):
    # A larger init than HF's default, whose greedy continuation is one repeated token (that would hide a wrong
    # cache); no EOS, so that the whole budget is compared; </think> a little likelier, so rows stop at various steps.
    model = make_policy(arch, len(tokenizer), init_std=0.3)
    add_logit_bias(model, {tokenizer.eos_token_id: -1e4, tokenizer.convert_tokens_to_ids("</think>"): 1.0})
    reflective = ReflectiveModel(model, tokenizer, make_head())
    k, max_think, max_answer = 4, 24, 16
    for forced in range(k):  # every row's cache: rows that left the batch early, rows still in it at the end
        monkeypatch.setattr(reflective_module, "choose_best", lambda scores, finished, forced=forced: forced)
        result = reflective.generate(
            PROMPT, k=k, max_think_tokens=max_think, max_answer_tokens=max_answer, temperature=1.0, top_p=1.0,
            answer_temperature=0.0, seed=0, backend="torch",
        )  # fmt: skip
        chosen = result.candidates[forced]
        ids = result.prompt_token_ids + chosen.token_ids + ([] if chosen.finished else [reflective.think_end_id])
        expected = []
        for _ in range(max_answer):  # no cache at all: the whole sequence through the model each time
            expected.append(int(model(torch.tensor([ids + expected])).logits[0, -1].argmax()))
        assert result.best == forced and result.answer_token_ids == expected
        assert len(set(expected)) > 2  # not a constant continuation
        stats = result.stats
        assert stats.prefill_tokens == len(result.prompt_token_ids)
        assert stats.think_generated_tokens == sum(len(c.token_ids) for c in result.candidates)
        # rows that closed left the batch: each row went through the model with every token it wrote but its last
        assert stats.think_decode_tokens == stats.think_generated_tokens - k
        assert stats.answer_decode_tokens == max_answer + (0 if chosen.finished else 1)
        assert set(stats.seconds) == {"prefill", "think", "select", "answer"}
    lengths = [len(c.token_ids) for c in result.candidates]
    assert min(lengths) < max(lengths) and len(set(lengths)) > 2, lengths  # rows left the batch at various steps


@torch.inference_mode()
def test_answer_stops_at_eos(tokenizer):
    model = make_policy("qwen2", len(tokenizer))
    add_logit_bias(model, {tokenizer.eos_token_id: 50.0})  # EOS is no stop while thinking, only in the answer
    result = ReflectiveModel(model, tokenizer, make_head()).generate(
        PROMPT, k=2, max_think_tokens=5, max_answer_tokens=8, temperature=1.0, seed=0
    )
    assert result.answer_token_ids == [tokenizer.eos_token_id] and result.answer == ""
    assert all(c.token_ids == [tokenizer.eos_token_id] * 5 for c in result.candidates)


@torch.inference_mode()
def test_generate_is_deterministic_for_a_seed_and_picks_by_the_rule(reflective):
    kwargs = dict(mode="low", max_think_tokens=20, max_answer_tokens=3, temperature=1.0, top_p=0.9, backend="torch")
    first = reflective.generate(PROMPT, seed=7, **kwargs)
    again = reflective.generate([{"role": "user", "content": PROMPT}], seed=7, **kwargs)
    assert len(first.candidates) == 2  # mode low
    assert first.candidates == again.candidates
    assert (first.best, first.answer_token_ids) == (again.best, again.answer_token_ids)
    scores, finished = [c.score for c in first.candidates], [c.finished for c in first.candidates]
    assert first.best == choose_best(scores, finished)
    assert all(c.finished == (c.token_ids[-1] == reflective.think_end_id) for c in first.candidates)
    assert all(len(c.token_ids) <= 20 for c in first.candidates)
    other = reflective.generate(PROMPT, seed=8, **kwargs)
    assert [c.token_ids for c in other.candidates] != [c.token_ids for c in first.candidates]


@torch.inference_mode()
def test_unfinished_rows_get_a_forced_close_only_when_nothing_finished(tokenizer):
    model = make_policy("qwen2", len(tokenizer))
    add_logit_bias(model, {tokenizer.convert_tokens_to_ids("</think>"): -1e4})
    reflective = ReflectiveModel(model, tokenizer, make_head())
    result = reflective.generate(PROMPT, k=3, max_think_tokens=6, max_answer_tokens=3, temperature=1.0, seed=0)
    assert not any(c.finished for c in result.candidates)
    assert all(len(c.token_ids) == 6 for c in result.candidates)
    assert result.stats.answer_decode_tokens == 2 + len(result.answer_token_ids) - 1  # last thought + </think>


def test_choose_best_ranks_finished_first_and_never_picks_nan():
    nan = float("nan")
    assert choose_best([0.2, 0.9, 0.5], [True, False, True]) == 2
    assert choose_best([nan, 0.0, 0.0], [True, True, True]) == 1  # NaN below a stepless 0; ties: lowest index
    assert choose_best([nan, nan], [True, True]) == 0
    assert choose_best([0.3, 0.7], [False, False]) == 1


def test_sampling_top_p_keeps_the_nucleus_and_greedy_is_argmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_tokens(logits, temperature=1.0, top_p=0.8, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_tokens(logits, temperature=0.0)) == 0


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-38, 1e-30])
def test_sampling_at_a_tiny_temperature_is_greedy(temperature):
    """1e-300 is 0 in float32: logits / temperature overflowed to inf and NaN (multinomial refused them)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 5
    logits[0, 3] = 1e4  # a wide range, as real logits may have
    for top_p in (1.0, 0.9):
        assert torch.equal(
            sample_tokens(logits, temperature=temperature, top_p=top_p, generator=gen), logits.argmax(-1)
        )
    tied = torch.tensor([[0.0, 2.0, 2.0, 1.0]] * 200)  # the limit of softmax(x / t): uniform over the tied maxima
    assert set(sample_tokens(tied, temperature=temperature, generator=gen).tolist()) == {1, 2}


@pytest.mark.parametrize("top_p", [1e-300, 1e-50, 1e-8])
def test_sampling_with_a_tiny_top_p_keeps_the_top_token(top_p):
    """top_p 1e-300 is 0 in float32: every token was dropped (a zero distribution, refused by multinomial)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=gen)
    for temperature in (0.6, 1.0, 100.0):
        assert torch.equal(
            sample_tokens(logits, temperature=temperature, top_p=top_p, generator=gen), logits.argmax(-1)
        )


def test_generate_at_tiny_temperatures_and_top_p_matches_greedy(reflective):
    kwargs = dict(k=2, max_think_tokens=12, max_answer_tokens=4, seed=0, backend="torch")
    greedy = reflective.generate(PROMPT, temperature=0.0, **kwargs)
    for tiny_values in (
        dict(temperature=1e-300),
        dict(temperature=1.0, answer_temperature=1e-300, top_p=1e-300),
        dict(temperature=1e-45, answer_temperature=5e-324),
    ):
        result = reflective.generate(PROMPT, **kwargs, **tiny_values)
        assert [c.token_ids for c in result.candidates] == [c.token_ids for c in greedy.candidates], tiny_values
        assert result.answer_token_ids == greedy.answer_token_ids


def test_generate_and_score_emit_no_deprecation_warnings(reflective):
    """transformers 5.24 deprecated `past_key_values=` for `cache=` (a FutureWarning on every generate): the cache
    goes in under the name the installed version wants (`cache.cache_argument`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reflective.generate(PROMPT, k=2, max_think_tokens=6, max_answer_tokens=2, seed=0, backend="torch")
        reflective.score(PROMPT)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


@torch.inference_mode()
def test_generate_and_score_on_the_triton_route(tokenizer):
    """The default backend of the test session: the Triton interpreter on CPU, compiled Triton on CUDA."""
    reflective = ReflectiveModel(make_policy("qwen2", len(tokenizer)), tokenizer, make_head())
    bias_toward_steps(reflective.model, tokenizer)
    result = reflective.generate(
        PROMPT, k=3, max_think_tokens=10, max_answer_tokens=2, temperature=1.0, seed=5, backend="triton"
    )
    torch_route = reflective.generate(
        PROMPT, k=3, max_think_tokens=10, max_answer_tokens=2, temperature=1.0, seed=5, backend="torch"
    )
    assert [c.token_ids for c in result.candidates] == [c.token_ids for c in torch_route.candidates]
    for candidate, reference in zip(result.candidates, torch_route.candidates, strict=True):
        assert candidate.score == pytest.approx(reference.score, rel=1e-4, abs=1e-7)
    sequences = [result.prompt_token_ids + c.token_ids for c in result.candidates]
    for candidate, scored in zip(result.candidates, reflective.score(sequences, backend="triton"), strict=True):
        assert candidate.score == pytest.approx(scored.value, rel=1e-4, abs=1e-7)
    assert any(c.score_positions for c in result.candidates)


@requires_cuda
@torch.inference_mode()
def test_cuda_matches_cpu(tokenizer):
    cpu = ReflectiveModel(make_policy("qwen2", len(tokenizer)), tokenizer, make_head())
    gpu = ReflectiveModel(make_policy("qwen2", len(tokenizer)).cuda(), tokenizer, make_head())
    for got, want in zip(gpu.score(TEXTS), cpu.score(TEXTS), strict=True):
        assert got.score_positions == want.score_positions
        assert got.value == pytest.approx(want.value, rel=1e-4, abs=1e-6)
    result = gpu.generate(PROMPT, k=8, max_think_tokens=32, max_answer_tokens=4, temperature=1.0, seed=0)
    for candidate in result.candidates:
        batch = gpu.score(result.prompt_token_ids + candidate.token_ids)
        assert candidate.score == pytest.approx(batch.value, rel=1e-4, abs=1e-6)


# -- checkpoints ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_official_layout_loads_and_scores_like_the_sequential(tmp_path, tokenizer):
    model = make_policy("qwen2", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(2)
    sequential = nn.Sequential(
        nn.Linear(HIDDEN, 2 * HIDDEN), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(2 * HIDDEN, 1)
    ).eval()
    with torch.no_grad():
        sequential[0].weight.mul_(50)  # spread the probabilities on the small random features
    torch.save(sequential.state_dict(), tmp_path / "score_module.pt")

    reflective = ReflectiveModel.from_pretrained(str(tmp_path), device="cpu")
    assert reflective.model.dtype == torch.float32 and reflective.think_end_id == tokenizer.convert_tokens_to_ids(
        "</think>"
    )
    text = TEXTS[0]
    result = reflective.score(text, return_all_scores=True)
    # The reference server's computation, with the plain Sequential.
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    feature = model(input_ids, output_hidden_states=True).hidden_states[-2]
    step_index, _ = step_positions_reference(
        input_ids, step_token_ids=reflective.step_token_ids, think_start_id=reflective.think_start_id,
        think_end_id=reflective.think_end_id,
    )  # fmt: skip
    probs = torch.sigmoid(sequential(feature[0, step_index]).float()).flatten()
    assert result.score_positions == step_index.tolist()
    assert result.all_scores == pytest.approx(probs.tolist(), rel=1e-5)
    assert result.value == pytest.approx(probs.clamp(min=1e-10).log().mean().exp().item(), rel=1e-5)


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_or_messages=""), "prompt_or_messages"),
        (dict(prompt_or_messages="   "), "prompt_or_messages"),
        (dict(prompt_or_messages=[]), "prompt_or_messages"),
        (dict(prompt_or_messages=42), "prompt_or_messages"),
        (dict(k=0), "k: expected an int >= 1"),
        (dict(k=2.0), "k: expected an int >= 1"),
        (dict(mode="extreme"), "mode: expected one of"),
        (dict(max_think_tokens=0), "max_think_tokens"),
        (dict(max_answer_tokens=-1), "max_answer_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature: expected a finite float"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(answer_temperature=float("inf")), "answer_temperature: expected a finite float"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed="1"), "seed"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_generate_rejects_bad_arguments(reflective, kwargs, match):
    call = dict(prompt_or_messages=PROMPT, max_think_tokens=2, max_answer_tokens=1) | kwargs
    with pytest.raises(ValueError, match=match):
        reflective.generate(call.pop("prompt_or_messages"), **call)


def test_tokenizer_without_think_markers_is_rejected():
    tokenizer = make_tokenizer(markers=[".\n\n"])  # "<think>" now encodes to 7 character tokens
    model = make_policy("qwen2", len(tokenizer))
    with pytest.raises(ValueError, match=r"tokenizer: expected '<think>' to encode to a single token id"):
        ReflectiveModel(model, tokenizer, make_head())


def test_head_of_another_size_is_rejected(tokenizer):
    with pytest.raises(ValueError, match=r"head: expected hidden size H=32 .* got a head with H=16"):
        ReflectiveModel(make_policy("llama", len(tokenizer)), tokenizer, make_head(hidden_size=16))


def test_bad_score_inputs_and_options_are_rejected(reflective):
    with pytest.raises(ValueError, match="texts_or_token_ids"):
        reflective.score([1.5, "a"])
    with pytest.raises(ValueError, match="batch_tokens"):
        reflective.score("a", batch_tokens=0)
    with pytest.raises(ValueError, match="lang"):
        ReflectiveModel(reflective.model, reflective.tokenizer, make_head(), lang="fr")


def test_length_batches_bound_the_budget_and_the_padding():
    from sprm_kernels.model.engines.hf.scoring import length_batches

    lengths = [100, 95, 50, 48, 10, 0]  # the empty sequence gets no batch
    assert length_batches(lengths, budget=10_000, packed=False) == [[0, 1], [2, 3], [4]]  # padding <= 10%
    assert length_batches(lengths, budget=10_000, packed=True) == [[0, 1, 2, 3, 4]]
    assert length_batches(lengths, budget=150, packed=True) == [[0], [1, 2], [3, 4]]
    assert length_batches([300, 20], budget=100, packed=False) == [[0], [1]]  # over the budget: alone
