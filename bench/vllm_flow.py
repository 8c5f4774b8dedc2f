"""Best-of-k on vLLM, side by side: (1) ours on vLLM, (2) the reference flow on vLLM, (3) ours on the HF engine.

    python -m bench.vllm_flow                      # 64 problems x k=8 on the shipped model (needs vLLM)
    python -m bench.vllm_flow --prompts 8 --k 4    # a quick look

(1) `VLLMReflectiveModel.generate(all prompts)`: k thinking rows per prompt stop at `</think>`, scored from the
    forward that generated them, then one answer per prompt from the chosen row's cached KV.
(2) the public reference flow, on the same vLLM engine: k full responses per prompt (thinking and answer, until
    EOS), then a second forward over every prompt + response for the scores (`score`, a prefill that reads no
    prefix cache), the argmax of each prompt's k scores. Running its scoring pass on vLLM is generous to it.
(3) `ReflectiveModel.generate` per prompt (the HF engine takes one prompt per call).

Reported: problems/s, tokens through the model (prefill + decode + answer, + the scoring pass for (2)), peak
resident memory of this process and its children (vLLM's engine core and worker; vLLM preallocates its KV cache,
VLLM_CPU_KVCACHE_SPACE GiB on CPU), accuracy on the task, and the machine's load average around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import torch

from sprm_kernels.model import ReflectiveModel, choose_best
from sprm_kernels.model.shipped import SHIPPED_DIR
from sprm_kernels.model.shipped.task import is_correct, parse_answer, problems


class PeakMemory:
    """Peak resident memory (MiB) of this process and its descendants, sampled every 50 ms (Linux /proc)."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mib(os.getpid()))
            self._stop.wait(0.05)


def _tree_rss_mib(root: int) -> float:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def ours_vllm(engine, prompts, args):
    results = engine.generate(prompts, **_options(args))
    tokens = sum(r.stats.total_tokens for r in results)
    return (
        [r.answer for r in results],
        tokens,
        {"answer_cached_tokens": sum(r.stats.answer_cached_tokens for r in results)},
    )


def reference_vllm(engine, prompts, args):
    from sprm_kernels.model.engines.vllm import compat

    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    requests = [
        (
            ids,
            compat.sampling_params(
                max_tokens=args.max_think_tokens + args.max_answer_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed * 1_000_003 + i,
                stop_token_ids=engine.eos_token_ids,
            ),
        )  # fmt: skip
        for i, ids in enumerate(ids for ids in prompt_ids for _ in range(args.k))
    ]
    outputs = compat.run(engine.llm, requests)
    responses = [list(out.token_ids) for out in outputs]
    sequences = [ids + r for (ids, _), r in zip(requests, responses, strict=True)]
    scores = engine.score(sequences)  # the second pass over every response
    answers = []
    for p in range(len(prompts)):
        rows = range(p * args.k, (p + 1) * args.k)
        best = p * args.k + choose_best([scores[j].value for j in rows], [True] * args.k)
        response = responses[best]
        after = response.index(engine.think_end_id) + 1 if engine.think_end_id in response else len(response)
        answers.append(engine.tokenizer.decode(response[after:], skip_special_tokens=True))
    generated = sum(len(ids) - out.num_cached_tokens + max(len(out.token_ids) - 1, 0)
                    for (ids, _), out in zip(requests, outputs, strict=True))  # fmt: skip
    return answers, generated + sum(len(s) for s in sequences), {}


def ours_hf(engine, prompts, args):
    answers, tokens = [], 0
    for i, prompt in enumerate(prompts):
        result = engine.generate(prompt, **{**_options(args), "seed": args.seed + i})
        answers.append(result.answer)
        tokens += result.stats.total_tokens
    return answers, tokens, {}


def _options(args) -> dict:
    return dict(
        k=args.k, max_think_tokens=args.max_think_tokens, max_answer_tokens=args.max_answer_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip


def measure(name, flow, engine, problem_list, args) -> dict:
    prompts = [p.prompt for p in problem_list]
    flow(engine, prompts[: min(2, len(prompts))], args)  # warm-up (first-call allocations)
    load_before = os.getloadavg()[0]
    with PeakMemory() as memory:
        start = time.perf_counter()
        answers, tokens, extra = flow(engine, prompts, args)
        seconds = time.perf_counter() - start
    correct = sum(is_correct(p, parse_answer(a)) for p, a in zip(problem_list, answers, strict=True))
    row = {
        "flow": name, "problems": len(prompts), "k": args.k, "seconds": round(seconds, 2),
        "problems_per_s": round(len(prompts) / seconds, 2), "tokens_through_model": tokens,
        "peak_rss_mib": round(memory.peak), "accuracy": round(correct / len(prompts), 3),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], **extra,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SHIPPED_DIR)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-think-tokens", type=int, default=100)
    parser.add_argument("--max-answer-tokens", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flows", default="ours-vllm,reference-vllm,ours-hf")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    problem_list = problems("test", args.prompts, seed=args.seed)
    flows = args.flows.split(",")
    rows = []
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                      "model": args.model, "load_avg_1m_start": round(os.getloadavg()[0], 2)}), flush=True)  # fmt: skip
    if any(f.endswith("-vllm") for f in flows):
        from sprm_kernels.model.engines.vllm import VLLMReflectiveModel

        engine = VLLMReflectiveModel.from_pretrained(args.model)
        try:
            if "ours-vllm" in flows:
                rows.append(measure("ours-vllm", ours_vllm, engine, problem_list, args))
            if "reference-vllm" in flows:
                rows.append(measure("reference-vllm", reference_vllm, engine, problem_list, args))
        finally:
            engine.close()
    if "ours-hf" in flows:
        engine = ReflectiveModel.from_pretrained(args.model, device="cpu")
        rows.append(measure("ours-hf", ours_hf, engine, problem_list, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
