"""`sprm generate` and `POST /generate` fill the options a caller leaves out the same way (both through
`engines.common.generation_options`): on the shipped model, a bare prompt with seed 0 gets the same candidates,
scores and answer from both, sampled at the folder's temperature / top_p (sprm_task.json: 1.0 / 1.0) with budgets
fitted to its 160-token context (the server's old fixed 0.6 / 0.95 and 4096 + 1024 tokens were a 413 there)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # the TestClient's transport

from fastapi.testclient import TestClient  # noqa: E402

from sprm_kernels.model import ReflectiveModel  # noqa: E402
from sprm_kernels.model.cli.main import main  # noqa: E402
from sprm_kernels.model.core.params import folder_sampling  # noqa: E402
from sprm_kernels.model.engines.common import generation_options  # noqa: E402
from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.serving.app import create_app  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402

PROMPT = "12+345+6+78+9+10=?"  # a problem of the shipped task (model/shipped/task.py)


@pytest.fixture
def recorded_generations(monkeypatch):
    """The keyword arguments of every `ReflectiveModel.generate` call (the CLI's model and the server's). Both run
    the same kernel route (TRITON_INTERPRET is left alone: flipping it mid-session breaks the interpreter for the
    tests that run after this one)."""
    calls, real_generate = [], ReflectiveModel.generate

    def generate(self, prompt, **options):
        calls.append({name: value for name, value in options.items() if value is not None})
        return real_generate(self, prompt, **options)

    monkeypatch.setattr(ReflectiveModel, "generate", generate)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)  # the CLI's --threads sets the process's


def without_timings(answer: dict) -> str:
    """The JSON of a generation, its wall-clock seconds left out, as text: equal text is bit-equal floats."""
    stats = {name: value for name, value in answer["stats"].items() if name != "seconds"}
    return json.dumps({**answer, "stats": stats}, sort_keys=True)


def test_cli_and_server_sample_a_bare_prompt_alike(capsys, recorded_generations):
    status = main(["generate", PROMPT, "--json", "--seed", "0", "--device", "cpu", "--threads", "1"])
    out, err = capsys.readouterr()
    assert status == 0, err
    from_cli = json.loads(out)

    engine = load_engine(SHIPPED_DIR, engine="hf", device="cpu")
    with TestClient(create_app(engine)) as client:
        response = client.post("/generate", json={"prompt": PROMPT, "seed": 0})
        assert response.status_code == 200, response.text
        from_server = response.json()
        # The comparison below can fail: other sampling settings give other candidates.
        other = client.post("/generate", json={"prompt": PROMPT, "seed": 0, "temperature": 0.6, "top_p": 0.95})
        assert other.status_code == 200, other.text

    assert without_timings(from_server) == without_timings(from_cli)
    assert without_timings(other.json()) != without_timings(from_cli)

    cli_options, server_options, _ = recorded_generations
    expected = {"mode": "medium", **generation_options(engine, PROMPT, seed=0)}
    assert cli_options == server_options == expected
    assert folder_sampling(SHIPPED_DIR) == {"temperature": 1.0, "top_p": 1.0}
    assert expected["temperature"] == 1.0 and expected["top_p"] == 1.0
    context = engine.info().context_length
    prompt_tokens = len(engine.prompt_ids(PROMPT))
    assert context == 160 and expected["max_answer_tokens"] == context // 8
    assert prompt_tokens + expected["max_think_tokens"] + expected["max_answer_tokens"] == context
    assert len(from_server["candidates"]) == 8  # mode medium
