"""Throughput of `sprm serve` under load against the same model scoring one text per `score` call.

    python -m bench.server_load [--model DIR] [--requests 256] [--concurrency 1 8 32]

Without --model, a tiny random reflective model of a realistic size for a CPU (hidden 256, 4 layers) is written to
a temporary folder. The baseline (sequential `ReflectiveModel.score(text)`, one text per call) runs in this process
before the server starts; then the server runs as a subprocess on loopback and httpx clients send the same texts
at each concurrency. Client and server share the machine, as they would on one host. Prints a markdown table with
wall-clock throughput and latency, and the CPU time per request of the scoring process (this one for the
baseline, the server's for the others) and of the HTTP client: on a machine shared with other work, wall time
moves with the neighbours' load while CPU time mostly does not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from sprm_kernels.model import ReflectiveModel
from sprm_kernels.model.shipped import tiny


def make_texts(tokenizer, count: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[str]:
    """Chat-formatted thinking of `a+b=c.\\n\\n` steps, each text between min_tokens and max_tokens long."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        target = rng.randint(min_tokens, max_tokens)
        text = f"<|user|>{rng.randint(0, 99)}+{rng.randint(0, 99)}<|end|><|assistant|><think>"
        while True:
            step = f"{rng.randint(0, 999)}+{rng.randint(0, 999)}={rng.randint(0, 1999)}.\n\n"
            if len(tokenizer(text + step + "</think>x", add_special_tokens=False)["input_ids"]) > target:
                break
            text += step
        texts.append(text + "</think>x")
    return texts


def token_count(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def sequential_baseline(model: ReflectiveModel, texts: list[str]) -> dict:
    """One text per `score` call, one call after another: what a client without the server's batching gets."""
    model.score(texts[:4])  # warm-up
    latencies = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for text in texts:
        began = time.perf_counter()
        model.score(text)
        latencies.append(time.perf_counter() - began)
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "cpu": time.process_time() - cpu_start}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): robust to other work on the machine, unlike wall time."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(base: str, pid: int, texts: list[str], concurrency: int, timeout: float) -> dict:
    """Every text POSTed to /score once, from `concurrency` concurrent clients."""
    latencies, failures = [], 0
    pending = iter(texts)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def client_loop():
            nonlocal failures
            for text in pending:
                began = time.perf_counter()
                response = await client.post("/score", json={"text": text})
                latencies.append(time.perf_counter() - began)
                failures += response.status_code != 200

        for text in texts[:concurrency]:  # warm-up: connections open, first batches run
            await client.post("/score", json={"text": text})
        before = (await client.get("/health")).json()
        start, client_cpu, server_cpu = time.perf_counter(), time.process_time(), process_cpu_seconds(pid)
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        client_cpu, server_cpu = time.process_time() - client_cpu, process_cpu_seconds(pid) - server_cpu
        after = (await client.get("/health")).json()
    batches = after["batches_served"] - before["batches_served"]
    texts_per_batch = (after["texts_scored"] - before["texts_scored"]) / max(batches, 1)
    return {
        "seconds": seconds, "latencies": latencies, "failures": failures, "texts_per_batch": texts_per_batch,
        "cpu": server_cpu, "client_cpu": client_cpu,
    }  # fmt: skip


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(
    model_dir: str, max_text_tokens: int, max_batch_tokens: int, threads: int | None, startup_timeout=120.0
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "sprm_kernels.model.cli", "serve", "--model", model_dir, "--port", str(port),
        "--max-text-tokens", str(max_text_tokens), "--max-batch-tokens", str(max_batch_tokens),
        "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    child = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit status {child.poll()})")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.2)
        yield base, child.pid
    finally:
        child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def row(name: str, concurrency, count: int, tokens: int, result: dict, batch: str) -> str:
    seconds, latencies = result["seconds"], result["latencies"]
    p50 = 1000 * statistics.median(latencies)
    p95 = 1000 * statistics.quantiles(latencies, n=20)[-1]
    cpu = f"{1000 * result['cpu'] / count:.1f}"
    client_cpu = f"{1000 * result['client_cpu'] / count:.1f}" if "client_cpu" in result else "-"
    return (
        f"| {name} | {concurrency} | {count} | {seconds:.2f} | {count / seconds:.1f} | {tokens / seconds:,.0f} | "
        f"{p50:.1f} | {p95:.1f} | {batch} | {cpu} | {client_cpu} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a tiny H=256, 4-layer model)")
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each row shows its median round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in the server")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or tiny.save_tiny_reflective(
            os.path.join(scratch, "model"), hidden_size=256, num_layers=4
        )
        model = ReflectiveModel.from_pretrained(model_dir, device="cpu")
        texts = make_texts(model.tokenizer, args.requests, args.min_tokens, args.max_tokens)
        tokens = token_count(model.tokenizer, texts)
        longest = max(len(ids) for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"])
        print(f"model {model_dir}: {type(model.model).__name__}, hidden {model.model.config.hidden_size}, "
              f"{model.model.config.num_hidden_layers} layers; {len(texts)} texts, {tokens / len(texts):.0f} tokens "
              f"on average ({args.min_tokens}-{args.max_tokens}); {cpu_name()}, {os.cpu_count()} CPUs, torch "
              f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

        # Rounds alternate the baseline and the server levels, so that a burst of load from other work on the
        # machine hits one round rather than one row; the table shows each row's median round (by throughput).
        # The server is idle (no CPU) while the baseline runs in this process.
        runs = {name: [] for name in ["baseline", *args.concurrency]}
        # The model's own context may be shorter than the texts (the tiny model's is 256): raise the server's limit.
        with server_process(model_dir, longest, args.max_batch_tokens, args.threads) as (base, pid):
            for round_number in range(1, args.rounds + 1):
                runs["baseline"].append(sequential_baseline(model, texts))
                for concurrency in args.concurrency:
                    runs[concurrency].append(asyncio.run(load(base, pid, texts, concurrency, args.timeout)))
                summary = ", ".join(f"{name}: {len(texts) / r[-1]['seconds']:.1f}/s" for name, r in runs.items())
                print(f"round {round_number}: {summary} (load average {os.getloadavg()[0]:.1f})", flush=True)

    lines = [
        "| mode | concurrency | requests | seconds | requests/s | tokens/s | p50 ms | p95 ms | texts per batch "
        "| scoring CPU ms/request | client CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        result = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
        if name == "baseline":
            lines.append(row("`score(text)`, one at a time", "1", len(texts), tokens, result, "1"))
        else:
            batch = f"{result['texts_per_batch']:.1f}" + (
                f", {result['failures']} failed" if result["failures"] else ""
            )
            lines.append(row("server `POST /score`", name, len(texts), tokens, result, batch))
    print()
    print("\n".join(lines))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
