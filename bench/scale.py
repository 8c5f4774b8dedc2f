"""Scale-out benchmark: best-of-k evaluation and `/score` serving, in one process and on Ray with 1 and 2 workers.

    OMP_NUM_THREADS=1 python -m bench.scale [--n 48] [--k 8] [--requests 300] [--concurrency 8]

Eval: the sampling of `sprm eval` (k candidates per problem, BCE rescoring included) over n test problems of the
shipped model. One process: `sample_candidates` with one torch thread after the model is loaded. Ray: a private
instance on 127.0.0.1 (started once, after the single-process run, not timed), pools of single-threaded actors.
Reported per run: wall time end to end (the pool's start-up, i.e. loading torch + the model in every actor,
included), the time to the first row, and the steady rate: problems per second between the first and the last
row (the start-up excluded), and the CPU time per problem in the workers (process time around each problem) and
in the driver (the whole job): on a shared machine CPU time moves less with the load than wall time does.
Overhead at 1 worker = 1 - steady Ray rate / single-process rate; speed-up = 2-worker steady rate / 1-worker
steady rate.

Serve: `requests` POST /score of thinking texts from `concurrency` concurrent clients, after a warm-up: the
single-process server (`sprm serve`, a subprocess) against Ray Serve with 1 and 2 replicas (one torch thread each).

The machine is shared: the load average is printed before and after; compare runs only at similar loads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.server_load import cpu_name, free_port, server_process  # noqa: E402
from sprm_kernels.model.evaluation import best_of_k as ev  # noqa: E402
from sprm_kernels.model.shipped import (
    SHIPPED_DIR,
    task,  # noqa: E402
)

SHIPPED = SHIPPED_DIR


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def eval_single(problems, k: int) -> dict:
    from sprm_kernels.model.core.head import SPRMHead
    from sprm_kernels.model.engines.registry import load_engine

    start = time.perf_counter()
    rm = load_engine(SHIPPED, device="cpu", backend="torch")
    bce = rm.with_head(SPRMHead.from_pretrained(os.path.join(SHIPPED, "bce_head")))
    loaded, cpu = time.perf_counter(), time.process_time()
    samples = ev.sample_candidates(rm, problems, k=k, temperature=1.0, seed=0, max_answer_tokens=8)
    [[r.value for r in bce.score(seqs)] for seqs in samples["sequences"]]
    end, cpu = time.perf_counter(), time.process_time() - cpu
    return {"wall": end - start, "first": None, "steady": len(problems) / (end - loaded), "samples": samples,
            "worker_cpu": cpu, "driver_cpu": 0.0}  # fmt: skip


def eval_ray(problems, k: int, workers: int) -> dict:
    from sprm_kernels.model.ray.cluster import Workers
    from sprm_kernels.model.ray.eval_job import sample_on_ray

    times, worker_cpu = [], []

    def on_row(row):
        times.append(time.perf_counter())
        worker_cpu.append(row["cpu_s"])

    start, driver_cpu = time.perf_counter(), time.process_time()
    samples, _ = sample_on_ray(
        SHIPPED, problems, engine="hf", k=k, temperature=1.0, seed=0, max_answer_tokens=8,
        bce_head_dir=os.path.join(SHIPPED, "bce_head"), workers=Workers(workers), progress=False, on_row=on_row,
    )  # fmt: skip
    end, driver_cpu = time.perf_counter(), time.process_time() - driver_cpu
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return {"wall": end - start, "first": times[0] - start, "steady": steady, "samples": samples,
            "worker_cpu": sum(worker_cpu), "driver_cpu": driver_cpu}  # fmt: skip


def score_texts(count: int) -> list[str]:
    rng = random.Random(0)
    problems = task.problems("validation", count, seed=0)
    return [p.prompt + "<think>" + task.trace(p, rng, corrupt_rate=0.2)[0] for p in problems]


async def hammer(base: str, texts: list[str], concurrency: int) -> dict:
    failures, pending = 0, iter(texts)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def loop():
            nonlocal failures
            for text in pending:
                failures += (await client.post("/score", json={"text": text})).status_code != 200

        for text in texts[: 2 * concurrency]:  # warm-up
            await client.post("/score", json={"text": text})
        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"rate": len(texts) / seconds, "failures": failures}


def serve_single(texts, concurrency) -> dict:
    with server_process(SHIPPED, max_text_tokens=160, max_batch_tokens=16384, threads=1) as (base, _):
        return asyncio.run(hammer(base, texts, concurrency))


def serve_ray(texts, concurrency, replicas: int, port: int) -> dict:
    from sprm_kernels.model.ray import serve as ray_serve

    url = ray_serve.deploy(SHIPPED, port=port, options=ray_serve.ReplicaOptions(replicas=replicas))
    try:
        return asyncio.run(hammer(url, texts, concurrency))
    finally:
        ray_serve.undeploy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="eval problems (default 48)")
    parser.add_argument("--k", type=int, default=8, help="candidates per problem (default 8)")
    parser.add_argument("--requests", type=int, default=300, help="/score requests per server (default 300)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from sprm_kernels.model.ray.cluster import connect

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}; load average "
          f"{load_average()} (1/5/15 min) at the start")  # fmt: skip
    if not args.skip_eval:
        problems = task.problems("test", args.n, seed=0)
        single = eval_single(problems, args.k)  # before Ray starts: its daemons are part of its overhead
        connect(None)
        ray1 = eval_ray(problems, args.k, 1)
        ray2 = eval_ray(problems, args.k, 2)
        for run in (ray1, ray2):
            assert run["samples"] == {key: single["samples"][key] for key in run["samples"]}, "results differ"
        print(f"\neval: n={args.n} problems, k={args.k}; results identical in all runs; load {load_average()}")
        print("| run | wall s (start-up included) | first row s | steady problems/s | CPU ms per problem (worker + "
              "driver) |\n|---|---:|---:|---:|---:|")  # fmt: skip
        for name, run in (("one process", single), ("Ray, 1 worker", ray1), ("Ray, 2 workers", ray2)):
            first = "-" if run["first"] is None else f"{run['first']:.1f}"
            cpu = f"{1000 * run['worker_cpu'] / args.n:.0f} + {1000 * run['driver_cpu'] / args.n:.0f}"
            print(f"| {name} | {run['wall']:.1f} | {first} | {run['steady']:.2f} | {cpu} |", flush=True)
        print(f"Ray overhead at 1 worker (steady): {100 * (1 - ray1['steady'] / single['steady']):+.0f}%; "
              f"2 workers / 1 worker: {ray2['steady'] / ray1['steady']:.2f}x", flush=True)  # fmt: skip
    if not args.skip_serve:
        connect(None)
        texts = score_texts(args.requests)
        results = [("one process (sprm serve)", serve_single(texts, args.concurrency))]
        port = free_port()  # Serve keeps the port it first started with
        for replicas in (1, 2):
            name = f"Ray Serve, {replicas} replica{'s' * (replicas > 1)}"
            results.append((name, serve_ray(texts, args.concurrency, replicas, port)))
        print(f"\n/score: {args.requests} requests, {args.concurrency} concurrent clients; load {load_average()}")
        print("| server | requests/s | failed |\n|---|---:|---:|")
        for name, result in results:
            print(f"| {name} | {result['rate']:.1f} | {result['failures']} |")
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
    print(f"\nload average {load_average()} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
