"""`python -m bench.gpu_check --dry-run`: every step of the prepared GPU check runs (small shapes, CPU, the Triton
interpreter) and reports in both files, so the command is known to work before a GPU session spends its minutes
on it. It also checks that a step over its time limit is killed and reported, not waited for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed: import it from the checkout
from bench import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = gpu_check.main(["--out", str(out), "--dry-run"])
    return code, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_step_passes_and_is_reported(dry_run):
    code, report, text = dry_run
    failed = {name: step.get("error") for name, step in report["steps"].items() if not step["ok"]}
    assert code == 0 and report["ok"] and report["dry_run"], failed
    assert list(report["steps"]) == list(gpu_check.STEPS)
    assert text.startswith("# GPU check (DRY RUN")
    for name in gpu_check.STEPS:
        assert f"## {name}" in text


def test_the_steps_measure_what_they_say(dry_run):
    _, report, _ = dry_run
    steps = report["steps"]
    assert steps["machine"]["machine"]["torch"] and steps["machine"]["machine"]["triton_interpret"] == "1"
    kernels = {row["kernel"] for row in steps["parity"]["rows"]}
    assert kernels == {"sprm_score", "sprm_step_logits", "StepScorer", "step_positions"}
    assert all(row["ok"] for row in steps["parity"]["rows"])
    errors = [row["max_err"] for row in steps["parity"]["rows"] if "max_err" in row]
    assert errors and max(errors) < 1e-5  # fp32 accumulation against float64, at H = 40
    assert all(row["identical"] for row in steps["determinism"]["rows"])
    graph = steps["graph"]["rows"][0]
    assert graph["sums_equal"] and graph["steps_with_different_probs"] == 0 and graph["idle_steps"] > 0
    providers = {row["provider"] for row in steps["timings"]["rows"]}
    assert {"triton", "triton validate=False", "eager", "cublas_epilogue"} <= providers
    assert steps["pytest"]["counts"].get("skipped", 0) >= 2  # the CUDA-graph tests, selected by -m cuda
    assert steps["aot"]["configurations"] > 0 and steps["aot"]["max_spill_bytes"] == 0


def test_a_step_over_its_limit_is_killed_and_reported(tmp_path):
    (tmp_path / "steps").mkdir()
    record = gpu_check.run_step("aot", tmp_path, dry_run=True, limit_s=1)
    assert not record["ok"] and record["error"].startswith("timed out after 1 s")
    assert record["seconds"] < 30
