"""Static performance model of the head kernels (no GPU needed): an LRU replay of L2 plus a roofline time.

Used by `python -m sprm_kernels.aot` to put modeled figures beside every compiled configuration. It replays the
kernels' own schedule (`kernels.schedule.program_tile` and `split_columns`, the functions the kernels are
compiled from) and is a model, not a measurement. Its assumptions (also in docs/kernels.md, "The performance
model"):

- Programs start in program-id order, `ctas_per_sm * sms` at a time (a round); the programs of a round advance
  through H in lockstep, so their accesses interleave chunk by chunk (H is cut into `k_chunks` chunks). A
  program of a later round starts when the round before it has finished.
- L2 is one fully associative LRU cache of the GPU's L2 size holding X and W1 chunks; a miss costs the chunk's
  bytes of DRAM traffic, a hit nothing. The [num_splits, S] fp32 partials, the step indices, b1, w2 and the outputs
  are counted once as DRAM traffic (written or read once); so are gathered rows, assumed distinct.
- Compute (the tile-math rate, `tile_seconds`): a program's BLOCK_S x BLOCK_N tile over H costs
  cdiv(H, BLOCK_K) K steps of max(MMA cycles, shared-memory operand-feed cycles) + the pipeline's per-step
  overhead cycles, at the sustained clock that makes a perfect tile run at the achievable rate (`flops_16`),
  plus the tile's prologue (the first stage's memory latency) and epilogue (bias, ReLU, the w2 reduction, the
  partial store and the ticket atomic) where nothing hides them: with one resident CTA per SM and no
  cross-tile prefetch. fp32 operands run on the FMA units at `flops_32` with no further terms. A program runs
  on one SM; programs go to the least-loaded SM in id order. Memory: DRAM bytes at min(bandwidth, bytes in
  flight / latency), scaled by the load imbalance of the programs' bytes over SMs. Time = max(compute, memory) + a fixed
  launch-and-tail overhead. `last_wave_idle` is the share of SMs without a CTA in the last round of one CTA
  per SM (ctas / sms rounds; 160 CTAs on 132 SMs: 79% idle), the tail that the compute time pays for. Bytes in
  flight = resident CTAs x (num_stages - 1) stages x the tile bytes a stage
  loads (columns past a split's end are masked and not counted).
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass

from .kernels.schedule import program_tile, split_columns

MIB = 1 << 20


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    l2_bytes: int
    dram_bytes_per_s: float  # achievable copy bandwidth
    flops_16: float  # achievable bf16/fp16 tensor-core rate
    flops_32: float  # nominal fp32 FMA rate (fp32 operands use IEEE fp32, not TF32)
    smem_per_sm: int  # shared memory a CTA may use per SM
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    dram_latency_s: float = 1.0e-6  # loaded DRAM latency, for Little's law
    overhead_s: float = 3.0e-6  # launch, ramp-up and the ticket tail of one launch
    # The tile-math rate (tile_seconds). Assumed, not measured: see docs/kernels.md, "The performance model".
    mma_flops_per_clk: int = 0  # nominal dense 16-bit tensor-core flops per SM per clock (0: no tensor model)
    mma_m: int = 16  # rows of one MMA: 64 per warpgroup (wgmma, sm_90), 16 per warp (mma.sync, sm_80)
    smem_bytes_per_clk: int = 128  # shared-memory bandwidth per SM, operands to the tensor cores
    step_overhead_clk: float = 96.0  # per K step, not overlapped with the MMAs: stage wait, CTA barrier, issuing
    # the next stage's cp.async loads (Triton's pipeline without warp specialisation)
    tile_epilogue_s: float = 1.0e-6  # bias, ReLU, w2 dot and N reduction, partial store, barrier, acq_rel ticket

    @property
    def sustained_clock_hz(self) -> float:
        """The clock at which `mma_flops_per_clk` gives the achievable rate `flops_16` (cuBLAS-level)."""
        return self.flops_16 / (self.sms * self.mma_flops_per_clk)


# docs/method.md §9 (H100, measured in this workplace) and the A100-80GB figures; L2 and SMs from the data sheets.
# Tensor cores: H100-SXM 989 TFLOP/s dense bf16 = 132 SMs x 4096 flop/clk x 1.83 GHz; A100 312 = 108 x 2048 x 1.41.
GPUS = {
    90: Gpu("H100-SXM", 90, 132, 50 * MIB, 3.0e12, 798e12, 67e12, 227 * 1024, mma_flops_per_clk=4096, mma_m=64),
    80: Gpu("A100-80GB", 80, 108, 40 * MIB, 1.8e12, 280e12, 19.5e12, 163 * 1024, mma_flops_per_clk=2048, mma_m=16),
}


class LruCache:
    """Fully associative LRU cache of `capacity` bytes over variable-size lines; `access` returns the DRAM bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.lines = capacity, 0, OrderedDict()

    def access(self, key, size: int) -> int:
        if key in self.lines:
            self.lines.move_to_end(key)
            return 0
        self.lines[key] = size
        self.used += size
        while self.used > self.capacity:
            self.used -= self.lines.popitem(last=False)[1]
        return size


@dataclass(frozen=True)
class Launch:
    """One launch's shape and schedule (the launcher's ScoreConfig fields that matter, plus the problem)."""

    rows: int  # S (or B)
    hidden: int  # H
    width: int  # F = 2H
    element: int  # bytes per element of X and W1
    block_s: int
    block_n: int
    block_k: int
    num_splits: int
    granule: int
    group_splits: int
    num_stages: int
    num_warps: int = 8
    persistent: bool = False  # what-if: one program per resident CTA walking the tiles in this order, with the next
    # tile's first stages prefetched during the epilogue (a flattened loop); not a schedule the kernels run

    @property
    def row_blocks(self) -> int:
        return -(-max(self.rows, 1) // self.block_s)

    @property
    def ctas(self) -> int:
        return self.row_blocks * self.num_splits

    @property
    def granules(self) -> int:
        return -(-self.width // self.granule) if self.rows > 0 else 0


def program_steps(launch: Launch, pid: int, chunks: list[tuple[int, int]]):
    """The (key, bytes) accesses of program `pid` in the kernel's loop order: for each BLOCK_N tile of its split,
    for each H chunk, its X rows then the W1 tile."""
    m, n = program_tile(pid, launch.row_blocks, launch.num_splits, launch.group_splits)
    rows = min(launch.block_s, launch.rows - m * launch.block_s)
    begin, end = split_columns(n, launch.num_splits, launch.granules, launch.granule)
    end = min(end, launch.width)
    steps = []
    for col in range(begin, end, launch.block_n):
        cols = min(launch.block_n, end - col)
        for index, (k0, k1) in enumerate(chunks):
            steps.append((("x", m, index), rows * (k1 - k0) * launch.element))
            steps.append((("w", col, index), cols * (k1 - k0) * launch.element))
    return steps


def h_chunks(hidden: int, k_chunks: int) -> list[tuple[int, int]]:
    k_chunks = max(1, min(k_chunks, hidden))
    bounds = [hidden * i // k_chunks for i in range(k_chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@functools.lru_cache(maxsize=64)  # kernels that share a schedule (sprm_score, step_logits) share the replay
def replay_l2(launch: Launch, l2_bytes: int, concurrent: int, k_chunks: int = 8) -> tuple[int, tuple[int, ...]]:
    """(DRAM bytes of X and W1, bytes each program loads) from replaying the schedule through an LRU L2."""
    cache, chunks, dram = LruCache(l2_bytes), h_chunks(launch.hidden, k_chunks), 0
    loaded = []
    for first in range(0, launch.ctas, concurrent):
        wave = [program_steps(launch, pid, chunks) for pid in range(first, min(first + concurrent, launch.ctas))]
        loaded += [sum(size for _, size in steps) for steps in wave]
        for t in range(max((len(steps) for steps in wave), default=0)):
            for steps in wave:
                if t < len(steps):
                    dram += cache.access(*steps[t])
    return dram, tuple(loaded)


def ctas_per_sm(gpu: Gpu, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory and threads."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = gpu.smem_per_sm // shared_bytes if shared_bytes else gpu.max_ctas_per_sm
    by_threads = gpu.max_threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, gpu.max_ctas_per_sm))


def busiest_sm(work: list[float], sms: int) -> tuple[float, float]:
    """(largest per-SM total, mean per-SM total) when programs go, in id order, to the least-loaded SM."""
    if not work:
        return 0.0, 0.0
    heap = [0.0] * min(sms, len(work))
    for w in work:
        heapq.heapreplace(heap, heap[0] + w)
    return max(heap), sum(work) / sms


def operand_feed_bytes(gpu: Gpu, m_rows: int, block_n: int, block_k: int, num_warps: int, element: int) -> int:
    """Shared-memory bytes the warps read per K step to feed the tensor cores with an [m_rows, block_k] x
    [block_k, block_n] product. wgmma (mma_m = 64): warpgroups of 4 warps split M (each reads its rows of A and
    all of B) or, when M is one MMA tall, N (each reads all of A and its columns of B). mma.sync: every warp
    loads its fragments, on the warp grid (wm x wn) that reads the fewest bytes."""
    if gpu.mma_m >= 64:
        groups = max(1, num_warps // 4)
        if m_rows >= gpu.mma_m * groups:
            return (m_rows + groups * block_n) * block_k * element
        return (groups * m_rows + block_n) * block_k * element
    grids = [(wm, num_warps // wm) for wm in range(1, num_warps + 1) if num_warps % wm == 0]
    fitting = [(wm, wn) for wm, wn in grids if m_rows >= 16 * wm and block_n >= 8 * wn] or grids
    return min((m_rows * wn + block_n * wm) * block_k * element for wm, wn in fitting)


def tile_seconds(launch: Launch, gpu: Gpu, co_resident: int) -> tuple[float, float]:
    """(seconds for one BLOCK_S x BLOCK_N tile over H on one SM, main-loop efficiency against the achievable rate).

    16-bit operands: cdiv(H, BLOCK_K) K steps, each max(MMA cycles of the tile padded to the MMA's rows, cycles to
    feed the operands from shared memory) + `step_overhead_clk`, at the sustained clock; plus the tile's prologue
    (one `dram_latency_s`: the first stage's loads) and epilogue (`tile_epilogue_s`) when nothing overlaps them:
    one co-resident CTA on the SM and no cross-tile prefetch (`persistent`, which hides the prologue only). With
    two or more co-resident CTAs, one's prologue and epilogue run under the other's main loop. fp32 operands (and
    a GPU without tensor-core figures) run at the nominal rate with no further terms, as before."""
    steps = -(-launch.hidden // launch.block_k)
    flops = 2.0 * launch.block_s * launch.block_n * steps * launch.block_k
    if launch.element == 4 or not gpu.mma_flops_per_clk:
        rate = gpu.flops_32 if launch.element == 4 else gpu.flops_16
        return flops / (rate / gpu.sms), 1.0
    m_rows = -(-launch.block_s // gpu.mma_m) * gpu.mma_m
    mma = 2.0 * m_rows * launch.block_n * launch.block_k / gpu.mma_flops_per_clk
    feed = operand_feed_bytes(gpu, m_rows, launch.block_n, launch.block_k, launch.num_warps, launch.element)
    step = max(mma, feed / gpu.smem_bytes_per_clk) + gpu.step_overhead_clk
    fixed = 0.0
    if co_resident < 2:
        fixed = gpu.tile_epilogue_s + (0.0 if launch.persistent else gpu.dram_latency_s)
    useful = 2.0 * launch.block_s * launch.block_n * launch.block_k / gpu.mma_flops_per_clk
    return steps * step / gpu.sustained_clock_hz + fixed, useful / step


def model_launch(launch: Launch, gpu: Gpu, *, registers: int, shared_bytes: int, num_warps: int, k_chunks=8):
    """The report's model fields for one launch on one GPU (see the module docstring for the assumptions)."""
    per_sm = ctas_per_sm(gpu, registers, shared_bytes, num_warps)
    concurrent = max(1, per_sm) * gpu.sms
    rate = gpu.flops_32 if launch.element == 4 else gpu.flops_16
    s, h, f, e = launch.rows, launch.hidden, launch.width, launch.element
    small = 8 * s + 2 * f * e + 8 * s  # step indices, b1 and w2, per-step outputs
    ideal = s * h * e + f * h * e + small
    xw_dram, loaded = replay_l2(launch, gpu.l2_bytes, concurrent, k_chunks)
    modeled = xw_dram + small + 2 * 4 * launch.num_splits * s  # the fp32 partials: written once, read once
    co_resident = min(max(1, per_sm), -(-launch.ctas // gpu.sms))
    seconds_per_tile, efficiency = tile_seconds(launch, gpu, co_resident)
    program_seconds = []
    for pid in range(launch.ctas):
        _, n = program_tile(pid, launch.row_blocks, launch.num_splits, launch.group_splits)
        begin, end = split_columns(n, launch.num_splits, launch.granules, launch.granule)
        program_seconds.append(seconds_per_tile * -(-max(min(end, f) - begin, 0) // launch.block_n))
    compute_s = busiest_sm(program_seconds, gpu.sms)[0]
    resident = min(launch.ctas, concurrent)
    cols_per_split = f / launch.num_splits if launch.granules else 0.0
    w_stage = min(launch.block_n, cols_per_split) * launch.block_k * e
    x_stage = min(launch.block_s, max(s, 1)) * launch.block_k * e
    in_flight_w = resident * max(launch.num_stages - 1, 1) * w_stage
    in_flight = resident * max(launch.num_stages - 1, 1) * (w_stage + x_stage)
    bandwidth = min(gpu.dram_bytes_per_s, in_flight / gpu.dram_latency_s) if in_flight else gpu.dram_bytes_per_s
    most, mean = busiest_sm([float(b) for b in loaded], gpu.sms)
    imbalance = most / mean if mean else 1.0
    memory_s = modeled / bandwidth * imbalance
    flops = 2.0 * s * f * h + 2.0 * s * f
    roofline_s = max(flops / rate, ideal / gpu.dram_bytes_per_s)
    waves = launch.ctas / concurrent
    rounds = launch.ctas / gpu.sms  # rounds of one CTA per SM: the work quantum of the compute model
    return {
        "gpu": gpu.name,
        "ctas": launch.ctas,
        "sms": gpu.sms,
        "ctas_per_sm": per_sm,
        "waves": round(waves, 3),
        "last_wave_idle": round(0.0 if rounds == int(rounds) else 1.0 - (rounds - math.floor(rounds)), 3),
        "w1_bytes_in_flight": int(in_flight_w),
        "modeled_dram_bytes": int(modeled),
        "ideal_dram_bytes": int(ideal),
        "modeled_time_us": round(1e6 * (max(compute_s, memory_s) + gpu.overhead_s), 2),
        "roofline_time_us": round(1e6 * roofline_s, 2),
        "w1_stream_floor_us": round(1e6 * f * h * e / gpu.dram_bytes_per_s, 2),
        "tile_efficiency": round(efficiency, 3),  # main loop's share of the achievable rate (tile_seconds)
        "tile_math_tflops": round(flops / compute_s / 1e12, 1) if compute_s else 0.0,  # useful flops / compute time
    }
