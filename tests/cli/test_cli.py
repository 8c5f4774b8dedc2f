"""The `sprm` command line (model/cli.py) on a tiny saved model: `generate` and `score` outputs, and usage errors
(exit status 2, one message, no traceback). `serve` is exercised by tests/serving/test_server.py (the SIGTERM test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sprm_kernels.model import ReflectiveModel
from sprm_kernels.model.cli.main import main
from sprm_kernels.model.shipped import tiny

GENERATE = ["--k", "3", "--max-think-tokens", "16", "--max-answer-tokens", "4", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster, and stable on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_reflective(tmp_path_factory.mktemp("cli") / "model")


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_generate_prints_candidates_choice_answer_and_timings(capsys, model_dir):
    status, out, err = run(capsys, "generate", "1+2", "--model", model_dir, *GENERATE)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("3 candidates, prompt ")
    candidate_lines = lines[2:5]
    assert sum(line.lstrip().startswith("*") for line in candidate_lines) == 1
    best = next(int(line.split()[1]) for line in candidate_lines if line.lstrip().startswith("*"))
    assert lines[5].startswith(f"chosen: candidate {best} (score ")
    assert lines[6].startswith("answer: ") and lines[7].startswith("timings: prefill ")
    assert lines[7].endswith("tokens through the model")


def test_generate_json_equals_generate(capsys, model_dir):
    status, out, _ = run(capsys, "generate", "1+2", "--model", model_dir, "--json", *GENERATE)
    assert status == 0
    answer = json.loads(out)
    expected = ReflectiveModel.from_pretrained(model_dir).generate(
        "1+2", k=3, max_think_tokens=16, max_answer_tokens=4, seed=0
    )
    assert answer["best"] == expected.best and answer["answer"] == expected.answer
    assert [c["score"] for c in answer["candidates"]] == [c.score for c in expected.candidates]


def test_score_prints_one_json_result_per_line(capsys, tmp_path, model_dir):
    texts = ["<think>1+1=2.\n\n2+2=4.\n\n</think>4", "1+1 x", "<think>3+3=6.\n\n</think>6"]  # the middle: no steps
    lines = [{"text": texts[0]}, {"text": texts[1], "return_all_scores": True}, {"text": texts[2]}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    status, out, err = run(capsys, "score", str(path), "--model", model_dir)
    assert status == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    expected = ReflectiveModel.from_pretrained(model_dir).score(texts, return_all_scores=True)
    assert results[0] == {"value": expected[0].value}
    assert results[1] == {"value": 0.0, "all_scores": [], "token_ids": expected[1].token_ids, "score_positions": []}
    assert results[2] == {"value": expected[2].value}


def write_bad_folders(root) -> dict[str, str]:
    folders = {name: root / name for name in ("empty", "garbage_config", "no_head", "no_tokenizer")}
    for folder in folders.values():
        folder.mkdir()
    (folders["garbage_config"] / "config.json").write_text("{ not json")
    (folders["garbage_config"] / "score_module.pt").write_bytes(b"")
    tiny.make_tiny_policy("qwen2", 30).save_pretrained(folders["no_head"])
    tiny.make_tiny_policy("qwen2", 30).save_pretrained(folders["no_tokenizer"])
    torch.save(tiny.make_tiny_head(32).state_dict(), folders["no_tokenizer"] / "score_module.pt")
    return {name: str(folder) for name, folder in folders.items()}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such folder"),
        ("empty", "not a model folder (no config.json)"),
        ("garbage_config", "cannot load the model"),
        ("no_head", "no SPRM head (score_module.pt or sprm_head.safetensors)"),
        ("no_tokenizer", "cannot load the model"),
    ],
)
def test_bad_model_folder_exits_2_with_a_message(capsys, tmp_path, case, message):
    folders = write_bad_folders(tmp_path)
    capsys.readouterr()  # saving writes progress bars
    folder = folders.get(case, str(tmp_path / "missing"))
    for argv in (["generate", "1+2", "--model", folder], ["score", os.devnull, "--model", folder]):
        status, out, err = run(capsys, *argv)
        assert status == 2 and out == ""
        assert err.startswith(f"sprm: error: --model {folder}: {message}") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "1+2", "--mode", "ultra"], "invalid choice: 'ultra'"),
        (["generate", "1+2", "--mode", "low", "--k", "2"], "not allowed with argument"),
        (["generate", "1+2", "--k", "0"], "expected a positive int"),
        (["generate", "  "], "the question is empty"),
        (["generate", "1+2", "--max-think-tokens", "4096", "--max-answer-tokens", "1024"], "over the model's context"),
        (["generate", "1+2", "--top-p", "0", *GENERATE], "top_p"),
        (["generate", "1+2", "--model"], "expected one argument"),
        (["score", "missing.jsonl"], "missing.jsonl: No such file or directory"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_without_traceback(capsys, model_dir, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", model_dir]
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "in.jsonl:2: not JSON"),
        ('["text"]', 'in.jsonl:2: expected an object with a string "text"'),
        ('{"text": 5}', 'in.jsonl:2: expected an object with a string "text"'),
        ('{"text": ""}', "in.jsonl:2: empty text"),
        ('{"text": "1", "return_all_scores": "yes"}', 'expected "return_all_scores" to be true or false'),
        ('{"text": "1", "temperature": 1}', "in.jsonl:2: unknown fields ['temperature']"),
        (json.dumps({"text": "1" * 300}), "in.jsonl:2: 300 tokens, over the limit of 256 tokens"),
    ],
)
def test_malformed_score_line_exits_2_naming_the_line(capsys, tmp_path, model_dir, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "1+1"}\n' + line + "\n")
    status, out, err = run(capsys, "score", str(path), "--model", model_dir)
    assert status == 2 and out == "" and message in err, err


def test_python_dash_m_entry_point(tmp_path):
    """The real entry point (`python -m sprm_kernels.model.cli`): --help exits 0, a usage error exits 2."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "sprm_kernels.model.cli"]
    done = subprocess.run([*command, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(name in done.stdout for name in ("serve", "generate", "score"))
    done = subprocess.run(
        [*command, "generate", "1+2", "--model", str(tmp_path / "missing")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        done.returncode == 2 and done.stderr.strip() == f"sprm: error: --model {tmp_path / 'missing'}: no such folder"
    )


def test_defaults_are_the_shipped_model_and_budgets_that_fit(capsys, model_dir):
    from sprm_kernels.model import chat_prompt_ids
    from sprm_kernels.model.cli.main import build_parser
    from sprm_kernels.model.engines.common import generation_options
    from sprm_kernels.model.shipped import SHIPPED_DIR

    assert build_parser().parse_args(["generate", "1+2"]).model == SHIPPED_DIR
    model = ReflectiveModel.from_pretrained(model_dir, backend="torch")  # context 256
    options = generation_options(model, "1+2")
    think, answer = options["max_think_tokens"], options["max_answer_tokens"]
    prompt_tokens = len(chat_prompt_ids(model.tokenizer, "1+2"))
    assert answer == 32 and think + answer + prompt_tokens == 256  # 1/8 of the context for the answer, the rest thinks
    given = generation_options(model, "1+2", max_think_tokens=7, max_answer_tokens=3)
    assert (given["max_think_tokens"], given["max_answer_tokens"]) == (7, 3)
    status, out, err = run(capsys, "generate", "1+2", "--k", "2", "--seed", "0", "--model", model_dir)
    assert status == 0 and "chosen: candidate" in out, err


# -- issue 14: usage errors before any work, one line, exit 2 ----------------------------------------------------


def assert_one_line_usage_error(status: int, out: str, err: str, *names: str) -> None:
    assert status == 2 and out == "", (status, out, err)
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for name in names:
        assert name in err, err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--n", "0"], ["argument --n", "'0'"]),
        (["--n", "-3"], ["argument --n", "'-3'"]),
        (["--ks", "0"], ["argument --ks", "'0'"]),
        (["--ks", "abc"], ["argument --ks", "'abc'"]),
        (["--ks", ""], ["argument --ks", "''"]),
        (["--ks", "1,2,-4"], ["argument --ks", "'1,2,-4'"]),
        (["--model", "/nonexistent"], ["--model /nonexistent: no such folder"]),
        (["--plot", "/missing_dir/x.png"], ["--plot /missing_dir/x.png: no such folder"]),
        (["--bce-head", "/nonexistent"], ["--bce-head /nonexistent: no such folder"]),
    ],
)
def test_eval_usage_errors_exit_2_in_one_line_before_the_run(capsys, monkeypatch, argv, names):
    from sprm_kernels.model.evaluation import best_of_k as evaluate

    def no_run(*args, **kwargs):
        raise AssertionError("the evaluation started before its arguments were checked")

    monkeypatch.setattr(evaluate, "evaluate", no_run)
    assert_one_line_usage_error(*run(capsys, "eval", *argv), *names)


def test_a_model_that_is_not_a_local_folder_is_never_looked_up_on_the_hub(capsys, monkeypatch):
    """A Hub-like id is a missing folder, refused before transformers is asked (which would go to the network)."""
    from sprm_kernels.model.engines.hf.engine import ReflectiveModel as Model

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained was called with a Hub id")

    monkeypatch.setattr(Model, "from_pretrained", no_loading)
    for command in (["eval"], ["generate", "1+2"], ["score", os.devnull], ["serve"]):
        status, out, err = run(capsys, *command, "--model", "Qwen/Qwen2-0.5B")
        assert_one_line_usage_error(status, out, err, "--model Qwen/Qwen2-0.5B: no such folder")


def test_eval_reports_the_text_only_baseline_and_progress(capsys):
    status, out, err = run(capsys, "eval", "--n", "3", "--ks", "1,2", "--json", "--threads", "1")
    assert status == 0, err
    result = json.loads(out)
    assert set(result["accuracy"]["fewest_n"]) == {"1", "2"} or set(result["accuracy"]["fewest_n"]) == {1, 2}
    assert set(result["sprm_minus_text_only"]) == {"sprm", "sprm_bce"}
    assert "sprm eval" in err and "3" in err  # progress on stderr, stdout stays JSON
    status, out, err = run(capsys, "eval", "--n", "2", "--ks", "2", "--quiet")
    assert status == 0 and err == "" and "| text only: fewest n verdicts |" in out


def test_fewest_n_baseline_picks_the_fewest_no_verdicts_with_a_random_tie_break():
    from sprm_kernels.model.evaluation.best_of_k import selection_metrics
    from sprm_kernels.model.shipped import task

    problems = task.problems("test", 1, seed=0)
    step = lambda verdict: f"01+1=02 {verdict}.\n\n"
    texts = [step("n") * 2 + "</think>", step("y") + step("n") + "</think>", step("y") * 2, step("y") * 2 + "</think>"]
    # candidate 3 (no "n", finished) is the pick; candidate 2 has no "n" either but never finished
    samples = {"correct": [[False, False, False, True]], "finished": [[True, True, False, True]],
               "scores": [[0.9, 0.8, 0.7, 0.1]], "answers": [[1, 2, None, 3]], "texts": [texts]}  # fmt: skip
    metrics = selection_metrics(samples, problems, ks=(4,))
    assert metrics["fewest_n"][4].tolist() == [1.0] and metrics["sprm"][4].tolist() == [0.0]
    # a tie (all "y", all finished): random picks, about half right, not always the first
    samples = {"correct": [[True, False]], "finished": [[True, True]], "scores": [[0.5, 0.5]], "answers": [[1, 2]],
               "texts": [[step("y") + "</think>"] * 2]}  # fmt: skip
    picks = [selection_metrics(samples, problems, ks=(2,), seed=seed)["fewest_n"][2][0] for seed in range(8)]
    assert 0.0 < sum(picks) / len(picks) < 1.0


def test_score_invalid_utf8_exits_2_naming_the_line(capsys, tmp_path, model_dir):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "1+1"}\n{"text": "1\xff"}\n')
    assert_one_line_usage_error(*run(capsys, "score", str(path), "--model", model_dir), f"{path}:2: not UTF-8")


def test_score_and_server_agree_on_text_the_tokenizer_cannot_read(capsys, tmp_path, model_dir):
    """Letters the character tokenizer does not know: depending on the transformers version it reads them as
    <unk> (a score) or drops them (no tokens). Whatever it does, `sprm score` and the server do the same: both
    score the text with the same value, or the server answers 422 and `sprm score` exits 2 with the same reason."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sprm_kernels.model.serving.app import create_app

    text = "abc"
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    status, out, err = run(capsys, "score", str(path), "--model", model_dir)
    with TestClient(create_app(ReflectiveModel.from_pretrained(model_dir, backend="torch"))) as client:
        response = client.post("/score", json={"text": text})
    if response.status_code == 422:
        assert_one_line_usage_error(status, out, err, "in.jsonl:1: expected a text with at least one token")
        assert "expected a text with at least one token" in response.json()["detail"]
    else:
        assert response.status_code == 200 and status == 0, err
        assert json.loads(out) == response.json()


@pytest.mark.parametrize("how", ["option", "environment"])
def test_serve_refuses_an_empty_token_at_start(capsys, monkeypatch, how):
    monkeypatch.setenv("SPRM_SERVER_TOKEN", "" if how == "environment" else "unused")
    argv = ["serve", "--model", "/nonexistent"] + (["--token", ""] if how == "option" else [])
    assert_one_line_usage_error(*run(capsys, *argv), "--token: expected a non-empty token")  # before the model


def test_version_and_help_texts(capsys):
    from sprm_kernels import __version__

    assert run(capsys, "--version") == (0, f"sprm {__version__}\n", "")
    status, out, _ = run(capsys, "serve", "--help")
    assert status == 0 and "default: 8001" in out
    status, out, _ = run(capsys, "generate", "--help")
    assert status == 0 and "not reproducible" in " ".join(out.split())


def test_default_threads_one_for_a_small_cpu_model_unless_told(capsys, monkeypatch, model_dir):
    from sprm_kernels.model.core.threads import default_threads

    info = ReflectiveModel.from_pretrained(model_dir, backend="torch").info()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(info.device, info.num_parameters) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(info.device, info.num_parameters) is None  # torch already follows the environment
    torch.set_num_threads(2)
    status, _, err = run(capsys, "generate", "1+2", "--model", model_dir, "--threads", "3", *GENERATE)
    assert status == 0 and torch.get_num_threads() == 3, err
    monkeypatch.delenv("OMP_NUM_THREADS")
    status, _, err = run(capsys, "generate", "1+2", "--model", model_dir, *GENERATE)
    assert status == 0 and torch.get_num_threads() == 1, err
    assert_one_line_usage_error(*run(capsys, "score", "-", "--threads", "0"), "argument --threads")


def test_bench_runs_python_dash_m_bench_in_the_checkout_from_anywhere(tmp_path):
    """The console script has no checkout on sys.path: `sprm bench` runs `python -m bench` as a child in the
    checkout. With TRITON_INTERPRET=1 the benchmark refuses to time the interpreter at once: a fast proof that
    the checkout's bench ran, from an unrelated working directory."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sprm_kernels.model.cli", "bench"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "python -m bench times compiled code" in done.stderr, done.stderr


def test_bench_without_a_checkout_is_a_one_line_error(capsys, monkeypatch):
    from sprm_kernels.model.cli import bench as cli

    monkeypatch.setattr(cli, "source_checkout", lambda: None)
    assert_one_line_usage_error(*run(capsys, "bench"), "bench: the benchmarks live in the source checkout")


def test_rollout_collection_shows_progress_on_stderr_unless_quiet(capsys, tmp_path, model_dir):
    from sprm_kernels.model.cli import train

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+1=", "reference": str(a + 1)}) + "\n" for a in range(3)))
    argv = ["collect", "--model", model_dir, "--prompts", str(prompts), "--k", "2", "--max-think-tokens", "4",
            "--max-answer-tokens", "2", "--device", "cpu", "--backend", "torch"]  # fmt: skip
    assert train.main([*argv, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "collect" in err and "3" in err and "rollouts of 3 prompts" in out
    assert train.main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "collect" not in err and "rollouts of 3 prompts" in out


def test_self_check_help_names_itself_and_says_everything(capsys):
    from sprm_kernels.__main__ import main as self_check

    with pytest.raises(SystemExit) as exit_:
        self_check(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: python -m sprm_kernels ")
    assert "which route runs?" in " ".join(out.split())  # the whole description, not its first line
