"""Ahead-of-time compile check: every kernel, at the configurations the launchers pick, for real GPU targets.

    python -m sprm_kernels.aot --arch 80 90 --json

No GPU is needed. Arguments are built by the launchers' own `prepare_*` functions on meta tensors, then mapped
to the signature and divisibility-16 hints that the JIT would infer (16-aligned pointers, integers divisible by
16, integers equal to 1 specialised as constants). Registers, spills and shared memory come from the
`cuobjdump` and `ptxas` that ship inside the triton wheel. Exits non-zero if a configuration fails to compile
or a 16-bit configuration spills on sm_90 (the project's goal). Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

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
SMS = {80: 108, 90: 132}  # A100, H100 SXM
HIDDEN_SIZES = (1536, 3584, 5120)
ROW_COUNTS = {"decode": 8, "medium": 512, "large": 32768}


def _signature(kernel, args, meta):
    """(signature, constexprs, attrs) as the JIT would specialise these arguments."""
    names = kernel.arg_names
    values = dict(zip(names[: len(args)], args, strict=True))  # the constexprs follow, from meta
    values.update({k: v for k, v in meta.items() if k in names})
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
            [_ptxas(arch), "-v", f"--gpu-name={sm}", ptx_path, "-o", os.path.join(tmp, "v.cubin")],
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


def _cases(arch: int):
    """(name, dtype, shape, regime, kernel, args, meta) for each representative launch."""
    from .kernels.sprm_score import pick_score_config, prepare_sprm_score, sprm_score_kernel
    from .kernels.step_logits import prepare_step_logits, step_logits_kernel
    from .kernels.step_positions import step_positions_count_kernel, step_positions_write_kernel
    from .kernels.step_scorer import prepare_step_scorer, step_scorer_kernel

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hidden_size in HIDDEN_SIZES:
            width = 2 * hidden_size
            w1, b1 = _meta_tensor((width, hidden_size), dtype), _meta_tensor((width,), dtype)
            w2, b2 = _meta_tensor((1, width), dtype), _meta_tensor((1,), dtype)
            for regime, rows in ROW_COUNTS.items():
                cfg = pick_score_config(rows, hidden_size, width, dtype, SMS[arch])
                hidden = _meta_tensor((rows * 2, hidden_size), dtype)
                step_index = _meta_tensor((rows,), torch.int64)
                offsets = _meta_tensor((9,), torch.int64)
                _, grid, args, meta = prepare_sprm_score(
                    hidden, step_index, offsets, w1, b1, w2, b2,
                    group_size=8, return_step_scores=True, config=cfg,
                )  # fmt: skip
                meta["UPCAST"] = False
                yield "sprm_score", dtype, f"S={rows} H={hidden_size}", regime, sprm_score_kernel, args, meta
                _, grid, args, meta = prepare_step_logits(hidden, step_index, w1, b1, w2, b2, config=cfg)
                meta["UPCAST"] = False
                yield "step_logits", dtype, f"S={rows} H={hidden_size}", regime, step_logits_kernel, args, meta
            for batch in (8, 32):
                cfg = pick_score_config(batch, hidden_size, width, dtype, SMS[arch])
                grid, args, meta = prepare_step_scorer(
                    _meta_tensor((batch, hidden_size), dtype), _meta_tensor((batch,), torch.bool),
                    w1, b1, w2, b2, _meta_tensor((cfg.num_splits * batch,), torch.float32),
                    _meta_tensor((1,), torch.int32), _meta_tensor((batch,), torch.float32),
                    _meta_tensor((batch,), torch.int64), _meta_tensor((batch,), torch.float32), cfg,
                )  # fmt: skip
                meta["UPCAST"] = False
                yield "step_scorer", dtype, f"B={batch} H={hidden_size}", "decode", step_scorer_kernel, args, meta
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
        yield "step_positions_count", torch.int64, layout, "-", step_positions_count_kernel, count_args, meta
        yield "step_positions_write", torch.int64, layout, "-", step_positions_write_kernel, write_args, meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default (FMA contraction); silences 3.9
    records, failures = [], 0
    for arch in args.arch:
        for name, dtype, shape, regime, kernel, kargs, meta in _cases(arch):
            record = {
                "kernel": name,
                "arch": f"sm_{arch}",
                "dtype": TYPE_CODES[dtype],
                "shape": shape,
                "regime": regime,
                "config": {k: v for k, v in meta.items() if k.isupper() or k.startswith("num_")},
            }
            try:
                record.update(_compile(kernel, kargs, meta, arch))
                record["ok"] = True
            except Exception as error:  # report every failing configuration, not just the first
                record.update(ok=False, error=f"{type(error).__name__}: {error}"[:500])
                failures += 1
            if record["ok"] and arch == 90 and dtype != torch.float32 and record["spill_bytes"] > 0:
                failures += 1
                record["goal_missed"] = "16-bit configuration spills on sm_90"
            records.append(record)
            if not args.json:
                print(_row(record), flush=True)
    if args.json:
        print(json.dumps(records, indent=1))
    print(f"aot: {len(records) - failures} ok, {failures} failed or spilling", file=sys.stderr)
    return 1 if failures else 0


def _row(record) -> str:
    head = f"{record['kernel']:22s} {record['arch']} {record['dtype']:5s} {record['shape']:18s} {record['regime']:7s}"
    if not record["ok"]:
        return f"{head} FAILED {record['error']}"
    return (
        f"{head} regs={record['registers']:3d} spill={record['spill_bytes']:4d} "
        f"smem={record['shared_bytes']:6d} local={record['local_bytes']:4d}"
    )


if __name__ == "__main__":
    sys.exit(main())
