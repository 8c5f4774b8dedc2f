"""`sprm eval --search` (the compute view, `evaluation.compute_view`) on the HF engine, on a few problems of the
shipped model, and its argument errors (one line, naming the argument, before any work). The vLLM run is in
tests/engines/vllm/test_vllm_compute_view.py."""

from __future__ import annotations

import json

import pytest

from sprm_kernels.model.cli.main import main


def test_compute_view_on_hf_prints_rows_and_the_forward_overhead(capsys):
    argv = ["eval", "--n", "2", "--ks", "1,2", "--search", "beam,dvts", "--widths", "1", "--difficulty", "6",
            "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "hf" and result["n"] == 2
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    # one beam: beam search and DVTS are the same algorithm (same seeds, same rounds)
    assert rows[("beam", "B=1,E=2")]["tokens"] == rows[("dvts", "B=1,E=2")]["tokens"] > 0
    assert rows[("beam", "B=1,E=2")]["accuracy"] == rows[("dvts", "B=1,E=2")]["accuracy"]
    assert all(0.0 <= share < 1.0 for share in result["search_overhead"].values())
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "hf engine" in out and "beam search overhead (all but the model's forwards)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--search", "beam,greedy"], "--search: expected beam, dvts or beam,dvts, got 'beam,greedy'"),
        (["--engine", "vllm", "--search", "best"], "--search: expected beam, dvts or beam,dvts"),
        (["--search", "beam", "--ray"], "--search: not with --ray"),
        (["--search", "beam", "--widths", "0"], "argument --widths"),
        (["--search", "beam", "--expansions", "0"], "argument --expansions"),
    ],
)
def test_compute_view_refuses_bad_options_before_the_run(capsys, monkeypatch, argv, message):
    from sprm_kernels.model.evaluation import compute_view

    def no_run(*args, **kwargs):
        raise AssertionError("the compute view started before its arguments were checked")

    monkeypatch.setattr(compute_view, "compute_view", no_run)
    status = main(["eval", *argv])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, (status, out, err)
    assert message in err
