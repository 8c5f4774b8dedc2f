"""SPRM-guided pruning of best-of-k on vLLM (docs/pruning.md), on both engines: pruned rows are prefixes of the
rows left to run (every row has its own seed), score exactly as the HF engine's `score()` on their ids, never win
while a kept row finished, and leave nothing in vLLM or in the worker (the aborts free their KV blocks).
Skipped, visibly, where vLLM is absent."""

import asyncio
import importlib.util
import math

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

from sprm_kernels.model import ReflectiveModel  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402
from sprm_kernels.model.shipped.task import problems  # noqa: E402

TOL = 1e-4
OPTIONS = dict(k=8, seed=0, max_think_tokens=72, max_answer_tokens=4, temperature=1.0, top_p=1.0)


@pytest.fixture(scope="module")
def hf():
    return ReflectiveModel.from_pretrained(SHIPPED_DIR, device="cpu")


def assert_same_scores(results, hf):
    for result in results:
        sequences = [result.prompt_token_ids + c.token_ids for c in result.candidates]
        for candidate, expected in zip(result.candidates, hf.score(sequences, return_all_scores=True), strict=True):
            assert candidate.score_positions == expected.score_positions
            assert math.isclose(candidate.score, expected.value, rel_tol=TOL, abs_tol=1e-6)
            assert all(abs(a - b) <= TOL for a, b in zip(candidate.step_scores, expected.all_scores, strict=True))


def check_pruned(full, pruned) -> int:
    """`pruned` against the same call without pruning (`full`); returns the rows pruned."""
    for x, y in zip(full.candidates, pruned.candidates, strict=True):
        if y.pruned:
            assert not y.finished and 0 < len(y.token_ids) < len(x.token_ids)
            assert x.token_ids[: len(y.token_ids)] == y.token_ids
        else:
            assert y.token_ids == x.token_ids
    kept = [c for c in pruned.candidates if not c.pruned]
    assert len(kept) >= 2 and not pruned.candidates[pruned.best].pruned
    finished = [c.score for c in kept if c.finished]
    chosen = pruned.candidates[pruned.best]
    assert not finished or (chosen.finished and chosen.score == max(finished))
    stats = pruned.stats
    assert stats.pruned_rows == len(pruned.candidates) - len(kept)
    assert stats.think_generated_tokens == sum(len(c.token_ids) for c in pruned.candidates)
    assert (stats.pruned_think_tokens > 0) == (stats.pruned_rows > 0)
    return stats.pruned_rows


@pytest.mark.parametrize("rule", ["halving", "margin"])
def test_sync_engine_prunes_rows_that_fall_behind(vllm_shipped, hf, rule):
    import sprm_kernels.model.engines.vllm.compat as compat

    prompts = [problem.prompt for problem in problems("test", 4, seed=5)]
    full = vllm_shipped.generate(prompts, **OPTIONS)
    pruned = vllm_shipped.generate(prompts, prune=rule, prune_keep=2, prune_margin=1.0, **OPTIONS)
    assert not any(c.pruned for r in full for c in r.candidates)
    assert_same_scores(pruned, hf)
    assert sum(check_pruned(a, b) for a, b in zip(full, pruned, strict=True)) >= len(prompts)
    assert not vllm_shipped.llm.llm_engine.has_unfinished_requests()
    assert compat.recorder_stats(vllm_shipped.llm)["records"] == 0


@pytest.mark.parametrize(
    "rule", [{"prune": "halving", "prune_keep": 2}, {"prune": "confidence", "confidence_percentile": 90.0}]
)
def test_async_engine_prunes_rows_that_fall_behind(vllm_async_shipped, vllm_shipped, hf, rule):
    engine = vllm_async_shipped
    prompts = [problem.prompt for problem in problems("test", 4, seed=5)]

    async def run():
        pruned = await asyncio.gather(*(engine.agenerate(p, **rule, **OPTIONS) for p in prompts))
        return pruned, await engine.engine_state()

    pruned, state = asyncio.run(run())
    assert state == {"unfinished_requests": 0, "records": 0}
    assert_same_scores(pruned, hf)
    full = [vllm_shipped.generate(p, **OPTIONS) for p in prompts]  # the same rows, left to run
    assert sum(check_pruned(a, b) for a, b in zip(full, pruned, strict=True)) >= len(prompts)


def test_the_workers_confidence_is_deepconfs_token_confidence(vllm_shipped, hf):
    """The window means the worker keeps equal those of -mean(top-20 log p) of the HF model's distribution at each
    position that sampled a token (the prompt's last one included), computed from a fresh forward."""
    import torch

    import sprm_kernels.model.engines.vllm.compat as compat
    import sprm_kernels.model.engines.vllm.rows as rows_
    from sprm_kernels.model import GenerationParams

    key, window = "confidence-probe", 16
    prompt = vllm_shipped.prompt_ids(problems("test", 1, seed=9)[0].prompt)
    params = GenerationParams(k=1, seed=3, max_think_tokens=40, temperature=1.0, top_p=1.0)
    compat.start_confidence(vllm_shipped.llm)
    try:
        out = compat.run(vllm_shipped.llm, [(prompt, rows_.think_sampling(vllm_shipped.rules, params, 0, 0, key))])[0]
        latest, lowest, tokens = compat.confidence(vllm_shipped.llm, [key], window)[key]
    finally:
        compat.drop(vllm_shipped.llm, [key])
    sequence = prompt + list(out.token_ids)
    with torch.no_grad():
        logits = hf.model(torch.tensor([sequence])).logits[0].float()
    confidence = -torch.log_softmax(logits, -1).topk(20, -1).values.mean(-1)[len(prompt) - 1 : len(sequence) - 1]
    means = confidence.unfold(0, window, 1).mean(-1)
    assert tokens == len(out.token_ids) == 40
    assert math.isclose(latest, means[-1].item(), rel_tol=1e-5) and math.isclose(
        lowest, means.min().item(), rel_tol=1e-5
    )


@pytest.mark.parametrize("percentile", [10.0, 90.0])
def test_confidence_pruning_runs_the_warm_up_rows_first_and_stops_the_others_below_their_threshold(
    vllm_shipped, hf, percentile
):
    prompts = [problem.prompt for problem in problems("test", 4, seed=5)]
    full = vllm_shipped.generate(prompts, **OPTIONS)
    pruned = vllm_shipped.generate(prompts, prune="confidence", confidence_percentile=percentile, confidence_warmup=2,
                                   **OPTIONS)  # fmt: skip
    assert_same_scores(pruned, hf)
    stopped = 0
    for a, b in zip(full, pruned, strict=True):
        assert not any(c.pruned for c in b.candidates[:2])  # warm-up rows run to the end
        stopped += check_pruned(a, b)
    assert stopped >= (len(prompts) if percentile == 90.0 else 1)


def test_the_server_takes_the_pruning_options(vllm_async_shipped):
    """`POST /generate` builds its options from GenerationParams, so `prune` is one of them (a bad value: 422)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from sprm_kernels.model.serving.app import create_app

    app = create_app(vllm_async_shipped)
    body = {"prompt": problems("test", 1, seed=5)[0].prompt, **OPTIONS, "prune": "margin", "prune_margin": 1.0}

    async def calls():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/generate", json=body), await c.post("/generate", json={**body, "prune": "best"})

    good, bad = asyncio.run(calls())
    assert good.status_code == 200, good.text
    candidates = good.json()["candidates"]
    stopped = [c for c in candidates if not c["finished"] and c["num_tokens"] < OPTIONS["max_think_tokens"]]
    assert len(candidates) == 8 and stopped  # rows the margin stopped early (the same prompt as above)
    assert bad.status_code == 422 and "prune" in bad.text


def test_return_confidence_gives_each_candidate_its_lowest_window_confidence(vllm_shipped, hf):
    import torch

    prompt = problems("test", 1, seed=11)[0].prompt
    result = vllm_shipped.generate(prompt, return_confidence=True, confidence_window=16, **{**OPTIONS, "k": 3})
    assert all(c.confidence is None for c in vllm_shipped.generate(prompt, **{**OPTIONS, "k": 2}).candidates)
    n = len(result.prompt_token_ids)
    for c in result.candidates:
        sequence = result.prompt_token_ids + c.token_ids
        with torch.no_grad():
            logits = hf.model(torch.tensor([sequence])).logits[0].float()
        confidence = -torch.log_softmax(logits, -1).topk(20, -1).values.mean(-1)[n - 1 : len(sequence) - 1]
        assert len(confidence) == len(c.token_ids) >= 16
        assert math.isclose(c.confidence, confidence.unfold(0, 16, 1).mean(-1).min().item(), rel_tol=1e-5)
