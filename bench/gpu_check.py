"""One prepared GPU check: everything a first GPU session should measure, in one command, under a time budget.

    python -m bench.gpu_check --out DIR [--dry-run] [--budget-s 450]

Writes DIR/gpu_check.json (every figure) and DIR/gpu_check.md (tables). Steps, each in its own process with its own
time limit (a hang costs that step, never the whole budget; a step that runs out keeps what it had written):

  machine      torch, triton, Python, GPU name, SMs, L2, memory
  parity       every kernel at H = 5120 bf16, S = 8, 32, 512, 32768, against float64 references
  determinism  bitwise repetition: 2,000 decode launches (the ticket reduction), StepScorer steps, large S
  graph        StepScorer replayed from a CUDA graph against eager, with flags and wanted rows changing per step
  timings      sprm_score and StepScorer against eager, torch.compile and cuBLAS + epilogue, % of a roofline from
               a measured copy bandwidth and GEMM rate
  pytest       python -m pytest -q -m cuda (the CUDA-only tests, CUDA-graph tests included)
  aot          python -m sprm_kernels.aot with the image's triton (compile, registers, spills, modeled goals)

`--dry-run` runs the same steps at small shapes on CPU, the kernels under the Triton interpreter (no CUDA graph:
the graph step compares two eager scorers fed the same flags; timings are wall-clock and meaningless), so CI can
prove the script works (tests/bench/test_gpu_check.py). Install on the GPU image with `pip install --no-deps -e .`;
nothing here needs vLLM or the network. See docs/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("machine", "parity", "determinism", "graph", "timings", "pytest", "aot")
# Seconds per step on the GPU (the sum is over the 450 s default budget on purpose: a step ends early when done,
# and each step gets at most what is left of the budget, keeping 5 s for the report).
GPU_LIMITS = {"machine": 60, "parity": 150, "determinism": 60, "graph": 60, "timings": 150, "pytest": 180, "aot": 150}
DRY_LIMITS = {"machine": 30, "parity": 40, "determinism": 30, "graph": 30, "timings": 30, "pytest": 60, "aot": 60}
GPU_ROWS, DRY_ROWS = (8, 32, 512, 32768), (8, 32)
GPU_HIDDEN, DRY_HIDDEN = 5120, 40
GROUP = 8


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs each step in a child process, with its limit


def run_step(name: str, out: Path, dry_run: bool, limit_s: float) -> dict:
    """Runs `python -m bench.gpu_check --step NAME` in a new session and kills the whole group at the limit."""
    result_path = out / "steps" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.gpu_check", "--step", name, "--out", str(out)] + (
        ["--dry-run"] if dry_run else []
    )
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    start = time.monotonic()
    log = open(out / "steps" / f"{name}.log", "w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        returncode, status = child.wait(timeout=max(limit_s, 1)), None
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        returncode, status = None, f"timed out after {limit_s:.0f} s"
    finally:
        log.close()
    seconds = time.monotonic() - start
    record = json.loads(result_path.read_text()) if result_path.exists() else {}
    if status is None and returncode != 0:
        status = f"exit {returncode}"
    record.setdefault("ok", False)
    if status is not None:
        record["ok"] = False
        record["error"] = status + (f"; {record['error']}" if record.get("error") else "")
        record["log_tail"] = (out / "steps" / f"{name}.log").read_text()[-3000:]
    record["seconds"] = round(seconds, 1)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, gpu_check.md, steps/")
    parser.add_argument("--dry-run", action="store_true", help="small shapes on CPU under the Triton interpreter")
    parser.add_argument("--budget-s", type=float, default=None, help="total seconds (default 450; dry run 240)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="a subset of the steps")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # the child's entry point
    args = parser.parse_args(argv)
    (args.out / "steps").mkdir(parents=True, exist_ok=True)
    if args.step:
        return run_child(args.step, args.out, args.dry_run)
    budget = args.budget_s if args.budget_s is not None else (240.0 if args.dry_run else 450.0)
    limits = DRY_LIMITS if args.dry_run else GPU_LIMITS
    deadline = time.monotonic() + budget
    report = {"dry_run": args.dry_run, "command": " ".join(["python -m bench.gpu_check"] + (argv or sys.argv[1:])),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}  # fmt: skip
    for name in args.steps:
        left = deadline - time.monotonic() - 5
        if left < 5:
            report["steps"][name] = {"ok": False, "error": "not run: the budget was spent", "seconds": 0.0}
        else:
            report["steps"][name] = run_step(name, args.out, args.dry_run, min(limits[name], left))
        print(f"gpu_check: {name}: {'ok' if report['steps'][name]['ok'] else 'FAILED'} "
              f"({report['steps'][name]['seconds']} s)", file=sys.stderr, flush=True)  # fmt: skip
    report["ok"] = all(step["ok"] for step in report["steps"].values())
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: {'all steps ok' if report['ok'] else 'some steps FAILED'}; {args.out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


# ---------------------------------------------------------------------------------------------------------------
# The child: one step, writing its JSON as it goes (so a step killed at its limit keeps its finished parts)


class Recorder:
    def __init__(self, path: Path):
        self.path, self.data = path, {"ok": False, "rows": []}
        self.flush()

    def flush(self):
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def row(self, **fields):
        self.data["rows"].append(fields)
        self.flush()


def run_child(name: str, out: Path, dry_run: bool) -> int:
    recorder = Recorder(out / "steps" / f"{name}.json")
    try:
        ok = STEP_FUNCTIONS[name](recorder, dry_run)
        recorder.data["ok"] = bool(ok)
    except Exception as error:  # noqa: BLE001 - reported in the JSON, then the step fails
        import traceback

        recorder.data["ok"] = False
        recorder.data["error"] = f"{type(error).__name__}: {error}"[:1000]
        traceback.print_exc()
    recorder.flush()
    return 0 if recorder.data["ok"] else 1


def _device(dry_run: bool):
    import torch

    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --dry-run on a machine without one)")
    return torch.device("cuda")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_machine(rec: Recorder, dry_run: bool) -> bool:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform(), "cpus": os.cpu_count()}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, l2_bytes=props.L2_cache_size,
                    memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")  # fmt: skip
    else:
        info.update(gpu=None, sms=None, l2_bytes=None)
    rec.data["machine"] = info
    return dry_run or info["gpu"] is not None


def _problem(rows: int, hidden_size: int, dtype, device, seed=0):
    """Packed hidden [2S, H], S distinct step rows over min(S, 32) candidates (groups of 8), a random head."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    candidates = min(rows, 32)
    hidden = torch.randn(2 * rows, hidden_size, generator=gen).to(device, dtype)
    chosen = torch.randperm(2 * rows, generator=gen)[:rows].view(candidates, -1).sort(dim=1).values.flatten()
    offsets = torch.arange(0, rows + 1, rows // candidates)
    width = 2 * hidden_size
    head = (torch.randn(width, hidden_size, generator=gen) / hidden_size**0.5, torch.randn(width, generator=gen) * 0.1,
            torch.randn(1, width, generator=gen) * 2 / width**0.5, torch.randn(1, generator=gen) * 0.5)  # fmt: skip
    return hidden, chosen.to(device), offsets.to(device), tuple(t.to(device, dtype) for t in head)


def _error(actual, expected) -> float:
    """Max |actual - expected| over finite expected entries (non-finite entries must agree: else inf)."""
    import torch

    actual, expected = actual.double().cpu(), expected.double().cpu()
    finite = torch.isfinite(expected)
    if not torch.equal(torch.isfinite(actual), finite):
        return math.inf
    return float((actual[finite] - expected[finite]).abs().max()) if finite.any() else 0.0


def step_parity(rec: Recorder, dry_run: bool) -> bool:
    """Each kernel against float64 on the same (rounded) inputs; the bound is flash-attention's rule: at most 2x
    the error of the eager reference run in bf16, plus 1e-5 (fp32 accumulation must do at least as well)."""
    import torch

    from sprm_kernels import (
        StepScorer,
        sprm_score,
        sprm_score_reference,
        sprm_step_logits,
        step_positions,
        step_positions_reference,
    )

    device = _device(dry_run)
    backend = "triton"
    hidden_size = DRY_HIDDEN if dry_run else GPU_HIDDEN
    ok = True
    for rows in DRY_ROWS if dry_run else GPU_ROWS:
        hidden, index, offsets, head = _problem(rows, hidden_size, torch.bfloat16, device)
        h64, w64 = hidden.double(), [t.double() for t in head]
        truth = sprm_score_reference(h64, index, offsets, *w64, group_size=GROUP, return_step_scores=True)
        low = sprm_score_reference(hidden, index, offsets, *head, group_size=GROUP, return_step_scores=True)
        got = sprm_score(hidden, index, offsets, *head, group_size=GROUP, return_step_scores=True, backend=backend)
        for field in ("log_score", "score", "step_scores"):
            err, err_low = _error(getattr(got, field), getattr(truth, field)), _error(getattr(low, field),
                                                                                     getattr(truth, field))  # fmt: skip
            passed = err <= 2 * err_low + 1e-5
            ok &= passed
            rec.row(kernel="sprm_score", S=rows, H=hidden_size, field=field, max_err=err, eager_bf16_err=err_low,
                    ok=passed)  # fmt: skip
        same_best = bool(torch.equal(got.best.cpu(), truth.best.cpu()))
        rec.row(kernel="sprm_score", S=rows, H=hidden_size, field="best", equal_to_float64=same_best, ok=True)
        logits64 = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(h64[index], w64[0], w64[1])),
                                              w64[2], w64[3]).squeeze(-1)  # fmt: skip
        logits_low = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(hidden[index], head[0],
                                                head[1])), head[2], head[3]).squeeze(-1)  # fmt: skip
        logits = sprm_step_logits(hidden, index, *head, backend=backend)
        err, err_low = _error(logits, logits64), _error(logits_low, logits64)
        ok &= err <= 2 * err_low + 1e-5
        rec.row(kernel="sprm_step_logits", S=rows, H=hidden_size, field="logits", max_err=err, eager_bf16_err=err_low,
                ok=err <= 2 * err_low + 1e-5)  # fmt: skip
        if rows <= 4096:  # StepScorer: the S rows as one decode batch, every row flagged
            scorer = StepScorer(*head, batch_size=rows, backend=backend)
            probs = scorer.update(hidden[index].contiguous(), torch.ones(rows, dtype=torch.bool, device=device))
            err, err_low = _error(probs, truth.step_scores), _error(low.step_scores, truth.step_scores)
            ok &= err <= 2 * err_low + 1e-5
            rec.row(kernel="StepScorer", S=rows, H=hidden_size, field="step_prob", max_err=err,
                    eager_bf16_err=err_low, ok=err <= 2 * err_low + 1e-5)  # fmt: skip
        del hidden, h64, truth, low, got, logits64, logits_low, logits
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 12, (8, 64 if dry_run else 4096), generator=gen)
    ids[ids == 7] = 3
    ids[:, 1], ids[:, -2] = 1, 2
    ids = ids.to(device)
    got = step_positions(ids, step_token_ids=[3], think_start_id=1, think_end_id=2, backend=backend)
    want = step_positions_reference(ids.cpu(), step_token_ids=[3], think_start_id=1, think_end_id=2)
    equal = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want, strict=True))
    ok &= equal
    rec.row(kernel="step_positions", S=int(got[0].numel()), H=None, field="index, offsets", equal=equal, ok=equal)
    return ok


def step_determinism(rec: Recorder, dry_run: bool) -> bool:
    """The same inputs give the same bits: the decode launch (S = 8, its ticket reduction across one program
    per SM) 2,000 times, StepScorer steps, and a large-S launch, compared on the device (no sync per run)."""
    import torch

    from sprm_kernels import StepScorer, sprm_score

    device = _device(dry_run)
    hidden_size = DRY_HIDDEN if dry_run else GPU_HIDDEN
    repeats = 10 if dry_run else 2000
    ok = True
    hidden, index, offsets, head = _problem(8, hidden_size, torch.bfloat16, device)
    options = dict(group_size=GROUP, return_step_scores=True, backend="triton", validate=False)
    first = sprm_score(hidden, index, offsets, *head, **options)
    differ = torch.zeros((), dtype=torch.bool, device=device)
    for _ in range(repeats):
        again = sprm_score(hidden, index, offsets, *head, **options)
        differ |= (again.step_scores != first.step_scores).any() | (again.log_score != first.log_score).any()
    _sync(device)
    ok &= not bool(differ)
    rec.row(check="sprm_score decode launch", S=8, H=hidden_size, runs=repeats, identical=not bool(differ))
    scorer = StepScorer(*head, batch_size=8, group_size=GROUP, backend="triton")
    flags = torch.ones(8, dtype=torch.bool, device=device)
    rows = hidden[index].contiguous()
    first_prob = scorer.update(rows, flags).clone()
    differ.zero_()
    for _ in range(repeats):
        differ |= (scorer.update(rows, flags) != first_prob).any()
    _sync(device)
    sums_exact = bool(torch.equal(scorer.count, torch.full_like(scorer.count, repeats + 1)))
    ok &= not bool(differ) and sums_exact
    rec.row(check="StepScorer.update", S=8, H=hidden_size, runs=repeats, identical=not bool(differ))
    large = 32 if dry_run else 32768
    hidden, index, offsets, head = _problem(large, hidden_size, torch.bfloat16, device, seed=1)
    first = sprm_score(hidden, index, offsets, *head, **options)
    differ.zero_()
    runs = 3 if dry_run else 20
    for _ in range(runs):
        again = sprm_score(hidden, index, offsets, *head, **options)
        differ |= (again.step_scores != first.step_scores).any() | (again.best != first.best).any()
    _sync(device)
    ok &= not bool(differ)
    rec.row(check="sprm_score large S", S=large, H=hidden_size, runs=runs, identical=not bool(differ))
    return ok


def step_graph(rec: Recorder, dry_run: bool) -> bool:
    """StepScorer.update captured once in a CUDA graph and replayed over a sequence of steps whose flags and
    wanted rows change (idle steps included) equals an eager StepScorer fed the same sequence, bit for bit:
    running sums, counts and every step's probabilities (NaN on idle steps)."""
    import torch

    from sprm_kernels import StepScorer

    device = _device(dry_run)
    hidden_size, batch, steps = (DRY_HIDDEN, 8, 12) if dry_run else (GPU_HIDDEN, 32, 200)
    gen = torch.Generator().manual_seed(4)
    _, _, _, head = _problem(8, hidden_size, torch.bfloat16, device)
    states = torch.randn(steps, batch, hidden_size, generator=gen).to(device, torch.bfloat16)
    flag_seq = (torch.rand(steps, batch, generator=gen) < 0.2).to(device)
    want_seq = (torch.rand(steps, batch, generator=gen) < 0.1).to(device)
    flag_seq[::5], want_seq[::5] = False, False  # every 5th step idle: skipped on the device
    replayed = StepScorer(*head, batch_size=batch, group_size=GROUP, backend="triton")
    eager = StepScorer(*head, batch_size=batch, group_size=GROUP, backend="triton")
    static_h, static_f, static_w = states[0].clone(), flag_seq[0].clone(), want_seq[0].clone()
    if device.type == "cuda":
        replayed.update(static_h, static_f, static_w)  # compile outside the capture
        replayed.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed.update(static_h, static_f, static_w)
        run, mode = graph.replay, "CUDA graph replay"
    else:
        run, mode = (lambda: replayed.update(static_h, static_f, static_w)), "eager (dry run: no CUDA graph)"
    mismatched = 0
    for t in range(steps):
        static_h.copy_(states[t])
        static_f.copy_(flag_seq[t])
        static_w.copy_(want_seq[t])
        run()
        expected = eager.update(states[t], flag_seq[t], want_seq[t])
        mismatched += int(not torch.equal(replayed.step_prob.nan_to_num(7.0), expected.nan_to_num(7.0)))
    _sync(device)
    equal = bool(torch.equal(replayed.sum_log, eager.sum_log) and torch.equal(replayed.count, eager.count))
    rec.row(check=mode, B=batch, H=hidden_size, steps=steps, idle_steps=int((~(flag_seq | want_seq).any(1)).sum()),
            sums_equal=equal, steps_with_different_probs=mismatched)  # fmt: skip
    return equal and mismatched == 0


def _roofline(device, dry_run: bool):
    """Measured copy bandwidth (bytes read + written per second) and bf16 GEMM rate on this device."""
    import torch

    from bench import common

    if device.type == "cpu":
        if dry_run:
            return common.Roofline(1e10, 1e11, "dry run: nominal")
        return common.calibrate_cpu_roofline()
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = common.time_cuda(lambda: dst.copy_(src)).p50
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = common.time_cuda(lambda: a @ b).p50
    return common.Roofline(2 * src.numel() / (copy_ms * 1e-3), 2 * n**3 / (gemm_ms * 1e-3), "measured")


def _score_providers(args, compiled) -> dict:
    from bench.kernels import cublas_epilogue
    from sprm_kernels import sprm_score, sprm_score_reference

    providers = {
        "triton": lambda: sprm_score(*args, group_size=GROUP, backend="triton"),
        "triton validate=False": lambda: sprm_score(*args, group_size=GROUP, backend="triton", validate=False),
        "eager": lambda: sprm_score_reference(*args, group_size=GROUP),
        "cublas_epilogue": lambda: cublas_epilogue(*args, group_size=GROUP),
    }
    if compiled is not None:
        providers["torch.compile(eager)"] = lambda: compiled(*args, group_size=GROUP)
    return providers


def _scorer_providers(scorer, states, flags, head) -> dict:
    import torch

    from bench.kernels import eager_step_update

    device = states.device
    sums, counts = torch.zeros(len(flags), device=device), torch.zeros(len(flags), dtype=torch.int64, device=device)
    providers = {"triton": lambda: scorer.update(states, flags),
                 "eager": lambda: eager_step_update(states, flags, *head, sums, counts)}  # fmt: skip
    if device.type == "cuda":
        from bench.kernels import capture_cuda_graph

        providers["triton_cudagraph"] = capture_cuda_graph(providers["triton"]).replay
        providers["eager_cudagraph"] = capture_cuda_graph(providers["eager"]).replay
    return providers


def step_timings(rec: Recorder, dry_run: bool) -> bool:
    """Median ms per call (triton.testing.do_bench on CUDA; wall clock in the dry run) and % of the roofline
    max(4 S H^2 / GEMM rate, (S H + 2 H^2) * 2 bytes / copy bandwidth), both measured first on this device."""
    import torch

    from bench import common
    from sprm_kernels import StepScorer, sprm_score_reference

    device = _device(dry_run)
    hidden_size = DRY_HIDDEN if dry_run else GPU_HIDDEN
    roof = _roofline(device, dry_run)
    rec.data["roofline"] = {"copy_bytes_per_s": roof.bytes_per_s, "gemm_flops_per_s": roof.flops_per_s,
                            "source": roof.source}  # fmt: skip
    rec.flush()

    def timed(fn):
        if device.type == "cuda":
            return common.time_cuda(fn).p50
        return common.time_cpu_interleaved({"f": fn}, budget_s=0.2, max_repeats=5)["f"].p50

    compiled = torch.compile(sprm_score_reference, dynamic=True) if not dry_run else None
    for rows in DRY_ROWS if dry_run else GPU_ROWS:
        hidden, index, offsets, head = _problem(rows, hidden_size, torch.bfloat16, device)
        flops, nbytes = common.head_flops(rows, hidden_size), common.head_min_bytes(rows, hidden_size, 2)
        floor_ms = 1e3 * roof.floor_s(flops, nbytes)
        providers = _score_providers((hidden, index, offsets, *head), compiled)
        for name, fn in providers.items():
            try:
                ms = timed(fn)
                rec.row(kernel="sprm_score", provider=name, S=rows, H=hidden_size, ms=ms, floor_ms=floor_ms,
                        pct_of_roofline=100 * floor_ms / ms)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - e.g. torch.compile failing on this image: reported
                rec.row(kernel="sprm_score", provider=name, S=rows, H=hidden_size, error=repr(error)[:300])
        del hidden, providers
    for batch in (8, 32):
        _, _, _, head = _problem(8, hidden_size, torch.bfloat16, device)
        states = torch.randn(batch, hidden_size, device=device, dtype=torch.bfloat16)
        flags = torch.rand(batch, device=device) < 0.5
        providers = _scorer_providers(StepScorer(*head, batch_size=batch, backend="triton"), states, flags, head)
        flops, nbytes = common.head_flops(batch, hidden_size), common.head_min_bytes(batch, hidden_size, 2)
        floor_ms = 1e3 * roof.floor_s(flops, nbytes)
        for name, fn in providers.items():
            ms = timed(fn)
            rec.row(kernel="StepScorer.update", provider=name, S=batch, H=hidden_size, ms=ms, floor_ms=floor_ms,
                    pct_of_roofline=100 * floor_ms / ms)  # fmt: skip
    return all("error" not in row or "compile" in row["provider"] for row in rec.data["rows"])


def step_pytest(rec: Recorder, dry_run: bool) -> bool:
    """`python -m pytest -q -m cuda` (the dry run: only tests/kernels/test_step_scorer.py, where every cuda test
    is skipped): the summary line and the counts."""
    import re

    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    command += ["tests/kernels/test_step_scorer.py"] if dry_run else []
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = (done.stdout + done.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|error|errors)", summary)}
    rec.data.update(command=" ".join(command[1:]), summary=summary, counts=counts, returncode=done.returncode,
                    failures=[line for line in lines if line.startswith(("FAILED", "ERROR"))][:50])  # fmt: skip
    if dry_run:
        return done.returncode in (0, 5) and counts.get("failed", 0) == 0
    return done.returncode == 0 and counts.get("passed", 0) > 0


def step_aot(rec: Recorder, dry_run: bool) -> bool:
    """The ahead-of-time report with this image's triton (sm_80 and sm_90), every configuration (dry run: the
    --quick subset on sm_90): compile failures, spills, max registers, and the modeled goals."""
    arches = ["90"] if dry_run else ["80", "90"]
    command = [sys.executable, "-m", "sprm_kernels.aot", "--arch", *arches, "--json"]
    command += ["--quick"] if dry_run else ["--check-goals", "--jobs", str(max(1, min(16, os.cpu_count() or 1)))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    records = json.loads(done.stdout) if done.stdout.strip().startswith("[") else []
    heads = [r for r in records if "registers" in r]
    rec.data.update(
        command="env -u TRITON_INTERPRET " + " ".join(command[1:]), returncode=done.returncode,
        configurations=len(heads), failed=sum(not r.get("ok") for r in heads),
        max_spill_bytes=max((r.get("spill_bytes") or 0 for r in heads), default=None),
        max_registers=max((r.get("registers") or 0 for r in heads), default=None),
        stderr_tail=[line for line in done.stderr.splitlines() if "Warning" not in line][-30:],
    )  # fmt: skip
    return done.returncode == 0 and bool(heads)


STEP_FUNCTIONS = {"machine": step_machine, "parity": step_parity, "determinism": step_determinism,
                  "graph": step_graph, "timings": step_timings, "pytest": step_pytest, "aot": step_aot}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The markdown report


def _fmt(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3g}"
    return "" if value is None else str(value)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines + [""]


def markdown(report: dict) -> str:
    title = "GPU check (DRY RUN: CPU, interpreter, small shapes: no GPU figure)" if report["dry_run"] else "GPU check"
    lines = [f"# {title}", "", f"`{report['command']}`, started {report['started_utc']}", ""]
    lines += _table([{"step": name, "ok": step["ok"], "seconds": step["seconds"], "error": step.get("error", "")}
                     for name, step in report["steps"].items()])  # fmt: skip
    for name, step in report["steps"].items():
        lines += [f"## {name}", ""]
        if "machine" in step:
            lines += _table([step["machine"]])
        if "roofline" in step:
            lines += _table([step["roofline"]])
        for key in ("command", "summary", "configurations", "failed", "max_spill_bytes", "max_registers"):
            if key in step:
                lines.append(f"- {key}: `{_fmt(step[key])}`")
        lines += ([""] if any(k in step for k in ("command", "summary")) else []) + _table(step.get("rows", []))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
