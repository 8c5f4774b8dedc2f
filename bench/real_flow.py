"""Best-of-k on real weights at fixed lengths: the converted SmolLM2-135M-Instruct (`python -m bench.real_model`).

    python -m bench.real_model --out /tmp/smollm2
    VLLM_CPU_KVCACHE_SPACE=1 python -m bench.real_flow --model /tmp/smollm2              # 8 prompts x k=8, 64+16
    VLLM_CPU_KVCACHE_SPACE=1 python -m bench.real_flow --model /tmp/smollm2 --prompts 2 --k 2 --max-think-tokens 8

The checkpoint never writes `</think>`, so every row of ours thinks exactly --max-think-tokens; the other flows are
held to the same lengths. Flows (--flows, comma-separated; the vLLM ones need the vLLM venv):

- ours-vllm: `VLLMReflectiveModel.generate(all prompts)` (as bench.vllm_flow.ours_vllm): k rows per prompt scored in
  the forward that wrote them, then one answer per prompt (up to --max-answer-tokens, EOS stops it) from the cache;
- reference-vllm: the reference flow on the same vLLM engine: k full responses per prompt with `ignore_eos` and
  max_tokens = think + answer, a second forward over every prompt + response for the scores, the argmax;
- plain-vllm: the limit: plain vLLM generation of the same k x think tokens (`ignore_eos`), then one answer per
  prompt (prompt + a row's thinking + `</think>`, EOS stops it); no head, no scoring, no choice;
- ours-hf: `ReflectiveModel.generate` per prompt (as bench.vllm_flow.ours_hf);
- reference-hf: bench.reference_flow.reference_generate per prompt, its responses held to think + answer tokens
  (EOS suppressed until then with `min_new_tokens`), then k scoring forwards and the argmax.

Tokens generated: thinking + answer tokens sampled (prefills and the scoring pass not counted). The head is
random: the choices mean nothing, only the times do. Prints a table (machine, load, command) and
appends rows to bench/results/real_flow.csv.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.common import append_csv, utc_timestamp, version_string

PROMPTS = [
    "What is 17 * 23? Think step by step.",
    "Name three prime numbers larger than 10 and explain why they are prime.",
    "Explain why the sky is blue in two sentences.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Write a short plan for learning to play the guitar.",
    "What is the capital of Australia, and why is it not Sydney?",
    "If a shirt costs 20 dollars after a 20% discount, what was the original price?",
    "Give two reasons to water plants in the morning.",
]
FLOWS = ("ours-vllm", "reference-vllm", "plain-vllm", "ours-hf", "reference-hf")
CSV_PATH = Path(__file__).parent / "results" / "real_flow.csv"
CSV_COLUMNS = ("timestamp version machine threads model flow prompts k max_think_tokens max_answer_tokens seconds "
               "tokens_generated load_before load_after command").split()  # fmt: skip


def options(args) -> dict:
    return dict(k=args.k, max_think_tokens=args.max_think_tokens, max_answer_tokens=args.max_answer_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed)  # fmt: skip


def generated(result) -> int:
    return sum(len(c.token_ids) for c in result.candidates) + len(result.answer_token_ids)


def ours_vllm(engine, prompts, args):
    """All prompts in one call (as bench.vllm_flow.ours_vllm)."""
    return sum(generated(r) for r in engine.generate(prompts, **options(args)))


def ours_hf(engine, prompts, args):
    """One prompt per call (as bench.vllm_flow.ours_hf)."""
    return sum(generated(engine.generate(p, **{**options(args), "seed": args.seed + i})) for i, p in enumerate(prompts))


def reference_vllm(engine, prompts, args):
    """k responses of exactly think + answer tokens per prompt, a scoring pass over each, the argmax."""
    from sprm_kernels.model import choose_best
    from sprm_kernels.model.engines.vllm import compat

    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    rows = [ids for ids in prompt_ids for _ in range(args.k)]
    params = [
        compat.sampling_params(max_tokens=args.max_think_tokens + args.max_answer_tokens, ignore_eos=True,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed * 1_000_003 + i)
        for i in range(len(rows))
    ]  # fmt: skip
    outputs = compat.run(engine.llm, list(zip(rows, params, strict=True)))
    sequences = [ids + list(out.token_ids) for ids, out in zip(rows, outputs, strict=True)]
    scores = engine.score(sequences)  # the second pass over every response
    for p in range(len(prompts)):
        choose_best([scores[p * args.k + j].value for j in range(args.k)], [True] * args.k)
    return sum(len(out.token_ids) for out in outputs)


def plain_vllm(engine, prompts, args):
    """The same thinking tokens and one answer per prompt through vLLM alone: the floor for ours-vllm."""
    from sprm_kernels.model.engines.vllm import compat

    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    rows = [ids for ids in prompt_ids for _ in range(args.k)]
    think = [
        (ids, compat.sampling_params(max_tokens=args.max_think_tokens, ignore_eos=True, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed * 1_000_003 + i))
        for i, ids in enumerate(rows)
    ]  # fmt: skip
    thoughts = compat.run(engine.llm, think)
    answers = [
        (ids + list(thoughts[p * args.k].token_ids) + [engine.think_end_id],
         compat.sampling_params(max_tokens=args.max_answer_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed + p, stop_token_ids=engine.eos_token_ids))
        for p, ids in enumerate(prompt_ids)
    ]  # fmt: skip
    written = compat.run(engine.llm, answers)
    return sum(len(t.token_ids) for t in thoughts) + sum(len(a.token_ids) for a in written)


def reference_hf(engine, prompts, args):
    """bench.reference_flow on the HF engine's model and head, each response exactly think + answer tokens."""
    from bench.reference_flow import reference_generate

    total = args.max_think_tokens + args.max_answer_tokens
    config = engine.model.generation_config
    saved = config.min_new_tokens
    config.min_new_tokens = total  # no EOS before the budget: fixed lengths, as ignore_eos on vLLM
    try:
        tokens = 0
        for i, prompt in enumerate(prompts):
            result = reference_generate(
                engine.model, engine.tokenizer, engine.head, prompt, k=args.k, max_new_tokens=total,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed + i,
            )  # fmt: skip
            tokens += result.stats.generated_tokens
    finally:
        config.min_new_tokens = saved
    return tokens


def run_flow(name, engine, prompts, args) -> tuple[float, int]:
    flow = {"ours-vllm": ours_vllm, "reference-vllm": reference_vllm, "plain-vllm": plain_vllm,
            "ours-hf": ours_hf, "reference-hf": reference_hf}[name]  # fmt: skip
    return flow(engine, prompts, args)


def measure(name, engine, prompts, args) -> dict:
    run_flow(name, engine, prompts[:1], args)  # warm-up at the measured sizes (first calls ran up to 20x slower)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    tokens = run_flow(name, engine, prompts, args)
    seconds = time.perf_counter() - start
    row = {"flow": name, "seconds": round(seconds, 2), "tokens_generated": tokens,
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}  # fmt: skip
    print(f"  {name:<15} {seconds:8.1f} s  {tokens:7d} tokens  load {load_before:.2f} -> {row['load_after']:.2f}",
          flush=True)  # fmt: skip
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by python -m bench.real_model")
    parser.add_argument("--prompts", type=int, default=8, help=f"how many prompts (at most {len(PROMPTS)})")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-think-tokens", type=int, default=64)
    parser.add_argument("--max-answer-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--flows", default=",".join(FLOWS), help=f"comma-separated, of {', '.join(FLOWS)}")
    parser.add_argument("--csv", default=str(CSV_PATH), help="append the rows here ('' for none)")
    args = parser.parse_args(argv)
    flows = [f for f in args.flows.split(",") if f]
    unknown = [f for f in flows if f not in FLOWS]
    if unknown or not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--flows: unknown {unknown}" if unknown else f"--prompts: expected 1..{len(PROMPTS)}")
    torch.set_num_threads(args.threads)
    prompts = PROMPTS[: args.prompts]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads"
    command = "python -m bench.real_flow " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"machine: {machine}; uptime: {os.popen('uptime').read().strip()}")
    print(f"{args.prompts} prompts x k={args.k}, {args.max_think_tokens} thinking + {args.max_answer_tokens} answer "
          f"tokens, temperature {args.temperature}, top_p {args.top_p}; {command}", flush=True)  # fmt: skip
    rows = []
    # the HF flows first: after a vLLM engine is closed its processes were seen still busy for a while
    if any(f.endswith("-hf") for f in flows):
        from sprm_kernels.model import ReflectiveModel

        engine = ReflectiveModel.from_pretrained(args.model, device="cpu")
        rows += [measure(f, engine, prompts, args) for f in flows if f.endswith("-hf")]
    if any(f.endswith("-vllm") for f in flows):
        from sprm_kernels.model.engines.vllm import VLLMReflectiveModel

        engine = VLLMReflectiveModel.from_pretrained(args.model, max_model_len=1024)
        try:
            rows += [measure(f, engine, prompts, args) for f in flows if f.endswith("-vllm")]
        finally:
            engine.close()
    by_name = {row["flow"]: row for row in rows}
    print("\n| flow | seconds | tokens generated | vs ours (same engine) | load (1 min) |\n|---|---:|---:|---:|---|")
    for row in rows:
        ours = by_name.get("ours-" + row["flow"].split("-")[1])
        ratio = f"{row['seconds'] / ours['seconds']:.2f}x" if ours else "-"
        print(f"| {row['flow']} | {row['seconds']:.1f} | {row['tokens_generated']} | {ratio} | "
              f"{row['load_before']:.2f} -> {row['load_after']:.2f} |")  # fmt: skip
    if args.csv:
        path = Path(args.csv)
        common = {"timestamp": utc_timestamp(), "version": version_string(), "machine": machine,
                  "threads": args.threads, "model": args.model, "prompts": args.prompts, "k": args.k,
                  "max_think_tokens": args.max_think_tokens, "max_answer_tokens": args.max_answer_tokens,
                  "command": command}  # fmt: skip
        append_csv(path, [{**common, **row} for row in rows], CSV_COLUMNS)
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
