"""`--prune` on the command line: refused, in one line and before any work, where it cannot apply (the HF engine,
`--search`), with bad values named; `sprm generate` marks pruned rows (the vLLM runs are tested in
tests/engines/vllm/test_vllm_pruning.py)."""

from __future__ import annotations

import pytest

from sprm_kernels.model.cli.main import main
from sprm_kernels.model.shipped import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_reflective(tmp_path_factory.mktemp("cli") / "model")


def usage_error(capsys, *argv) -> str:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, (status, out, err)
    assert err.startswith("sprm: error:") or "error:" in err
    return err


def test_generate_refuses_pruning_where_it_cannot_apply(capsys, model_dir, monkeypatch):
    import sprm_kernels.model.cli.generate as generate

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(generate, "load_model", no_load)
    err = usage_error(capsys, "generate", "1+1=?", "--model", model_dir, "--prune", "margin")
    assert "--prune: the hf engine does not prune (use --engine vllm)" in err
    err = usage_error(capsys, "generate", "1+1=?", "--model", model_dir, "--search", "beam", "--prune-keep", "3")
    assert "--prune-keep: pruning is for best-of-k, not --search" in err
    assert "argument --prune" in usage_error(capsys, "generate", "1+1=?", "--prune", "beam")
    assert "argument --prune-keep" in usage_error(capsys, "generate", "1+1=?", "--prune-keep", "0")
    assert "argument --confidence-window" in usage_error(capsys, "generate", "1+1=?", "--confidence-window", "x")
    err = usage_error(capsys, "generate", "1+1=?", "--model", model_dir, "--search", "beam", "--k", "4")
    assert "--search: the batch is --beam-width x --expansions rows; --mode and --k do not apply" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prune", "margin"], "--prune: the hf engine does not prune (use --engine vllm)"),
        (["--engine", "vllm", "--prune", "best"], "--prune: expected a comma-separated list of margin, halving"),
        (["--engine", "vllm", "--prune", "margin", "--search", "beam"], "--prune: not with --search or --ray"),
        (["--prune-margins", "0.5,-1"], "argument --prune-margins: expected comma-separated floats >= 0"),
        (["--prune-margins", "nan"], "argument --prune-margins"),
        (["--prune-keeps", "0"], "argument --prune-keeps"),
    ],
)
def test_eval_refuses_bad_pruning_options_before_the_run(capsys, monkeypatch, argv, message):
    from sprm_kernels.model.evaluation import pruning

    def no_run(*args, **kwargs):
        raise AssertionError("the evaluation started before its arguments were checked")

    monkeypatch.setattr(pruning, "pruning_view", no_run)
    assert message in usage_error(capsys, "eval", *argv)
