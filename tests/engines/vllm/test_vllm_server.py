"""`sprm serve --engine vllm`: the server's contract with the vLLM engine behind it (same routes, errors, results).

The server runs engine calls in its one worker thread (see docs/vllm.md); concurrent /score requests are
batched into one `score` call, which vLLM schedules together. Skipped, visibly, where vLLM is absent."""

import asyncio
import importlib.util
import math

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from sprm_kernels.model.serving.app import create_app  # noqa: E402

TEXTS = ["<think>04+8=12 y.\n\n12+1=13 y.\n\n</think>13", "<think>3+3=6 y.\n\n</think>6", "<think>9+9=18 y.\n\n"]


async def _calls(app):
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        scores = await asyncio.gather(
            *(c.post("/score", json={"text": t, "return_all_scores": True}) for t in TEXTS)
        )  # concurrent: queued while the engine is busy, then scored together
        generated = await c.post(
            "/generate", json={"prompt": "4+8+1=?", "k": 3, "seed": 0, "max_think_tokens": 40, "max_answer_tokens": 4}
        )
        bad = await c.post("/generate", json={"prompt": "4+8+1=?", "k": 0})
        health = await c.get("/health")
    return scores, generated, bad, health


def test_server_scores_and_generates_with_the_vllm_engine(vllm_shipped):
    scores, generated, bad, health = asyncio.run(_calls(create_app(vllm_shipped)))
    expected = vllm_shipped.score(TEXTS, return_all_scores=True)
    for response, want in zip(scores, expected, strict=True):
        assert response.status_code == 200
        body = response.json()
        assert body["score_positions"] == want.score_positions
        assert math.isclose(body["value"], want.value, rel_tol=1e-6)
    assert generated.status_code == 200 and len(generated.json()["candidates"]) == 3
    assert bad.status_code == 422 and "k" in str(bad.json()["detail"])
    assert health.status_code == 200 and health.json()["engine"] == "vllm"
