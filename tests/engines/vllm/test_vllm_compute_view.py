"""The compute view (`sprm eval --search`, `evaluation.compute_view`) on the vLLM engine, on a few problems: search
costs are the engine's own counts, one beam is the same search for beam and DVTS, the overhead is a share of the
search's thinking time, and the CLI closes the engine it loaded. Skipped, visibly, where vLLM is absent."""

import importlib.util
import json

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

from sprm_kernels.model.cli.main import main  # noqa: E402
from sprm_kernels.model.evaluation.compute_view import compute_view, think_budget  # noqa: E402
from sprm_kernels.model.shipped import task  # noqa: E402

N, DIFFICULTY = 3, 6


@pytest.fixture(scope="module")
def view(vllm_shipped):
    return compute_view(rm=vllm_shipped, n=N, ks=(1, 2), widths=(1, 2), seed=0, difficulty=DIFFICULTY, progress=False)


def test_search_rows_count_every_token_the_engine_sampled(view, vllm_shipped):
    """The B=2 beam row's tokens are the mean of `stats.think_generated_tokens` over the same searches (same seeds:
    vLLM's per-request seeds make a search reproducible), so pruned rows are in the cost."""
    assert view["engine"] == "vllm" and view["n"] == N
    rows = {(r["method"], r["budget"]): r for r in view["rows"]}
    assert set(rows) == {(m, f"k={k}") for m in ("sprm", "majority", "sprm_vote") for k in (1, 2)} | {
        (m, f"B={b},E=2") for m in ("beam", "dvts") for b in (1, 2)
    }
    problems = task.problems("test", N, seed=0, difficulty=DIFFICULTY)
    tokens = []
    for i, problem in enumerate(problems):
        result = vllm_shipped.search(
            problem.prompt, method="beam", beam_width=2, expansions=2, temperature=view["temperature"], top_p=1.0,
            seed=i, max_think_tokens=think_budget(DIFFICULTY), max_answer_tokens=0,
        )  # fmt: skip
        assert result.stats.think_generated_tokens >= max(len(c.token_ids) for c in result.candidates)
        tokens.append(result.stats.think_generated_tokens)
    assert rows[("beam", "B=2,E=2")]["tokens"] == pytest.approx(np.mean(tokens))
    # one beam: beam search and DVTS are the same algorithm, with the same request seeds
    for key in ("accuracy", "tokens"):
        assert rows[("beam", "B=1,E=2")][key] == rows[("dvts", "B=1,E=2")][key]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in view["rows"])


def test_overhead_is_a_share_of_the_thinking_time(view):
    """1 - seconds["engine"] / seconds["think"] summed over the searches: in [0, 1) on vLLM (no "forward" key)."""
    assert set(view["search_overhead"]) == {"beam", "dvts"}
    assert all(0.0 <= share < 1.0 for share in view["search_overhead"].values())
    assert all(r["seconds"] > 0 for r in view["rows"] if r["method"] in ("beam", "dvts"))


def test_cli_compute_view_on_vllm_closes_the_engine_it_loaded(vllm_shipped, monkeypatch, capsys):
    import sprm_kernels.model.engines.registry as registry

    loaded, closed = [], []
    monkeypatch.setattr(registry, "load_engine", lambda path, **kwargs: loaded.append(kwargs) or vllm_shipped)
    monkeypatch.setattr(vllm_shipped, "close", lambda: closed.append(True))  # the session's engine stays open
    argv = ["eval", "--engine", "vllm", "--n", "2", "--ks", "1,2", "--search", "beam", "--widths", "1",
            "--difficulty", str(DIFFICULTY), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert loaded == [{"engine": "vllm", "device": "cpu", "backend": "torch"}] and closed == [True]
    assert "vllm engine" in out and "beam search overhead (outside vLLM's calls)" in out
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "vllm" and [r["budget"] for r in result["rows"] if r["method"] == "beam"] == ["B=1,E=2"]
