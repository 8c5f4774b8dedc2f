"""Kernel microbenchmark: `sprm_score` and `StepScorer.update` against the eager references.

    python -m bench.kernels [--quick] [--csv PATH] [--device cpu|cuda] [--max-call-s 10] [--max-gb 8] [--no-compile]

CUDA: the fused Triton kernels, bf16 and fp16, timed with triton.testing.do_bench (median, 20th and 80th
percentiles), against the eager reference, torch.compile of it, and `cublas_epilogue` (the best unfused
PyTorch: one cuBLAS GEMM with b1 in its epilogue, ReLU in place, one GEMV, the per-candidate tail in fp32); the
decode-time scorer also under CUDA graphs. The cuBLAS rows are code that has never run here (no GPU): not
measured. The roofline floor is the H100 figures of docs/method.md §9. CPU: the PyTorch path (backend="torch")
in fp32 against the
same references, wall-clock timed; the roofline floor is this CPU's copy bandwidth and fp32 GEMM rate, measured
at start-up. Shapes whose eager reference would need more than --max-gb or take longer than --max-call-s per
call (estimated from the floor) are skipped and listed. Results are appended to a tidy CSV (see bench.common).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sprm_kernels import StepScorer, sprm_score, sprm_score_reference
from sprm_kernels.dispatch import interpreter_enabled
from sprm_kernels.reference import PROB_EPS

from . import common

ROWS = (8, 32, 512, 4096, 32768)  # S: 8 and 32 are decode-sized (one step per candidate)
HIDDEN_SIZES = (1536, 3584, 5120)
DECODE_BATCHES = (8, 32)
QUICK_ROWS, QUICK_HIDDEN_SIZES, QUICK_DECODE_BATCHES = (8, 32, 512), (1536,), (8, 32)
MAX_CANDIDATES = 32  # larger S: 32 candidates with S / 32 steps each
GROUP_SIZE = 8  # best-of-8 groups
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Problem:
    """Inputs of one sprm_score call: packed hidden [2S, H], S step rows over B candidates, the head."""

    hidden: torch.Tensor
    step_index: torch.Tensor
    offsets: torch.Tensor
    head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def random_head(hidden_size: int, dtype: torch.dtype, device: torch.device):
    """Head weights in nn.Linear layout, scaled so that logits are O(1)."""
    width = 2 * hidden_size
    w1 = torch.randn(width, hidden_size, device=device, dtype=dtype) / hidden_size**0.5
    b1 = torch.randn(width, device=device, dtype=dtype) * 0.1
    w2 = torch.randn(1, width, device=device, dtype=dtype) * 2 / width**0.5
    b2 = torch.randn(1, device=device, dtype=dtype) * 0.5
    return w1, b1, w2, b2


def make_problem(rows: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> Problem:
    torch.manual_seed(0)
    num_candidates = min(rows, MAX_CANDIDATES)
    hidden = torch.randn(2 * rows, hidden_size, device=device, dtype=dtype)
    chosen = torch.randperm(2 * rows, device=device)[:rows].view(num_candidates, -1).sort(dim=1).values
    offsets = torch.arange(0, rows + 1, rows // num_candidates, device=device)
    return Problem(hidden, chosen.flatten(), offsets, random_head(hidden_size, dtype, device))


def eager_step_update(hidden, is_step, w1, b1, w2, b2, sum_log, count) -> torch.Tensor:
    """One decode step the eager way: the head in the input dtype, then sigmoid, clamp, log, masked add."""
    logits = F.linear(F.relu(F.linear(hidden, w1, b1)), w2, b2).squeeze(-1).float()
    probs = torch.sigmoid(logits)
    sum_log.add_(torch.where(is_step, torch.log(torch.clamp(probs, min=PROB_EPS)), 0.0))
    count.add_(is_step.to(count.dtype))
    return probs


def cublas_epilogue(hidden, step_index, offsets, w1, b1, w2, b2, group_size=None) -> torch.Tensor:
    """Per-candidate scores the unfused way a user would write it on a GPU: gather, addmm (cuBLAS GEMM, b1 in the
    epilogue), ReLU in place, one GEMV, then log-sigmoid, clamp and the segment means in fp32; best-of-group
    argmax. Writes and reads the [S, 2H] intermediate once, unlike the fused kernel."""
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, step_index)
    act = torch.addmm(b1, rows, w1.t()).relu_()
    logits = torch.mv(act, w2.reshape(-1)).float() + b2.float()
    log_p = F.logsigmoid(logits).clamp_(min=math.log(PROB_EPS))
    counts = offsets.diff()
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=hidden.device), counts)
    sums = torch.zeros(counts.numel(), device=hidden.device).index_add_(0, owner, log_p)
    score = torch.where(counts > 0, torch.exp(sums / counts.clamp(min=1)), 0.0)
    return score if group_size is None else score.view(-1, group_size).argmax(1)


# ---------------------------------------------------------------------------------------------------------------
# Providers: name -> zero-argument callable, built per shape


def score_providers(problem: Problem, device: torch.device, compiled_reference) -> dict[str, Callable]:
    args = (problem.hidden, problem.step_index, problem.offsets, *problem.head)
    backend = "triton" if device.type == "cuda" else "torch"
    providers = {
        backend: lambda: sprm_score(*args, group_size=GROUP_SIZE, backend=backend),
        "eager": lambda: sprm_score_reference(*args, group_size=GROUP_SIZE),
    }
    if device.type == "cuda":  # the launch alone, without the argument checks' host synchronisation
        from sprm_kernels.kernels.sprm_score import launch_sprm_score

        w1, b1, w2, b2 = problem.head
        launch_args = (*args[:3], w1, b1, w2.reshape(-1), b2.reshape(-1))
        providers["triton_launch"] = lambda: launch_sprm_score(
            *launch_args, group_size=GROUP_SIZE, return_step_scores=False
        )
        providers["cublas_epilogue"] = lambda: cublas_epilogue(*args, group_size=GROUP_SIZE)
    if compiled_reference is not None:
        providers["eager_compiled"] = lambda: compiled_reference(*args, group_size=GROUP_SIZE)
    return providers


def step_scorer_providers(batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)
    head = random_head(hidden_size, dtype, device)
    hidden = torch.randn(batch, hidden_size, device=device, dtype=dtype)
    is_step = torch.rand(batch, device=device) < 0.5
    backend = "triton" if device.type == "cuda" else "torch"
    scorer = StepScorer(*head, batch_size=batch, group_size=GROUP_SIZE, backend=backend)
    sum_log = torch.zeros(batch, device=device)
    count = torch.zeros(batch, dtype=torch.int64, device=device)
    providers = {
        backend: lambda: scorer.update(hidden, is_step),
        "eager": lambda: eager_step_update(hidden, is_step, *head, sum_log, count),
    }
    if device.type == "cuda":  # the decode loop captures the update in a CUDA graph
        providers[f"{backend}_cudagraph"] = capture_cuda_graph(providers[backend]).replay
        providers["eager_cudagraph"] = capture_cuda_graph(providers["eager"]).replay
    return providers


def capture_cuda_graph(fn: Callable) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def compile_reference(device: torch.device):
    """torch.compile of the eager reference, dynamic shapes (one compile, a few recompiles); None if unusable."""
    try:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        return torch.compile(sprm_score_reference, dynamic=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not benchmarked", reported below
        print(f"torch.compile unavailable on {device.type}: {error!r}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Settings:
    device: torch.device
    roofline: common.Roofline
    cpu_budget_s: float  # seconds of repeats per shape, shared by its providers (CPU)
    wait_quiet_s: float  # CPU: longest wait for a quiet machine before each shape
    max_call_s: float
    max_bytes: float
    device_name: str
    timestamp: str
    version: str
    load: common.OtherLoad


def time_providers(settings: Settings, providers: dict[str, Callable]) -> dict[str, common.Timing]:
    """do_bench per provider on CUDA; on CPU all providers in turns, so that background load hits them alike."""
    if settings.device.type == "cuda":
        with settings.load.measuring():
            return {name: common.time_cuda(fn) for name, fn in providers.items()}
    if settings.wait_quiet_s > 0:
        common.wait_until_quiet(settings.wait_quiet_s)
    with settings.load.measuring():
        return common.time_cpu_interleaved(providers, budget_s=settings.cpu_budget_s)


def measure_all(settings: Settings, kernel, providers, dtype, rows, hidden_size, extras=None) -> list[dict]:
    timings = time_providers(settings, providers)
    extras = extras or {}
    rows_out = []
    for name, fn in providers.items():
        rows_out += metric_rows(settings, kernel, name, fn, timings[name], dtype, rows, hidden_size, extras.get(name))
    return rows_out


def metric_rows(settings: Settings, kernel, provider, fn, timing, dtype, rows, hidden_size, extra=None) -> list[dict]:
    """Timing, throughput, roofline and peak-memory rows of one provider at one shape."""
    peak_mb = common.peak_memory_mb(fn, settings.device)
    element_size = torch.empty((), dtype=dtype).element_size()
    flops = common.head_flops(rows, hidden_size)
    nbytes = common.head_min_bytes(rows, hidden_size, element_size)
    floor_ms = settings.roofline.floor_s(flops, nbytes) * 1e3
    # Throughputs fall as time grows: their 20th percentile comes from the time's 80th.
    per_second = lambda amount, ms: amount / (ms * 1e-3)
    values = {
        "ms": (timing.p50, timing.p20, timing.p80),
        "GB/s": tuple(per_second(nbytes, t) / 1e9 for t in (timing.p50, timing.p80, timing.p20)),
        "TFLOP/s": tuple(per_second(flops, t) / 1e12 for t in (timing.p50, timing.p80, timing.p20)),
        "roofline_pct": tuple(100 * floor_ms / t for t in (timing.p50, timing.p80, timing.p20)),
        "peak_mem_MB": (peak_mb,) * 3,
        **(extra or {}),
    }
    shared = dict(kernel=kernel, provider=provider, dtype=str(dtype).removeprefix("torch."), S=rows, H=hidden_size)
    return [
        {**shared, "metric": metric, "p50": _fmt(p50), "p20": _fmt(p20), "p80": _fmt(p80), **stamp(settings)}
        for metric, (p50, p20, p80) in values.items()
    ]


def stamp(settings: Settings) -> dict:
    return dict(device_name=settings.device_name, timestamp=settings.timestamp, version=settings.version)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def too_big(settings: Settings, rows: int, hidden_size: int, dtype: torch.dtype) -> str | None:
    """Why the eager reference at this shape is over the caps (memory, or estimated time per call), or None."""
    element_size = torch.empty((), dtype=dtype).element_size()
    # hidden [2S, H], gathered rows [S, H], two [S, 2H] intermediates (linear, relu), W1 [2H, H]
    eager_elements = 2 * rows * hidden_size + rows * hidden_size + 4 * rows * hidden_size + 2 * hidden_size**2
    if eager_elements * element_size > settings.max_bytes:
        return f"eager needs ~{eager_elements * element_size / 1e9:.1f} GB > {settings.max_bytes / 1e9:.0f} GB"
    if settings.device.type == "cpu":
        flops = common.head_flops(rows, hidden_size)
        estimate = settings.roofline.floor_s(flops, common.head_min_bytes(rows, hidden_size, element_size))
        if estimate > settings.max_call_s:
            return f"eager call >= ~{estimate:.0f} s (roofline estimate) > --max-call-s {settings.max_call_s:g}"
    return None


def run_sprm_score(settings: Settings, dtype, rows, hidden_size, compiled_reference, skipped) -> list[dict]:
    problem = make_problem(rows, hidden_size, dtype, settings.device)
    providers = score_providers(problem, settings.device, compiled_reference)
    extras = {}
    if "eager_compiled" in providers:
        start = time.perf_counter()
        try:
            providers["eager_compiled"]()  # compiles (or recompiles for a new shape)
            _synchronize(settings.device)
            extras["eager_compiled"] = {"compile_s": (time.perf_counter() - start,) * 3}
        except Exception as error:  # noqa: BLE001 - reported as a skipped provider
            skipped.append(("sprm_score", "eager_compiled", str(dtype), rows, hidden_size, f"failed: {error!r}"[:300]))
            del providers["eager_compiled"]
    return measure_all(settings, "sprm_score", providers, dtype, rows, hidden_size, extras)


def run_step_scorer(settings: Settings, dtype, batch, hidden_size) -> list[dict]:
    providers = step_scorer_providers(batch, hidden_size, dtype, settings.device)
    return measure_all(settings, "step_scorer_update", providers, dtype, batch, hidden_size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Report


def print_table(rows: list[dict]) -> None:
    """One line per (kernel, dtype, S, H, provider): median ms [p20, p80], throughputs, memory, speedup."""
    table: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["kernel"], row["dtype"], int(row["S"]), int(row["H"]), row["provider"])
        table.setdefault(key, {})[row["metric"]] = row
    headers = ["kernel", "dtype", "S", "H", "provider", "ms p50", "[p20, p80]", "GB/s", "TFLOP/s", "roofline%"]
    headers += ["peak MB", "vs eager"]
    lines = []
    for key, metrics in table.items():
        kernel, dtype, rows_, hidden_size, provider = key
        ms = metrics["ms"]
        eager = table.get((kernel, dtype, rows_, hidden_size, "eager"), {}).get("ms")
        speedup = f"{float(eager['p50']) / float(ms['p50']):.2f}x" if eager and provider != "eager" else ""
        lines.append(
            [
                kernel, dtype, rows_, hidden_size, provider,
                f"{float(ms['p50']):.4g}", f"[{float(ms['p20']):.4g}, {float(ms['p80']):.4g}]",
                f"{float(metrics['GB/s']['p50']):.4g}", f"{float(metrics['TFLOP/s']['p50']):.3g}",
                f"{float(metrics['roofline_pct']['p50']):.1f}", f"{float(metrics['peak_mem_MB']['p50']):.1f}",
                speedup,
            ]
        )  # fmt: skip
    print(common.format_table(headers, lines))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes (well under a minute on CPU)")
    parser.add_argument("--csv", default=str(common.DEFAULT_CSV), help="CSV to append to (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-call-s", type=float, default=10.0, help="CPU: skip shapes estimated slower per call")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip shapes whose eager reference needs more")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=sorted(DTYPES),
        help="repeatable (default: bfloat16 and float16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, metavar="SECONDS",
        help="CPU: before each shape, wait up to SECONDS for other processes to leave the CPUs (<5%% busy)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("bench.kernels times compiled code: unset TRITON_INTERPRET (the interpreter is far too slow)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        roofline, dtypes = common.SPEC9_H100, (torch.bfloat16, torch.float16)
        max_bytes = min(args.max_gb * 1e9, 0.8 * common.cuda_free_bytes(device))
    else:
        if args.wait_quiet > 0:
            common.wait_until_quiet(args.wait_quiet)
        roofline, dtypes, max_bytes = common.calibrate_cpu_roofline(), (torch.float32,), args.max_gb * 1e9
    if args.dtype:
        dtypes = tuple(DTYPES[name] for name in args.dtype)
    settings = Settings(
        device=device,
        roofline=roofline,
        cpu_budget_s=0.5 if args.quick else 2.0,
        wait_quiet_s=args.wait_quiet,
        max_call_s=args.max_call_s,
        max_bytes=max_bytes,
        device_name=common.device_name(device),
        timestamp=common.utc_timestamp(),
        version=common.version_string(),
        load=common.OtherLoad(),
    )
    print(
        f"{settings.device_name}, torch {torch.__version__}, sprm_kernels {settings.version}, {settings.timestamp}\n"
        f"roofline floor ({roofline.source}): {roofline.bytes_per_s / 1e9:.1f} GB/s copy, "
        f"{roofline.flops_per_s / 1e12:.3f} TFLOP/s GEMM"
    )
    compile_note = ""
    if args.no_compile:
        compile_note = "--no-compile"
    elif args.quick and device.type == "cpu":
        compile_note = "--quick on CPU (inductor's first compile takes ~30 s on 2 cores with a cold cache)"
    compiled_reference = None if compile_note else compile_reference(device)
    if compile_note:
        print(f"torch.compile of the reference left out: {compile_note}")

    row_sizes, hidden_sizes, batches = (
        (QUICK_ROWS, QUICK_HIDDEN_SIZES, QUICK_DECODE_BATCHES) if args.quick else (ROWS, HIDDEN_SIZES, DECODE_BATCHES)
    )
    results = []
    skipped: list[tuple] = []
    for dtype, hidden_size in itertools.product(dtypes, hidden_sizes):
        for rows in row_sizes:
            reason = too_big(settings, rows, hidden_size, dtype)
            if reason:
                skipped.append(("sprm_score", "all", str(dtype), rows, hidden_size, reason))
                continue
            print(f"sprm_score {dtype} S={rows} H={hidden_size}", file=sys.stderr, flush=True)
            results += run_sprm_score(settings, dtype, rows, hidden_size, compiled_reference, skipped)
        for batch in batches:
            print(f"step_scorer_update {dtype} B={batch} H={hidden_size}", file=sys.stderr, flush=True)
            results += run_step_scorer(settings, dtype, batch, hidden_size)
    print_table(results)
    results += machine_rows(settings)
    common.append_csv(args.csv, results)
    for kernel, provider, dtype, rows, hidden_size, reason in skipped:
        print(f"skipped: {kernel} {provider} {dtype} S={rows} H={hidden_size}: {reason}")
    load = settings.load.percent()
    if load is not None:
        busy = " - timings are noisy; CPU providers were timed in turns to share the noise" if load > 5 else ""
        print(f"other processes used {load:.0f}% of the CPUs while timing{busy}")
    print(f"appended {len(results)} rows to {args.csv}")


def machine_rows(settings: Settings) -> list[dict]:
    """The floors behind roofline_pct (kernel "roofline_floor", provider = their source) and the share of the CPUs
    that other processes used while timing (kernel "machine_load"), as rows of the CSV."""
    roofline = settings.roofline
    values = [
        ("roofline_floor", roofline.source, "GB/s", roofline.bytes_per_s / 1e9),
        ("roofline_floor", roofline.source, "TFLOP/s", roofline.flops_per_s / 1e12),
    ]
    if settings.load.percent() is not None:
        values.append(("machine_load", "other_processes", "cpu_pct", settings.load.percent()))
    return [
        dict(kernel=kernel, provider=provider, dtype="", S=0, H=0, metric=metric,
             p50=_fmt(value), p20=_fmt(value), p80=_fmt(value), **stamp(settings))
        for kernel, provider, metric, value in values
    ]  # fmt: skip


if __name__ == "__main__":
    main()
