"""`sprm eval --ray` on a private Ray instance (the `ray_local` fixture): per-problem results identical to the
single-process run whatever the number of workers, in problem order, and none lost or doubled when a worker is
killed mid-job. Skipped, visibly, without Ray."""

import json
import os
import select
import signal

import pytest

pytest.importorskip("ray", reason="the Ray tests need Ray (pip install 'ray[data,serve]')")

from sprm_kernels.model.core.head import SPRMHead  # noqa: E402
from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.evaluation import best_of_k as ev  # noqa: E402
from sprm_kernels.model.ray.cluster import Workers  # noqa: E402
from sprm_kernels.model.ray.eval_job import ROW_KEYS, sample_on_ray  # noqa: E402
from sprm_kernels.model.ray.output import read_rows  # noqa: E402
from sprm_kernels.model.shipped import (
    SHIPPED_DIR,
    task,  # noqa: E402
)

SHIPPED = SHIPPED_DIR
N, K, SEED, TEMPERATURE = 5, 2, 3, 1.0


@pytest.fixture(scope="module")
def problems():
    return task.problems("test", N, seed=SEED)


@pytest.fixture(scope="module")
def single_process(problems):
    """What `evaluate` computes in one process: samples and BCE scores."""
    rm = load_engine(SHIPPED, device="cpu", backend="torch")
    samples = ev.sample_candidates(rm, problems, k=K, temperature=TEMPERATURE, seed=SEED, max_answer_tokens=8)
    bce = rm.with_head(SPRMHead.from_pretrained(os.path.join(SHIPPED, "bce_head")))
    return samples, [[r.value for r in bce.score(seqs)] for seqs in samples["sequences"]]


def run(problems, workers, **kwargs):
    return sample_on_ray(
        SHIPPED, problems, engine="hf", k=K, temperature=TEMPERATURE, seed=SEED, max_answer_tokens=8,
        bce_head_dir=os.path.join(SHIPPED, "bce_head"), workers=workers, progress=False, **kwargs,
    )  # fmt: skip


def test_two_workers_one_killed_mid_job_same_results(ray_local, problems, single_process, tmp_path):
    """A worker is SIGKILLed after the first row arrives: Ray restarts it and reruns its problems; the file has
    every problem once, in order, and every value equals the single-process run's."""
    killed, exited, seen = [], [], []

    def kill_first_worker(raw):
        seen.append(raw["id"])
        if not killed:
            # A pidfd turns readable when the process has exited (reaped or not): an event to wait on, where
            # `os.kill(pid, 0)` would still succeed on a zombie nobody has reaped yet.
            pidfd = os.pidfd_open(raw["pid"])
            os.kill(raw["pid"], signal.SIGKILL)
            killed.append(raw["pid"])
            exited.append(bool(select.select([pidfd], [], [], 60)[0]))
            os.close(pidfd)

    out = tmp_path / "rows.jsonl"
    samples, bce = run(problems, Workers(2), out=str(out), on_row=kill_first_worker)
    assert killed, "no worker was killed"
    assert exited == [True], "the killed worker did not exit"
    assert seen == sorted(seen), "rows out of problem order"
    rows = read_rows(str(out))
    assert [row["id"] for row in rows] == list(range(N))
    expected, expected_bce = single_process
    for key in ROW_KEYS:
        assert samples[key] == expected[key], key
        assert [row[key] for row in rows] == expected[key], key
    assert bce == expected_bce


def test_cli_report_equals_single_process_plus_workers(ray_local, capsys, tmp_path):
    """`sprm eval --ray --num-workers 1 --json --out rows.parquet`: the report of the run without Ray, plus
    "workers": 1 (the test above covers 2 workers), and one Parquet row per problem, in order."""
    from sprm_kernels.model.cli.main import main

    args = ["eval", "--n", "3", "--ks", "1,2", "--seed", str(SEED), "--json"]
    assert main(args + ["--ray", "--num-workers", "1", "--out", str(tmp_path / "e.parquet")]) == 0
    on_ray = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    alone = json.loads(capsys.readouterr().out)
    assert on_ray.pop("workers") == 1 and alone.pop("workers") == 1
    on_ray.pop("seconds"), alone.pop("seconds")
    assert on_ray == alone
    rows = read_rows(str(tmp_path / "e.parquet"))
    assert [row["id"] for row in rows] == [0, 1, 2]
    assert [len(row["scores"]) for row in rows] == [2, 2, 2]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray", "--num-workers", "0"], "--num-workers"),
        (["--ray", "--cpus-per-worker", "-1"], "--cpus-per-worker"),
        (["--ray", "--out", "rows.csv"], "--out"),
        (["--num-workers", "2"], "only with --ray"),
        (["--out", "rows.jsonl"], "only with --ray"),
    ],
)
def test_cli_bad_ray_options_are_usage_errors(extra, message, capsys):
    """Bad options fail before any work (no Ray needed: argparse or the option checks refuse them)."""
    from sprm_kernels.model.cli.main import main

    try:  # argparse's own checks return 2 through cli.main; the option checks after parsing exit 2
        status = main(["eval", "--n", "2"] + extra)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_missing_model_fails_before_ray_starts(tmp_path):
    """A folder that is not a model is refused in the driver, before any actor could fail (and be restarted)."""
    with pytest.raises(ValueError, match="no such folder"):
        sample_on_ray(
            str(tmp_path / "missing"), task.problems("test", 1), engine="hf", k=1, temperature=1.0, seed=0,
            max_answer_tokens=0, bce_head_dir=None, progress=False,
        )  # fmt: skip
