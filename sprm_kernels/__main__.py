"""`python -m sprm_kernels`: score a random batch of k candidates on every available route and compare each with
the float64 reference. A one-minute answer to "does it work on this machine, and which route runs?"."""

from __future__ import annotations

import argparse
import time

import torch

from . import __version__, resolve_backend, sprm_score, sprm_score_reference, step_positions
from .dispatch import interpreter_enabled, triton_available


def _random_batch(k: int, length: int, hidden_size: int, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 100, (k, length), generator=gen)
    ids[torch.rand(k, length, generator=gen) < 0.1] = 3  # step token
    ids[:, 0], ids[:, -1] = 1, 2  # <think> ... </think>
    hidden = torch.randn(k, length, hidden_size, generator=gen)
    head = (
        torch.randn(2 * hidden_size, hidden_size, generator=gen) / hidden_size**0.5,
        torch.randn(2 * hidden_size, generator=gen) * 0.1,
        torch.randn(1, 2 * hidden_size, generator=gen) / hidden_size**0.5,
        torch.zeros(1),
    )
    return ids.to(device), hidden.to(device, dtype), [t.to(device, dtype) for t in head]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sprm_kernels", description=" ".join(__doc__.split()))
    parser.add_argument("--k", type=int, default=8, help="candidates (one group)")
    parser.add_argument("--length", type=int, default=256, help="tokens per candidate")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"sprm-kernels {__version__}  torch {torch.__version__}  triton available: {triton_available()}  "
          f"interpreter: {interpreter_enabled()}")  # fmt: skip
    print(f"{'device':6s} {'route':7s} {'steps':>6s} {'max |err| log score':>20s} {'best':>5s} {'ms':>8s}")
    for device in devices:
        ids, hidden, head = _random_batch(args.k, args.length, args.hidden_size, dtype, device, seed=0)
        index, offsets = step_positions(ids, step_token_ids=[3], think_start_id=1, think_end_id=2)
        truth = sprm_score_reference(
            hidden.double().cpu(), index.cpu(), offsets.cpu(), *[t.double().cpu() for t in head], group_size=args.k
        )
        routes = ["torch"] + (["triton"] if resolve_backend(torch.device(device)) == "triton" else [])
        for route in routes:
            sprm_score(hidden, index, offsets, *head, group_size=args.k, backend=route)  # warm-up / compile
            start = time.perf_counter()
            result = sprm_score(hidden, index, offsets, *head, group_size=args.k, backend=route)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed_ms = (time.perf_counter() - start) * 1e3
            error = (result.log_score.cpu().double() - truth.log_score).abs().max().item()
            print(f"{device:6s} {route:7s} {index.numel():6d} {error:20.2e} {result.best.item():5d} {elapsed_ms:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
