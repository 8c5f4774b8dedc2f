"""Dispatch: which implementation runs for which tensors, proven by recording the calls."""

import subprocess
import sys

import pytest
import torch
from helpers import INTERPRETING, random_head

import sprm_kernels
import sprm_kernels.kernels.sprm_score as score_kernel
import sprm_kernels.kernels.step_positions as positions_kernel
from sprm_kernels import resolve_backend, sprm_score, step_positions, torch_ops

RULE = dict(step_token_ids=[3], think_start_id=1, think_end_id=2)


def test_resolve_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(torch.device("cpu")) == "triton"
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(torch.device("cpu"), "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend(torch.device("cpu"), "triton")


def _record(monkeypatch, calls, module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_cpu_tensors_take_the_expected_route(monkeypatch, interpret):
    if interpret == "1" and not INTERPRETING:
        pytest.skip("triton was imported without the interpreter in this session")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    calls = []
    _record(monkeypatch, calls, score_kernel, "launch_sprm_score")
    _record(monkeypatch, calls, torch_ops, "sprm_score_torch")
    _record(monkeypatch, calls, positions_kernel, "launch_step_positions")
    _record(monkeypatch, calls, torch_ops, "step_positions_torch")
    step_index, offsets = step_positions(torch.tensor([[5, 6, 3, 7, 3]]), **RULE)
    sprm_score(torch.randn(5, 8), step_index, offsets, *random_head(8))
    if interpret == "1":
        assert calls == ["launch_step_positions", "launch_sprm_score"]
    else:
        assert calls == ["step_positions_torch", "sprm_score_torch"]


def test_import_does_not_import_transformers_or_triton():
    code = "import sys, sprm_kernels; print('transformers' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_public_api():
    for name in ("sprm_score", "step_positions", "StepScorer", "SPRMScores", "sprm_score_reference",
                 "step_positions_reference", "resolve_backend"):  # fmt: skip
        assert hasattr(sprm_kernels, name), name
