"""Share of wall time spent outside the model's forwards: `generate` (best-of-k) against step-level search.

    python -m bench.search_overhead [--n 20] [--difficulty 7] [--k 4] [--beam-width 2] [--expansions 2]

Runs both on the same test problems of the shipped model (one thread, CPU, the PyTorch route) and times every call
of the policy's forward; the rest is sampling, the scoring rule, the streaming scorer, row selection and forking.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--difficulty", type=int, default=7)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--expansions", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from sprm_kernels.model import load_engine
    from sprm_kernels.model.evaluation.compute_view import think_budget
    from sprm_kernels.model.shipped import SHIPPED_DIR, task

    rm = load_engine(SHIPPED_DIR, device="cpu", backend="torch")
    spent = [0.0]
    forward = rm.model.forward

    def timed_forward(*positional, **keywords):
        start = time.perf_counter()
        out = forward(*positional, **keywords)
        spent[0] += time.perf_counter() - start
        return out

    rm.model.forward = timed_forward
    problems = task.problems("test", args.n, seed=0, difficulty=args.difficulty)
    options = dict(temperature=1.0, top_p=1.0, max_think_tokens=think_budget(args.difficulty), max_answer_tokens=0)
    runs = {
        f"generate k={args.k}": lambda p, i: rm.generate(p.prompt, k=args.k, seed=i, **options),
        f"beam B={args.beam_width},E={args.expansions}": lambda p, i: rm.search(
            p.prompt, beam_width=args.beam_width, expansions=args.expansions, seed=i, **options
        ),
    }
    for name, call in runs.items():
        spent[0] = 0.0
        start = time.perf_counter()
        for i, problem in enumerate(problems):
            call(problem, i)
        total = time.perf_counter() - start
        outside = 1 - spent[0] / total
        print(f"{name}: {total:.2f} s, model forwards {spent[0]:.2f} s, outside the forwards {outside:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
