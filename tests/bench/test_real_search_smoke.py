"""bench.real_search on a tiny random model with the HF engine (seconds), so that its code cannot rot: every flow
the engine has runs, the CSV rows are well formed and count what the engine counted, and the vLLM-only flows are
refused on HF before any work. The vLLM run is the measurement in docs/real_model.md."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed: import it from the checkout
from bench import real_search  # noqa: E402
from sprm_kernels.model.shipped import tiny  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny.save_tiny_reflective(tmp_path_factory.mktemp("real_search") / "model"))


def test_real_search_runs_every_hf_flow_and_writes_its_rows(model_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "real_search.csv"
    try:
        argv = ["--model", model_dir, "--engine", "hf", "--prompts", "2", "--k", "2", "--max-think-tokens", "6",
                "--threads", "1", "--csv", str(path)]  # fmt: skip
        assert real_search.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["flow"] for r in rows] == ["best-of-k", "beam", "dvts"]
    assert all(r["engine"] == "hf" and r["prompts"] == "2" and float(r["seconds"]) > 0 for r in rows)
    tokens = {r["flow"]: float(r["think_tokens_per_prompt"]) for r in rows}
    assert 0 < tokens["best-of-k"] <= 2 * 6  # k rows of at most 6 thinking tokens
    assert 0 < tokens["beam"] and 0 < tokens["dvts"]
    assert rows[0]["rounds_per_prompt"] == "" and float(rows[1]["rounds_per_prompt"]) >= 1
    assert "| best-of-k |" in out and "| dvts |" in out and "machine:" in out


@pytest.mark.parametrize("flows", ["best-of-k-margin", "beam,best-of-k-batched", "beam,greedy"])
def test_real_search_refuses_flows_the_engine_does_not_have(flows, capsys):
    with pytest.raises(SystemExit) as error:
        real_search.parse(["--model", "x", "--engine", "hf", "--flows", flows])
    assert error.value.code == 2 and "--flows" in capsys.readouterr().err
