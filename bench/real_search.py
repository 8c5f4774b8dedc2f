"""Best-of-k, pruned best-of-k and step-level search on real weights: thinking tokens and time per prompt.

    python -m bench.real_model --out /tmp/smollm2
    VLLM_CPU_KVCACHE_SPACE=1 python -m bench.real_search --model /tmp/smollm2            # 8 prompts, 64 tokens
    VLLM_CPU_KVCACHE_SPACE=1 python -m bench.real_search --model /tmp/smollm2 --prompts 2 --max-think-tokens 16

On the converted SmolLM2-135M-Instruct (`python -m bench.real_model`), one engine, the prompts of bench.real_flow,
one prompt per call (the search takes one prompt), each prompt its own seed (--seed + i). Flows (--flows):

- best-of-k: `generate(prompt, k=--k)`, every row to --max-think-tokens (the checkpoint never writes `</think>`);
- best-of-k-margin: the same with `prune="margin"` (`--prune-margin`; vLLM engine only: docs/pruning.md);
- beam, dvts: `search(prompt, method=..., beam_width=--beam-width, expansions=--expansions)` (docs/search.md);
- best-of-k-batched: `generate(all prompts, k=--k)` in one call (vLLM engine only), what batching across prompts
  gives best-of-k and a synchronous search cannot have;
- beam-concurrent: the beam searches of all prompts at once, `asearch` on the server's engine (vLLM's AsyncLLM,
  `AsyncVLLMReflectiveModel`, loaded after the other flows' engine is closed): their rounds share its batches.

Per flow: thinking tokens sampled (`stats.think_generated_tokens`: pruned rows' tokens included) and wall seconds,
per prompt; the request prompt tokens that went through the model (`stats.prefill_tokens`), and for the searches the
rounds, the request prompt tokens the prefix cache served (`stats.think_cached_tokens`; `generate` does not count
those) and, on vLLM, the share of their thinking time spent outside vLLM's calls (the search's own Python). No
answer is written (--max-answer-tokens 0 by default): only the thinking is compared. The head is random: which
candidate wins, and so what pruning and search keep, means nothing about quality; only the tokens and the times do.
Each flow runs once on the first prompt before it is timed. Prints a table (machine, load, command) and appends rows
to bench/results/real_search.csv.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from bench.common import append_csv, utc_timestamp, version_string
from bench.real_flow import PROMPTS

FLOWS = ("best-of-k", "best-of-k-margin", "beam", "dvts", "best-of-k-batched", "beam-concurrent")
VLLM_ONLY = ("best-of-k-margin", "best-of-k-batched", "beam-concurrent")
ASYNC_FLOWS = ("beam-concurrent",)  # on the async engine
SEARCH_FLOWS = ("beam", "dvts", "beam-concurrent")
CSV_PATH = Path(__file__).parent / "results" / "real_search.csv"
CSV_COLUMNS = ("timestamp version machine engine threads model flow prompts k beam_width expansions prune_margin "
               "max_think_tokens seconds seconds_per_prompt think_tokens_per_prompt rounds_per_prompt "
               "prefill_tokens_per_prompt cached_tokens_per_prompt pruned_rows_per_prompt outside_engine_share "
               "load_before load_after command").split()  # fmt: skip


def sampling(args, seed: int) -> dict:
    return dict(max_think_tokens=args.max_think_tokens, max_answer_tokens=args.max_answer_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=seed)  # fmt: skip


def run_flow(name: str, engine, prompts, args) -> list:
    """The flow's GenerationResults, one per prompt."""
    if name == "best-of-k-batched":
        return engine.generate(list(prompts), k=args.k, **sampling(args, args.seed))
    if name == "beam-concurrent":
        import asyncio

        async def together():
            return await asyncio.gather(*(
                engine.asearch(prompt, method="beam", beam_width=args.beam_width, expansions=args.expansions,
                               **sampling(args, args.seed + i))
                for i, prompt in enumerate(prompts)
            ))  # fmt: skip

        return list(asyncio.run(together()))
    out = []
    for i, prompt in enumerate(prompts):
        options = sampling(args, args.seed + i)
        if name in ("beam", "dvts"):
            out.append(engine.search(prompt, method=name, beam_width=args.beam_width, expansions=args.expansions,
                                     **options))  # fmt: skip
        elif name == "best-of-k-margin":
            out.append(engine.generate(prompt, k=args.k, prune="margin", prune_margin=args.prune_margin, **options))
        else:
            out.append(engine.generate(prompt, k=args.k, **options))
    return out


def outside_engine(results) -> float:
    """The share of the searches' thinking time spent outside vLLM's calls: 1 - seconds["engine"] / ["think"]."""
    return round(
        1.0 - sum(r.stats.seconds["engine"] for r in results) / sum(r.stats.seconds["think"] for r in results), 3
    )


def measure(name: str, engine, prompts, args) -> dict:
    run_flow(name, engine, prompts[:1], args)  # warm-up at the measured sizes (first calls ran up to 20x slower)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results = run_flow(name, engine, prompts, args)
    seconds = time.perf_counter() - start
    n, search = len(prompts), name in SEARCH_FLOWS

    def per_prompt(field: str) -> float:
        return sum(getattr(r.stats, field) or 0 for r in results) / n

    row = {
        "flow": name, "seconds": round(seconds, 2), "seconds_per_prompt": round(seconds / n, 3),
        "think_tokens_per_prompt": per_prompt("think_generated_tokens"),
        "rounds_per_prompt": per_prompt("rounds") if search else "",
        "prefill_tokens_per_prompt": per_prompt("prefill_tokens"),
        "cached_tokens_per_prompt": per_prompt("think_cached_tokens") if search else "",  # generate: not counted
        "pruned_rows_per_prompt": per_prompt("pruned_rows"),
        # concurrent searches' time inside vLLM overlaps: a share of their sum would mean nothing
        "outside_engine_share": outside_engine(results) if search and args.engine == "vllm" and name not in
        ASYNC_FLOWS else "",
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    print(f"  {name:<18} {seconds:8.1f} s  {row['think_tokens_per_prompt']:7.1f} thinking tokens per prompt  "
          f"load {load_before:.2f} -> {row['load_after']:.2f}", flush=True)  # fmt: skip
    return row


def table(rows: list) -> str:
    reference = next((r for r in rows if r["flow"] == "best-of-k"), None)
    lines = ["| flow | thinking tokens / prompt | vs best-of-k | seconds / prompt | vs best-of-k | rounds / prompt | "
             "prompt tokens read / served by the prefix cache, per prompt | outside vLLM's calls | load (1 min) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        tokens = f"{r['think_tokens_per_prompt'] / reference['think_tokens_per_prompt']:.2f}x" if reference else "-"
        time_ = f"{r['seconds_per_prompt'] / reference['seconds_per_prompt']:.2f}x" if reference else "-"
        rounds = f"{r['rounds_per_prompt']:.1f}" if r["rounds_per_prompt"] != "" else "-"
        cached = f"{r['cached_tokens_per_prompt']:.0f}" if r["cached_tokens_per_prompt"] != "" else "-"
        outside = f"{r['outside_engine_share']:.0%}" if r["outside_engine_share"] != "" else "-"
        lines.append(f"| {r['flow']} | {r['think_tokens_per_prompt']:.1f} | {tokens} | "
                     f"{r['seconds_per_prompt']:.2f} | {time_} | {rounds} | "
                     f"{r['prefill_tokens_per_prompt']:.0f} / {cached} | {outside} | "
                     f"{r['load_before']:.2f} -> {r['load_after']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.real_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by python -m bench.real_model")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="default vllm")
    parser.add_argument("--prompts", type=int, default=8, help=f"how many prompts (at most {len(PROMPTS)})")
    parser.add_argument("--k", type=int, default=8, help="best-of-k rows (default 8)")
    parser.add_argument("--beam-width", type=int, default=2, help="search: beams / DVTS subtrees (default 2)")
    parser.add_argument("--expansions", type=int, default=2, help="search: children per survivor (default 2)")
    parser.add_argument("--prune-margin", type=float, default=1.0, help="best-of-k-margin: the margin (nats)")
    parser.add_argument("--max-think-tokens", type=int, default=64)
    parser.add_argument("--max-answer-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--flows", default=None, help=f"comma-separated, of {', '.join(FLOWS)} (default: all the "
                        "engine runs)")  # fmt: skip
    parser.add_argument("--csv", default=str(CSV_PATH), help="append the rows here ('' for none)")
    args = parser.parse_args(argv)
    default = [f for f in FLOWS if args.engine == "vllm" or f not in VLLM_ONLY]
    args.flows = default if args.flows is None else [f for f in args.flows.split(",") if f]
    unknown = [f for f in args.flows if f not in FLOWS]
    if unknown:
        parser.error(f"--flows: unknown {unknown}")
    if args.engine != "vllm" and set(args.flows) & set(VLLM_ONLY):
        parser.error(f"--flows: {', '.join(sorted(set(args.flows) & set(VLLM_ONLY)))} only on --engine vllm")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts: expected 1..{len(PROMPTS)}")
    return args


def load(args, serving: bool):
    if args.engine == "hf":
        from sprm_kernels.model import ReflectiveModel

        return ReflectiveModel.from_pretrained(args.model, device="cpu")
    if serving:
        from sprm_kernels.model.engines.vllm import AsyncVLLMReflectiveModel

        return AsyncVLLMReflectiveModel.from_pretrained(args.model, max_model_len=1024)
    from sprm_kernels.model.engines.vllm import VLLMReflectiveModel

    return VLLMReflectiveModel.from_pretrained(args.model, max_model_len=1024)


def main(argv=None) -> int:
    import torch

    from sprm_kernels.model.engines.base import supports_close

    args = parse(argv)
    torch.set_num_threads(args.threads)
    prompts = PROMPTS[: args.prompts]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads"
    command = "python -m bench.real_search " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"machine: {machine}; uptime: {os.popen('uptime').read().strip()}")
    print(f"{args.engine} engine, {args.prompts} prompts, best-of-{args.k} against beam / DVTS B={args.beam_width}, "
          f"E={args.expansions}, {args.max_think_tokens} thinking tokens, temperature {args.temperature}, top_p "
          f"{args.top_p}; {command}", flush=True)  # fmt: skip
    measured = {}
    synchronous = [f for f in args.flows if f not in ASYNC_FLOWS]
    for flows, serving in ((synchronous, False), ([f for f in args.flows if f in ASYNC_FLOWS], True)):
        if not flows:
            continue
        engine = load(args, serving)  # one engine at a time
        try:
            measured.update({flow: measure(flow, engine, prompts, args) for flow in flows})
        finally:
            if supports_close(engine):
                engine.close()
    rows = [measured[flow] for flow in args.flows]
    print()
    print(table(rows))
    if args.csv:
        path = Path(args.csv)
        common = {"timestamp": utc_timestamp(), "version": version_string(), "machine": machine,
                  "engine": args.engine, "threads": args.threads, "model": args.model, "prompts": args.prompts,
                  "k": args.k, "beam_width": args.beam_width, "expansions": args.expansions,
                  "prune_margin": args.prune_margin, "max_think_tokens": args.max_think_tokens,
                  "command": command}  # fmt: skip
        append_csv(path, [{**common, **row} for row in rows], CSV_COLUMNS)
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
