"""Ahead-of-time compile check and static performance model: every kernel, at the configurations the launchers
pick, for real GPU targets.

    python -m sprm_kernels.aot --arch 80 90 --json [--specializations] [--check-goals]

No GPU is needed. Arguments are built by the launchers' own `prepare_*` functions on meta tensors, then mapped
to the signature and divisibility-16 hints that the JIT would infer (16-aligned pointers, integers divisible by
16, integers equal to 1 specialised as constants; parameters listed in the kernel's `do_not_specialize` stay
plain integers). Registers, spills and shared memory come from the `cuobjdump` and `ptxas` that ship inside the
triton wheel. Each head-kernel row also carries the modeled figures of `perf_model` (an LRU replay of L2 over
the kernel's own program order, for H100 on sm_90 and A100-80GB on sm_80): modeled, never measured.
`--specializations` adds one row per (kernel, H, dtype, arch) with the number of compiled variants that S and B
in 1..65536 can produce. Exits non-zero if a configuration fails to compile or spills, or, with
`--check-goals`, if a goal of issue 13 is missed (see `GOALS`). Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

from .perf_model import GPUS, Launch, model_launch

TYPE_CODES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}
HIDDEN_SIZES = (1536, 3584, 5120)
ROW_COUNTS = {"decode": 8, "decode32": 32, "medium": 512, "large": 32768}
SPEC_RANGE = 65536  # specialisations are counted for S and B in 1..SPEC_RANGE
MAX_VARIANTS = 4
MAX_REGISTERS = 240
# Issue 13's goals, as `check_goals` applies them (bf16 rows for the modeled ones; every row for resources).
GOALS = {
    "resources": "0 spill bytes and <= 240 registers per thread in every configuration",
    "gemm_dram_2x": "S = 32768, H = 5120: modeled DRAM bytes <= 2x ideal (H100 and A100)",
    "gemm_time_1.3x": "S = 32768, H = 5120: modeled time <= 1.3x roofline",
    "decode_in_flight": "S (or B) = 8 and 32, H = 5120: W1 bytes in flight >= 4 MiB",
    "decode_ctas": "S (or B) = 8 and 32, H = 5120: CTAs a multiple of the SM count",
    "decode_time_1.3x": "S (or B) = 8 and 32, H = 5120: modeled time <= 1.3x the W1-streaming floor",
    "medium_tail": "S = 512, H = 5120: no partial last round (one CTA per SM) over 50% idle",
    "variants": "<= 4 specialisations per (kernel, H, dtype, arch) for S, B in 1..65536",
}
# Goals the model shows to be out of reach: (why, the regression bound CI enforces instead, per arch).
WAIVED = {
    "gemm_dram_2x": (
        "the [S, 2H] activations need all of H before the ReLU, so a group of W1 tiles stays in L2 while X streams "
        "past, once per group; 2x ideal needs X read at most twice, i.e. half of W1 (5120 x 5120 x 2 B = 50 MiB) "
        "resident beside X's rows in flight, more than either L2 (50 / 40 MiB): see docs/performance.md",
        {"sm_90": 3.0, "sm_80": 3.8},
    ),
}


def _unspecialised(kernel) -> set[str]:
    """Names of the kernel's `do_not_specialize` parameters (also under the interpreter's wrapper)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return {kernel.arg_names[n] if isinstance(n, int) else n for n in names}


def _signature(kernel, args, meta):
    """(signature, constexprs, attrs) as the JIT would specialise these arguments."""
    names = kernel.arg_names
    values = dict(zip(names[: len(args)], args, strict=True))  # the constexprs follow, from meta
    values.update({k: v for k, v in meta.items() if k in names})
    plain = _unspecialised(kernel)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        if name in meta:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_CODES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and name in plain:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot map {type(value).__name__} to a Triton signature")
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# The flags triton 3.9's make_cubin passes to ptxas besides -v (line info, and --regAllocOptLevel=2 "to work
# around a ptxas 13.x bug"): without them the -v re-run allocates registers differently from the shipped cubin
# and reports spills that the cubin (cuobjdump: LOCAL 0) does not have.
PTXAS_FLAGS = ("-lineinfo", "--regAllocOptLevel=2")


def _ptxas(arch: int) -> str:
    """The ptxas that triton itself uses for this arch (a newer one for sm_90+), so the PTX version matches."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # older triton: a single bundled ptxas
        return _tool("ptxas")


def _resources(cubin: bytes, ptx: str, arch: int) -> dict:
    """Registers and shared memory from cuobjdump; spill bytes from ptxas -v on the same PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path, ptx_path = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        with open(ptx_path, "w") as f:
            f.write(ptx)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=True
        ).stdout
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        verbose = subprocess.run(
            [_ptxas(arch), "-v", *PTXAS_FLAGS, f"--gpu-name={sm}", ptx_path, "-o", os.path.join(tmp, "v.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr

    def field(pattern, text):
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return {
        "registers": field(r"REG:(\d+)", usage),
        "shared_bytes": field(r"SHARED:(\d+)", usage),
        "local_bytes": field(r"LOCAL:(\d+)", usage),
        "stack_bytes": field(r"STACK:(\d+)", usage),  # spills live in the stack frame of the shipped cubin
        "spill_bytes": field(r"(\d+) bytes spill stores", verbose) + field(r"(\d+) bytes spill loads", verbose),
    }


def _compile(kernel, args, meta, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(kernel, args, meta)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
    )
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    resources = _resources(compiled.asm["cubin"], compiled.asm["ptx"], arch)
    # Triton's shared memory is dynamic (requested at launch), so cuobjdump's static figure undercounts it.
    resources["shared_bytes"] = max(resources["shared_bytes"], int(getattr(compiled.metadata, "shared", 0)))
    return resources


def _meta_tensor(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _gpu_info(arch: int):
    from .kernels.sprm_score import GpuInfo

    gpu = GPUS[arch]
    return GpuInfo(gpu.sms, gpu.l2_bytes, arch)


def _head(hidden_size, dtype):
    width = 2 * hidden_size
    return (_meta_tensor((width, hidden_size), dtype), _meta_tensor((width,), dtype),
            _meta_tensor((width,), dtype), _meta_tensor((1,), dtype))  # fmt: skip


def _score_launch(rows, hidden_size, dtype, arch, candidates=None):
    """(cfg, args, meta) of sprm_score for S = rows over `candidates` candidates (groups of 8), as the launcher."""
    from .kernels.sprm_score import pick_score_config, prepare_sprm_score

    cfg = pick_score_config(rows, hidden_size, 2 * hidden_size, dtype, _gpu_info(arch))
    candidates = max(8, min(rows, 32)) if candidates is None else candidates
    _, _, args, meta = prepare_sprm_score(
        _meta_tensor((rows * 2, hidden_size), dtype), _meta_tensor((rows,), torch.int64),
        _meta_tensor((candidates + 1,), torch.int64), *_head(hidden_size, dtype),
        group_size=8, return_step_scores=True, config=cfg,
    )  # fmt: skip
    meta["UPCAST"] = False
    return cfg, args, meta


def _logits_launch(rows, hidden_size, dtype, arch, gather=True):
    """step_logits as the training forward calls it (gathered rows), or (gather=False) as the vLLM head does:
    every row of an [S, H] slice in order, no index."""
    from .kernels.sprm_score import pick_score_config
    from .kernels.step_logits import prepare_step_logits

    cfg = pick_score_config(rows, hidden_size, 2 * hidden_size, dtype, _gpu_info(arch))
    hidden = _meta_tensor((rows * 2 if gather else rows, hidden_size), dtype)
    index = _meta_tensor((rows,), torch.int64) if gather else None
    _, _, args, meta = prepare_step_logits(hidden, index, *_head(hidden_size, dtype), config=cfg)
    meta["UPCAST"] = False
    return cfg, args, meta


def _scorer_launch(batch, hidden_size, dtype, arch):
    from .kernels.sprm_score import pick_score_config
    from .kernels.step_scorer import prepare_step_scorer

    cfg = pick_score_config(batch, hidden_size, 2 * hidden_size, dtype, _gpu_info(arch))
    flags = _meta_tensor((batch,), torch.bool)
    _, args, meta = prepare_step_scorer(
        _meta_tensor((batch, hidden_size), dtype), flags, flags, *_head(hidden_size, dtype),
        _meta_tensor((cfg.num_splits * batch,), torch.float32), _meta_tensor((1,), torch.int32),
        _meta_tensor((batch,), torch.float32), _meta_tensor((batch,), torch.int64),
        _meta_tensor((batch,), torch.float32), cfg,
    )  # fmt: skip
    meta["UPCAST"] = False
    return cfg, args, meta


LAUNCHES = {"sprm_score": _score_launch, "step_logits": _logits_launch, "step_scorer": _scorer_launch}


def _kernel(name):
    from .kernels.sprm_score import sprm_score_kernel
    from .kernels.step_logits import step_logits_kernel
    from .kernels.step_scorer import step_scorer_kernel

    return {"sprm_score": sprm_score_kernel, "step_logits": step_logits_kernel, "step_scorer": step_scorer_kernel}[name]


def _model_launch(cfg, rows, hidden_size, dtype, num_stages):
    return Launch(rows, hidden_size, 2 * hidden_size, dtype.itemsize, cfg.block_s, cfg.block_n, cfg.block_k,
                  cfg.num_splits, cfg.granule, cfg.group_splits, num_stages, cfg.num_warps)  # fmt: skip


def _cases(arch: int):
    """(name, dtype, shape, regime, kernel, args, meta, model Launch or None) for each representative launch."""
    from .kernels.step_positions import step_positions_count_kernel, step_positions_write_kernel

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hidden_size in HIDDEN_SIZES:
            for regime, rows in ROW_COUNTS.items():
                for name in ("sprm_score", "step_logits"):
                    cfg, args, meta = LAUNCHES[name](rows, hidden_size, dtype, arch)
                    launch = _model_launch(cfg, rows, hidden_size, dtype, meta["num_stages"])
                    yield name, dtype, f"S={rows} H={hidden_size}", regime, _kernel(name), args, meta, launch
                if dtype == torch.bfloat16 and hidden_size == HIDDEN_SIZES[-1]:  # the vLLM head's launch
                    cfg, args, meta = _logits_launch(rows, hidden_size, dtype, arch, gather=False)
                    launch = _model_launch(cfg, rows, hidden_size, dtype, meta["num_stages"])
                    yield "step_logits", dtype, f"S={rows} H={hidden_size} rows", regime, _kernel("step_logits"), \
                        args, meta, launch  # fmt: skip
            for batch in (8, 32):
                cfg, args, meta = _scorer_launch(batch, hidden_size, dtype, arch)
                launch = _model_launch(cfg, batch, hidden_size, dtype, meta["num_stages"])
                regime = "decode" if batch == 8 else "decode32"
                yield "step_scorer", dtype, f"B={batch} H={hidden_size}", regime, _kernel("step_scorer"), args, meta, \
                    launch  # fmt: skip
    ids, table = _meta_tensor((8 * 4096,), torch.int64), _meta_tensor((151_000,), torch.uint8)
    bounds, counts, offsets = (_meta_tensor((8, 2), torch.int64), _meta_tensor((8,), torch.int64),
                               _meta_tensor((9,), torch.int64))  # fmt: skip
    for packed in (False, True):
        meta = dict(PACKED=packed, HAS_MASK=not packed, BLOCK_T=1024, num_warps=4, num_stages=2)
        layout = "packed" if packed else "padded+mask"
        count_args = (ids, _meta_tensor((8 * 4096,), torch.uint8), offsets, table, 151_000, 4096, 151_648, 151_649,
                      bounds, counts)  # fmt: skip
        write_args = (ids, _meta_tensor((8 * 4096,), torch.uint8), offsets, table, 151_000, 4096, 151_648, bounds,
                      offsets, _meta_tensor((100,), torch.int64))  # fmt: skip
        yield "step_positions_count", torch.int64, layout, "-", step_positions_count_kernel, count_args, meta, None
        yield "step_positions_write", torch.int64, layout, "-", step_positions_write_kernel, write_args, meta, None


def _compile_key(kernel, args, meta, arch):
    signature, constexprs, attrs = _signature(kernel, args, meta)
    parts = [kernel.fn.__qualname__, signature, constexprs, sorted(map(str, attrs.items()))]
    return json.dumps(parts + [meta["num_warps"], meta["num_stages"], arch], sort_keys=True, default=str)


_JOBS: list = []  # (kernel, args, meta, arch) per distinct compile; forked workers inherit it (kernels don't pickle)


def _compile_job(index: int):
    """Runs in a worker process: compile _JOBS[index]; a dict of resources or an error."""
    kernel, args, meta, arch = _JOBS[index]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        return {"ok": True, **_compile(kernel, args, meta, arch)}
    except Exception as error:  # report every failing configuration, not just the first
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}


def _variant_key(kernel, args, meta):
    """What the JIT's cache keys on: the specialised signature, the constexprs and the launch options."""
    signature, constexprs, attrs = _signature(kernel, args, meta)
    return json.dumps([signature, constexprs, sorted(map(str, attrs.items())), meta["num_warps"], meta["num_stages"]],
                      sort_keys=True, default=str)  # fmt: skip


def _probe_counts(bucket_bounds, limit=SPEC_RANGE):
    """Every bucket's edges and a few values that differ in what the JIT could specialise on (1, multiples of 16,
    odd values): enough to catch any integer argument that is still specialised."""
    probes = {1, 2, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 1000, 4096, 4097, 4112, 32768, limit - 1, limit}
    for bound in bucket_bounds:
        probes |= {bound - 1, bound, bound + 1, bound + 16}
    return sorted(p for p in probes if 1 <= p <= limit)


def specializations(arch: int) -> list[dict]:
    """{kernel, H, dtype, arch, variants} rows: distinct JIT cache keys over S (rows) and B (candidates or batch)
    in 1..SPEC_RANGE. The tiles depend on S only through `row_bucket`, which is checked on every S in the range;
    the keys are then built from the launchers' own arguments at probe values of S and B in every bucket."""
    from .kernels.sprm_score import ROW_BUCKETS, row_bucket

    buckets = {row_bucket(s) for s in range(1, SPEC_RANGE + 1)}
    probes = _probe_counts(ROW_BUCKETS)
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hidden_size in HIDDEN_SIZES:
            for name in ("sprm_score", "step_logits", "step_scorer"):
                kernel, keys = _kernel(name), set()
                for count in probes:
                    if name == "sprm_score":  # S rows and B candidates vary independently
                        for candidates in (8, 16, 24, 4104):
                            _, args, meta = _score_launch(count, hidden_size, dtype, arch, candidates)
                            keys.add(_variant_key(kernel, args, meta))
                    else:
                        _, args, meta = LAUNCHES[name](count, hidden_size, dtype, arch)
                        keys.add(_variant_key(kernel, args, meta))
                rows.append({"kernel": name, "H": hidden_size, "dtype": TYPE_CODES[dtype], "arch": f"sm_{arch}",
                             "variants": len(keys), "s_buckets": len(buckets)})  # fmt: skip
    return rows


def check_goals(records: list[dict], spec_rows: list[dict]) -> tuple[list[str], list[str]]:
    """(missed, waived): the goals of issue 13 (GOALS) that the report misses, and the misses of WAIVED goals
    that stay within their regression bound. Modeled figures only."""
    missed, waived = [], []

    def miss(goal, arch, ratio, text):
        bound = WAIVED.get(goal, (None, {}))[1].get(arch)
        if bound is not None and ratio <= bound:
            waived.append(f"[{goal}, waived: within the regression bound {bound}x] {text}")
        else:
            missed.append(f"[{goal}] {text}")

    for r in records:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} {r['shape']}"
        if not r.get("ok"):
            continue
        if r["spill_bytes"] > 0 or r.get("stack_bytes", 0) > 0 or r["registers"] > MAX_REGISTERS:
            miss("resources", r["arch"], 0, f"{where}: {r['spill_bytes']} spill bytes, {r['registers']} registers")
        if "modeled_time_us" not in r or r["dtype"] != "bf16":
            continue
        where = f"{where} on {r['gpu']}"
        h5120 = r["shape"].endswith("H=5120")
        if r["regime"] == "large" and h5120:
            ratio = r["modeled_dram_bytes"] / r["ideal_dram_bytes"]
            if ratio > 2:
                miss("gemm_dram_2x", r["arch"], ratio, f"{where}: modeled DRAM {r['modeled_dram_bytes'] / 1e9:.3f} GB "
                     f"= {ratio:.2f}x ideal {r['ideal_dram_bytes'] / 1e9:.3f} GB")  # fmt: skip
            if r["modeled_time_us"] > 1.3 * r["roofline_time_us"]:
                miss("gemm_time_1.3x", r["arch"], 0, f"{where}: modeled {r['modeled_time_us']} us > 1.3x roofline "
                     f"{r['roofline_time_us']} us")  # fmt: skip
        if r["regime"] in ("decode", "decode32") and h5120:
            if r["w1_bytes_in_flight"] < 4 * 2**20:
                miss("decode_in_flight", r["arch"], 0,
                     f"{where}: W1 in flight {r['w1_bytes_in_flight'] / 2**20:.2f} MiB < 4")  # fmt: skip
            if r["ctas"] % r["sms"]:
                miss("decode_ctas", r["arch"], 0, f"{where}: {r['ctas']} CTAs, not a multiple of {r['sms']} SMs")
            if r["modeled_time_us"] > 1.3 * r["w1_stream_floor_us"]:
                miss("decode_time_1.3x", r["arch"], 0, f"{where}: modeled {r['modeled_time_us']} us > 1.3x W1 "
                     f"floor {r['w1_stream_floor_us']} us")  # fmt: skip
        if r["regime"] == "medium" and h5120 and r["last_wave_idle"] > 0.5:
            miss("medium_tail", r["arch"], 0, f"{where}: last wave {100 * r['last_wave_idle']:.0f}% idle")
    for row in spec_rows:
        if row["variants"] > MAX_VARIANTS:
            miss("variants", row["arch"], 0,
                 f"{row['kernel']} H={row['H']} {row['dtype']} {row['arch']}: {row['variants']} variants")  # fmt: skip
    return missed, waived


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--specializations", action="store_true", help="add the compiled-variant count rows")
    parser.add_argument("--check-goals", action="store_true", help="exit non-zero if a modeled goal is missed")
    parser.add_argument("--summary", metavar="REPORT", help="print the headline figures of a --json report and exit")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the S = 8 bf16 H = 1536 head kernels (a smoke test of the tool: bench.gpu_check)",
    )
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary) as f:
            print(summarize(json.load(f)))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default (FMA contraction); silences 3.9
    cases, jobs, job_index = [], [], {}
    for arch in args.arch:
        for name, dtype, shape, regime, kernel, kargs, meta, launch in _cases(arch):
            if args.quick and not (dtype == torch.bfloat16 and regime == "decode" and "H=1536" in shape):
                continue
            key = _compile_key(kernel, kargs, meta, arch)  # one compile serves every case with the same key
            if key not in job_index:
                job_index[key] = len(jobs)
                jobs.append((kernel, kargs, meta, arch))
            cases.append((arch, name, dtype, shape, regime, meta, launch, job_index[key]))
    import triton

    print(f"aot: triton {triton.__version__} ({os.path.dirname(triton.__file__)}): {len(cases)} configurations, "
          f"{len(jobs)} distinct compiles", file=sys.stderr)  # fmt: skip
    _JOBS[:] = jobs
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, range(len(jobs))))
    else:
        results = [_compile_job(index) for index in range(len(jobs))]
    records, failures = [], 0
    for arch, name, dtype, shape, regime, meta, launch, index in cases:
        record = {
            "kernel": name,
            "arch": f"sm_{arch}",
            "dtype": TYPE_CODES[dtype],
            "shape": shape,
            "regime": regime,
            "config": {k: v for k, v in meta.items() if k.isupper() or k.startswith("num_")},
            **results[index],
        }
        if launch is not None:
            record["schedule"] = {"num_splits": launch.num_splits, "granule": launch.granule,
                                  "group_splits": launch.group_splits}  # fmt: skip
        if record["ok"] and launch is not None:
            record.update(model_launch(launch, GPUS[arch], registers=record["registers"],
                                       shared_bytes=record["shared_bytes"], num_warps=meta["num_warps"]))  # fmt: skip
        if not record["ok"]:
            failures += 1
        elif record["spill_bytes"] > 0 or record["stack_bytes"] > 0:
            failures += 1
            record["goal_missed"] = "spills"
        records.append(record)
        if not args.json:
            print(_row(record), flush=True)
    spec_rows = []
    if args.specializations or args.check_goals:
        for arch in args.arch:
            spec_rows += specializations(arch)
        if not args.json:
            for row in spec_rows:
                print(f"variants {row['kernel']:12s} H={row['H']:<5d} {row['dtype']:5s} {row['arch']} "
                      f"{row['variants']}")  # fmt: skip
    if args.json:
        print(json.dumps(records + (spec_rows if args.specializations else []), indent=1))
    print(f"aot: {len(records) - failures} ok, {failures} failed or spilling", file=sys.stderr)
    missed, waived = check_goals(records, spec_rows) if args.check_goals else ([], [])
    for line in waived:
        print(f"goal missed: {line}", file=sys.stderr)
    for line in missed:
        print(f"goal missed: {line}", file=sys.stderr)
    if args.check_goals:
        verdict = f"missed ({len(missed)})" if missed else "met" if not waived else f"met except {len(waived)} waived"
        print(f"aot: goals {verdict}", file=sys.stderr)
    return 1 if failures or missed else 0


def summarize(report: list[dict]) -> str:
    """Headline lines of a --json report: resources over all rows, variants, and the modeled bf16 H = 5120 rows
    of sprm_score and step_scorer (modeled, not measured)."""
    configs = [r for r in report if "shape" in r and r.get("ok")]
    variants = [r["variants"] for r in report if "variants" in r]
    lines = [
        f"{len(configs)} configurations: max spill {max(r['spill_bytes'] for r in configs)} bytes, max registers "
        f"{max(r['registers'] for r in configs)}" + (f"; max variants {max(variants)}" if variants else "")
    ]
    for r in configs:
        if "modeled_time_us" in r and r["dtype"] == "bf16" and r["shape"].endswith("H=5120") and \
                r["kernel"] != "step_logits":  # fmt: skip
            lines.append(
                f"  {r['kernel']:11s} {r['gpu']:9s} {r['shape']:15s} ctas={r['ctas']:5d} waves={r['waves']:7.2f} "
                f"W1 in flight {r['w1_bytes_in_flight'] / 2**20:4.1f} MiB, DRAM "
                f"{r['modeled_dram_bytes'] / r['ideal_dram_bytes']:.2f}x ideal, {r['modeled_time_us']:.1f} us vs "
                f"roofline {r['roofline_time_us']:.1f} us, tile math {r.get('tile_math_tflops', 0):.0f} TFLOP/s "
                f"(modeled)"
            )
    return "\n".join(lines)


def _row(record) -> str:
    head = f"{record['kernel']:22s} {record['arch']} {record['dtype']:5s} {record['shape']:18s} {record['regime']:8s}"
    if not record["ok"]:
        return f"{head} FAILED {record['error']}"
    line = (
        f"{head} regs={record['registers']:3d} spill={record['spill_bytes']:4d} "
        f"smem={record['shared_bytes']:6d} local={record['local_bytes']:4d}"
    )
    if "modeled_time_us" in record:
        line += (
            f" | {record['gpu']} ctas={record['ctas']} waves={record['waves']} "
            f"w1_in_flight={record['w1_bytes_in_flight'] / 2**20:.1f}MiB "
            f"dram={record['modeled_dram_bytes'] / 1e6:.0f}/{record['ideal_dram_bytes'] / 1e6:.0f}MB "
            f"time={record['modeled_time_us']:.1f}/{record['roofline_time_us']:.1f}us "
            f"tile={record['tile_math_tflops']:.0f}TFLOP/s"
        )
    return line


if __name__ == "__main__":
    sys.exit(main())
