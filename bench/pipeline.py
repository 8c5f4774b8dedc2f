"""Pipeline benchmark: `ReflectiveModel.generate` against the public reference flow, scoring alone, scoring memory.

    python -m bench.pipeline [--quick] [--ks 2 8 32] [--threads 1] [--csv PATH] [--no-memory] [--no-scoring]

1. Best-of-k generation, k in --ks, on the same model, prompts and seeds: ours (prefill once, k thinking rows as
   one batch scored as they are written, the answer from the chosen row's KV cache) against `bench.reference_flow`
   (k full responses with HF `generate`, one `output_hidden_states` forward per response, argmax). Wall time per
   phase, peak memory, tokens through the model, the share of time spent scoring, and whether both flows choose
   the same candidate when given the same candidates (ours are fed to the reference's scoring path).
2. Scoring alone: `ReflectiveModel.score` on a batch of texts against the reference's one-text-at-a-time scoring.
3. Scoring memory: hidden-state bytes each flow keeps (analytic, by length T and layer count L) and measured peaks.

Setup: a random tiny Qwen2 (default H=256, 4 layers, 4 heads, 2 KV heads, fp32, character tokenizer) with a random
SPRM head, on CPU with backend="torch". A random policy writes noise with no structure, so a fixed bias is added to
its logits that depends only on the class of the previous token (a first-order Markov chain over token classes,
see `StepwiseBias`): while thinking it writes digits, `+`, `=`, `.\\n\\n` (a step, probability 1/8) and `</think>`
(1/64); after `</think>` it writes answer characters and EOS (1/16). The bias costs the same in both flows; the
transformer still runs every forward. Thinking is capped at --max-think tokens and the answer at --max-answer
(ours); the reference gets the same budget per response (--max-think + --max-answer new tokens). top_p is 1.0: a
nucleus would cut the rare `</think>` of this synthetic chain.

CSV (appended to the kernel benchmark's, columns of `bench.common.CSV_COLUMNS`; dtype float32; H = hidden size):
  kernel "pipeline", S = k, provider "reflective" / "reference": metric ms (end to end per prompt), ms_<phase>,
      scoring_pct, peak_mem_MB, tokens_prefill / _decode / _scoring / _generated / _forwards (mean per
      prompt); provider "reflective", metric speedup (reference median ms / ours) and speedup_total (ratio of the
      summed times of all runs); provider "agreement": same_choice_pct,
      same_argmax_pct, max_score_diff.
  kernel "score_batch", S = batch size, providers reflective_batched / reflective_one_at_a_time /
      reference_one_at_a_time: metric ms (whole batch), ms_per_text, tokens, padded_tokens.
  kernel "scoring_memory_L<L>", S = T (tokens of the scored sequence), providers reference_output_hidden_states /
      reflective_score: metric kept_MB_analytic (hidden-state bytes kept), peak_MB_measured (one scoring call).
  kernel "scoring_memory_stream", S = k, provider reflective_stream: metric extra_MB (what scoring adds to generate).
  kernel "machine_load", S = 0: metric cpu_pct, the share of the CPUs other processes used while timing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from sprm_kernels.dispatch import interpreter_enabled
from sprm_kernels.model import ReflectiveModel
from sprm_kernels.model.engines.hf import scoring as reflective_scoring
from sprm_kernels.model.engines.hf import thinking as reflective_thinking
from sprm_kernels.model.shipped import tiny

from . import common
from .reference_flow import StepRule, argmax, reference_generate, score_sequence

PROMPTS = ("12+34+5=", "7+8+9+10=", "123+456=", "3+4+5+6+7=", "99+1+23=", "5+55+555=")
THINK_CHARS, ANSWER_CHARS = "0123456789+=", "x .\n"
DTYPE = "float32"
# Layer L-2 features of this policy have std ~0.12 (H=256); a head scaled for 0.5 spreads the step probabilities
# over (0, 1) (10th / 50th / 90th percentiles about 0.3 / 0.94 / 0.99) instead of saturating them at 0 or 1.
HEAD_FEATURE_STD = 0.5


@dataclass
class Config:
    hidden_size: int = 256
    num_layers: int = 4
    ks: tuple[int, ...] = (2, 8, 32)
    prompts: tuple[str, ...] = PROMPTS[:4]
    seeds: tuple[int, ...] = (0, 1, 2)
    max_think: int = 128
    max_answer: int = 32
    temperature: float = 0.6
    top_p: float = 1.0
    step_p: float = 1 / 8  # probability of `.\n\n` while thinking
    close_p: float = 1 / 64  # probability of `</think>` while thinking
    eos_p: float = 1 / 16  # probability of EOS in the answer
    memory: bool = True
    peak_memory: bool = True  # profile one run of each flow per k (slow on CPU: the profiler records every op)
    scoring: bool = True
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    score_budget_s: float = 3.0  # seconds of timed repeats per batch size, shared by its providers
    memory_lengths: tuple[int, ...] = (256, 1024, 4096)
    memory_layers: tuple[int, ...] = (4, 8, 16)
    measured_memory: tuple[tuple[int, int], ...] = ((256, 4), (1024, 4), (4096, 4), (1024, 8), (1024, 16))  # (T, L)
    stream_k: int = 8  # candidates of the streaming-scorer memory row
    backend: str = "torch"


QUICK = Config(
    ks=(2, 8), prompts=PROMPTS[:3], seeds=(0,), max_think=64, max_answer=16, peak_memory=False, score_budget_s=1.0,
    measured_memory=((256, 4), (1024, 4)),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Setup


class StepwiseBias:
    """Adds `temperature * log p(next class | previous token's class)` to the policy's logits, so that a random
    policy sampled at `temperature` writes realistic thinking (steps, then `</think>`) and a short answer (EOS).

    Two classes: answer (after `</think>` or an answer character) and thinking (everything else). The previous
    tokens come from a pre-hook on the input embedding; the bias is added by a hook on the LM head."""

    def __init__(self, model, tokenizer, config: Config):
        ids = lambda text: tokenizer.encode(text, add_special_tokens=False)[0]  # " " is the vocabulary's "Ġ"
        think, answer = [ids(c) for c in THINK_CHARS], [ids(c) for c in ANSWER_CHARS]
        step, close, eos = ids(".\n\n"), ids("</think>"), tokenizer.eos_token_id
        probs = torch.zeros(2, model.config.vocab_size)
        probs[0, think] = (1 - config.step_p - config.close_p) / len(think)
        probs[0, step], probs[0, close] = config.step_p, config.close_p
        probs[1, answer], probs[1, eos] = (1 - config.eos_p) / len(answer), config.eos_p
        self.table = torch.where(probs > 0, config.temperature * probs.clamp(min=1e-30).log(), -1e4)
        self.token_class = torch.zeros(model.config.vocab_size, dtype=torch.long)
        self.token_class[answer + [close]] = 1
        self.input_ids = None
        model.get_input_embeddings().register_forward_pre_hook(self._record)
        model.get_output_embeddings().register_forward_hook(self._bias)

    def _record(self, module, args):
        self.input_ids = args[0]

    def _bias(self, module, args, logits):
        previous = self.input_ids[:, -logits.shape[1] :]
        return logits + self.table[self.token_class[previous]].to(logits)


@dataclass
class Setup:
    config: Config
    tokenizer: object
    model: torch.nn.Module
    rm: ReflectiveModel
    rule: StepRule

    @property
    def head(self):
        return self.rm.head


def build(config: Config, *, num_layers: int | None = None, max_positions: int = 512, bias: bool = True) -> Setup:
    tokenizer = tiny.make_char_tokenizer()
    layers = num_layers or config.num_layers
    model = tiny.make_tiny_policy(
        "qwen2", len(tokenizer), hidden_size=config.hidden_size, num_layers=layers, max_positions=max_positions
    )
    if bias:
        StepwiseBias(model, tokenizer, config)
    head = tiny.make_tiny_head(config.hidden_size, feature_std=HEAD_FEATURE_STD)
    rm = ReflectiveModel(model, tokenizer, head, backend=config.backend)
    return Setup(config, tokenizer, model, rm, StepRule.from_tokenizer(tokenizer))


def describe(config: Config, device_name: str) -> str:
    return (
        f"model: random Qwen2, H={config.hidden_size}, {config.num_layers} layers, fp32, character tokenizer, "
        f"random SPRM head; {device_name}, torch {torch.__version__}, backend={config.backend}\n"
        f"policy logits biased by the previous token's class (thinking: step 1/{1 / config.step_p:.0f}, "
        f"</think> 1/{1 / config.close_p:.0f}; answer: EOS 1/{1 / config.eos_p:.0f}); temperature "
        f"{config.temperature}, top_p {config.top_p}; ours: max_think {config.max_think}, max_answer "
        f"{config.max_answer}; reference: max_new_tokens {config.max_think + config.max_answer} per response\n"
        f"{len(config.prompts)} prompts x {len(config.seeds)} seeds per k, flows timed in turns"
    )


# ---------------------------------------------------------------------------------------------------------------
# Best-of-k: one run of each flow


@dataclass
class Run:
    """One prompt and seed through one flow: seconds per phase, tokens through the model, scoring seconds."""

    seconds: dict[str, float]
    total_s: float
    tokens: dict[str, int]
    scoring_s: float
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def scoring_timers(totals: dict[str, float]):
    """Times our in-decode scoring: `StepScorer.update` (the head on the k new rows) and the span bookkeeping of
    docs/method.md §3 (`ThinkSpan.contains` / `observe`), by swapping timed subclasses into the HF engine's
    thinking loop (`engines.hf.thinking`) for the block."""
    originals = {name: getattr(reflective_thinking, name) for name in ("StepScorer", "ThinkSpan")}

    def timed(cls, methods, key):
        def wrap(name):
            method = getattr(cls, name)

            def timed_method(self, *args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(self, *args, **kwargs)
                finally:
                    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

            return timed_method

        return type(f"Timed{cls.__name__}", (cls,), {name: wrap(name) for name in methods})

    try:
        reflective_thinking.StepScorer = timed(originals["StepScorer"], ["update"], "head")
        reflective_thinking.ThinkSpan = timed(originals["ThinkSpan"], ["contains", "observe"], "span")
        yield totals
    finally:
        for name, value in originals.items():
            setattr(reflective_thinking, name, value)


def run_reflective(setup: Setup, prompt: str, k: int, seed: int) -> tuple[Run, object]:
    config = setup.config
    totals: dict[str, float] = {}
    with scoring_timers(totals):
        start = time.perf_counter()
        result = setup.rm.generate(
            prompt, k=k, max_think_tokens=config.max_think, max_answer_tokens=config.max_answer,
            temperature=config.temperature, top_p=config.top_p, seed=seed, backend=config.backend,
        )  # fmt: skip
        total = time.perf_counter() - start
    stats = result.stats
    think_forwards = max(len(c.token_ids) for c in result.candidates) - 1  # the last sampled token is not fed
    tokens = dict(
        prefill=stats.prefill_tokens, decode=stats.think_decode_tokens + stats.answer_decode_tokens, scoring=0,
        generated=stats.think_generated_tokens + len(result.answer_token_ids),
        forwards=1 + think_forwards + len(result.answer_token_ids),  # one answer forward per answer token
    )  # fmt: skip
    scoring = totals.get("head", 0.0) + totals.get("span", 0.0) + stats.seconds["select"]
    extra = dict(head_s=totals.get("head", 0.0), span_s=totals.get("span", 0.0))
    return Run(dict(stats.seconds), total, tokens, scoring, extra), result


def run_reference(setup: Setup, prompt: str, k: int, seed: int) -> Run:
    config = setup.config
    start = time.perf_counter()
    result = reference_generate(
        setup.model, setup.tokenizer, setup.head, prompt, k=k, max_new_tokens=config.max_think + config.max_answer,
        temperature=config.temperature, top_p=config.top_p, seed=seed, rule=setup.rule,
    )  # fmt: skip
    total = time.perf_counter() - start
    stats = result.stats
    tokens = dict(
        prefill=stats.generation_prefill_tokens, decode=stats.generation_decode_tokens, scoring=stats.scoring_tokens,
        generated=stats.generated_tokens, forwards=1 + stats.generation_decode_tokens // k + k,
    )  # fmt: skip
    return Run(dict(stats.seconds), total, tokens, stats.seconds["scoring"])


def agreement(setup: Setup, result) -> dict[str, float]:
    """Our candidates through the reference's scoring path: does its argmax pick our choice?"""
    ours = [c.score for c in result.candidates]
    theirs = [score_sequence(setup.model, setup.head, result.prompt_token_ids + c.token_ids, setup.rule)
              for c in result.candidates]  # fmt: skip
    return dict(
        same_choice=float(argmax(theirs) == result.best),  # our choice puts finished rows first
        same_argmax=float(argmax(theirs) == argmax(ours)),  # the scores alone
        max_score_diff=max(abs(a - b) for a, b in zip(ours, theirs, strict=True)),
        all_finished=float(all(c.finished for c in result.candidates)),
    )


@dataclass
class PipelineResult:
    k: int
    ours: list[Run]
    reference: list[Run]
    agreement: list[dict[str, float]]
    peak_mb: dict[str, float]


def bench_k(setup: Setup, k: int) -> PipelineResult:
    config = setup.config
    ours, reference, agree = [], [], []
    run_reflective(setup, config.prompts[0], k, seed=12345)  # warm-up (first-call overheads) of both flows
    run_reference(setup, config.prompts[0], k, seed=12345)
    turn = 0
    for prompt in config.prompts:
        for seed in config.seeds:
            flows = ["ours", "reference"] if turn % 2 == 0 else ["reference", "ours"]  # alternate who goes first
            for flow in flows:
                if flow == "ours":
                    run, result = run_reflective(setup, prompt, k, seed)
                    ours.append(run)
                    agree.append(agreement(setup, result))
                else:
                    reference.append(run_reference(setup, prompt, k, seed))
            turn += 1
    peak = {}
    if config.peak_memory:
        device = torch.device("cpu")
        prompt, seed = config.prompts[0], config.seeds[0]
        peak["ours"] = common.peak_memory_mb(lambda: run_reflective(setup, prompt, k, seed), device)
        peak["reference"] = common.peak_memory_mb(lambda: run_reference(setup, prompt, k, seed), device)
    return PipelineResult(k, ours, reference, agree, peak)


# ---------------------------------------------------------------------------------------------------------------
# Scoring alone


def synthetic_texts(setup: Setup, count: int, seed: int = 0) -> list[str]:
    """Prompt + thinking + answer texts drawn from the same chain the biased policy follows (no model)."""
    config, tokenizer = setup.config, setup.tokenizer
    gen = torch.Generator().manual_seed(seed)
    draw = lambda p: torch.rand((), generator=gen).item() < p
    texts = []
    for i in range(count):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
        )
        think = []
        while len(think) < config.max_think - 1 and not draw(config.close_p):
            is_step = draw(config.step_p / (1 - config.close_p))
            think.append(".\n\n" if is_step else THINK_CHARS[torch.randint(len(THINK_CHARS), (), generator=gen)])
        answer = []
        while len(answer) < config.max_answer - 1 and not draw(config.eos_p):
            answer.append(ANSWER_CHARS[torch.randint(len(ANSWER_CHARS), (), generator=gen)])
        texts.append(prompt + "".join(think) + "</think>" + "".join(answer) + tokenizer.eos_token)
    return texts


def reference_score_texts(setup: Setup, texts: list[str]) -> list[float]:
    """The reference's scoring server: each text tokenized without special tokens, then scored alone."""
    tokenize = lambda text: setup.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [score_sequence(setup.model, setup.head, tokenize(text), setup.rule) for text in texts]


@dataclass
class ScoreBatchResult:
    batch: int
    timings: dict[str, common.Timing]
    tokens: int
    padded_tokens: int
    max_score_diff: float


def padded_tokens(lengths: list[int], budget: int = 16384) -> int:
    """Tokens through the model when `score` right-pads its length-sorted batches (`batch_tokens` default)."""
    batches = reflective_scoring.length_batches(lengths, budget, packed=False)
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def bench_scoring(setup: Setup, load: common.OtherLoad) -> list[ScoreBatchResult]:
    config = setup.config
    texts = synthetic_texts(setup, max(config.batch_sizes))
    lengths = [len(setup.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    rm = setup.rm
    out = []
    for batch in config.batch_sizes:
        subset = texts[:batch]
        providers = {
            "reflective_batched": lambda s=subset: rm.score(s, backend=config.backend),
            "reflective_one_at_a_time": lambda s=subset: [rm.score(t, backend=config.backend) for t in s],
            "reference_one_at_a_time": lambda s=subset: reference_score_texts(setup, s),
        }
        with load.measuring():
            timings = common.time_cpu_interleaved(providers, budget_s=config.score_budget_s)
        ours = [r.value for r in rm.score(subset, backend=config.backend)]
        diff = max(abs(a - b) for a, b in zip(ours, reference_score_texts(setup, subset), strict=True))
        out.append(ScoreBatchResult(batch, timings, sum(lengths[:batch]), padded_tokens(lengths[:batch]), diff))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scoring memory


def kept_bytes(length: int, layers: int, hidden: int, steps: int, elt: int = 4) -> dict[str, int]:
    """Analytic hidden-state bytes each way of scoring keeps for one sequence of `length` tokens (fp32):
    the reference's output_hidden_states forward keeps every layer, (L+1)*T*H (logits [T, V] come on top);
    `score()` keeps the output of layer L-2 only, [T, H], plus [S] step outputs."""
    return dict(
        reference_output_hidden_states=(layers + 1) * length * hidden * elt,
        reflective_score=length * hidden * elt + steps * 4,
    )


def stream_buffer_bytes(k: int, hidden: int, max_think: int, elt: int = 4) -> int:
    """What scoring adds to `generate` besides one StepScorer.update's temporaries: the [k, H] row buffer, the
    [k, max_think] step probabilities (fp32) and flags (bool), the scorer's running sums and counts. No hidden
    state is kept: the rows come from the decode forward that produces the next token anyway."""
    return k * hidden * elt + k * max_think * 5 + k * (4 + 8 + 4)


def memory_sequence(setup: Setup, length: int) -> list[int]:
    """A prompt, `<think>`, thinking with a step every 8 tokens, `</think>` and an answer: `length` tokens."""
    tokenizer = setup.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]  # fmt: skip
    body = [ids(".\n\n") if i % 8 == 7 else ids(THINK_CHARS[i % 10]) for i in range(length - len(prompt) - 9)]
    return (prompt + body + [ids("</think>")] + [ids("x")] * 8)[:length]


@dataclass
class MemoryResult:
    analytic: dict[tuple[int, int], dict[str, int]]  # (T, L) -> provider -> bytes
    measured: dict[tuple[int, int], dict[str, float]]  # (T, L) -> provider -> MB
    stream_mb: float  # scoring's extra in generate, stream_k candidates: one update's peak (measured) + buffers


def bench_memory(config: Config) -> MemoryResult:
    device = torch.device("cpu")
    analytic, measured = {}, {}
    probe = build(config, bias=False)
    for length in config.memory_lengths:
        steps = len(memory_sequence(probe, length)) // 8
        for layers in config.memory_layers:
            analytic[(length, layers)] = kept_bytes(length, layers, config.hidden_size, steps)
    for length, layers in config.measured_memory:
        setup = build(config, num_layers=layers, max_positions=max(length, 512), bias=False)
        ids = memory_sequence(setup, length)
        measured[(length, layers)] = {
            "reference_output_hidden_states": common.peak_memory_mb(
                partial(score_sequence, setup.model, setup.head, ids, setup.rule), device
            ),
            "reflective_score": common.peak_memory_mb(partial(setup.rm.score, ids, backend=config.backend), device),
        }
    from sprm_kernels import StepScorer

    scorer = StepScorer(*probe.head.kernel_weights(), batch_size=config.stream_k, backend=config.backend)
    features = torch.randn(config.stream_k, config.hidden_size)
    is_step = torch.ones(config.stream_k, dtype=torch.bool)
    update_mb = common.peak_memory_mb(lambda: scorer.update(features, is_step), device)
    stream_mb = update_mb + stream_buffer_bytes(config.stream_k, config.hidden_size, config.max_think) / 1e6
    return MemoryResult(analytic, measured, stream_mb)


# ---------------------------------------------------------------------------------------------------------------
# Report


def percentiles(values: list[float]) -> tuple[float, float, float]:
    p50, p20, p80 = np.percentile(np.array(values, dtype=float), [50, 20, 80])
    return float(p50), float(p20), float(p80)


def mean(values) -> float:
    return statistics.fmean(values) if values else float("nan")


def pipeline_rows(results: list[PipelineResult], config: Config, stamp: dict) -> list[dict]:
    rows = []
    for res in results:
        row = partial(_row, "pipeline", res.k, config, stamp)
        for provider, runs in (("reflective", res.ours), ("reference", res.reference)):
            rows.append(row(provider, "ms", percentiles([1e3 * r.total_s for r in runs])))
            for phase in runs[0].seconds:
                rows.append(row(provider, f"ms_{phase}", percentiles([1e3 * r.seconds[phase] for r in runs])))
            rows.append(row(provider, "scoring_pct", percentiles([100 * r.scoring_s / r.total_s for r in runs])))
            for name in runs[0].tokens:
                rows.append(row(provider, f"tokens_{name}", (mean([r.tokens[name] for r in runs]),) * 3))
            peak = res.peak_mb.get("ours" if provider == "reflective" else "reference")
            if peak is not None:
                rows.append(row(provider, "peak_mem_MB", (peak,) * 3))
        rows.append(row("reflective", "speedup", (speedup(res),) * 3))
        rows.append(row("reflective", "speedup_total", (speedup_total(res),) * 3))
        for name in ("same_choice", "same_argmax"):
            rows.append(row("agreement", f"{name}_pct", (100 * mean([a[name] for a in res.agreement]),) * 3))
        rows.append(row("agreement", "max_score_diff", (max(a["max_score_diff"] for a in res.agreement),) * 3))
    return rows


def speedup(res: PipelineResult) -> float:
    """Reference median end-to-end time over ours."""
    med = lambda runs: statistics.median(r.total_s for r in runs)
    return med(res.reference) / med(res.ours)


def speedup_total(res: PipelineResult) -> float:
    """Reference total time over ours, all prompts and seeds together (less sensitive to a few long samples)."""
    return sum(r.total_s for r in res.reference) / sum(r.total_s for r in res.ours)


def _row(kernel, size, config: Config, stamp, provider, metric, values) -> dict:
    """One CSV row; `values` are (p50, p20, p80)."""
    p50, p20, p80 = values
    return dict(kernel=kernel, provider=provider, dtype=DTYPE, S=size, H=config.hidden_size, metric=metric,
                p50=f"{p50:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}", **stamp)  # fmt: skip


def pipeline_table(results: list[PipelineResult]) -> str:
    headers = ["k", "flow", "total ms p50 [p20, p80]", "phases ms (p50)", "scoring %", "tokens prefill",
               "decode", "scoring fwd", "generated", "forwards", "peak MB", "speedup p50 / total"]  # fmt: skip
    lines = []
    for res in results:
        for name, runs in (("reflective", res.ours), ("reference", res.reference)):
            total = percentiles([1e3 * r.total_s for r in runs])
            phases = " / ".join(
                f"{p} {statistics.median(r.seconds[p] for r in runs) * 1e3:.0f}" for p in runs[0].seconds
            )
            tokens = {n: mean([r.tokens[n] for r in runs]) for n in runs[0].tokens}
            peak = res.peak_mb.get("ours" if name == "reflective" else "reference")
            lines.append([
                res.k, name, f"{total[0]:.0f} [{total[1]:.0f}, {total[2]:.0f}]", phases,
                f"{statistics.median(100 * r.scoring_s / r.total_s for r in runs):.2f}",
                f"{tokens['prefill']:.0f}", f"{tokens['decode']:.0f}", f"{tokens['scoring']:.0f}",
                f"{tokens['generated']:.0f}", f"{tokens['forwards']:.0f}", "-" if peak is None else f"{peak:.1f}",
                f"{speedup(res):.2f}x / {speedup_total(res):.2f}x" if name == "reflective" else "",
            ])  # fmt: skip
    return common.format_table(headers, lines)


def breakdown_table(results: list[PipelineResult]) -> str:
    """Where our scoring time goes, and the same-candidate check."""
    headers = ["k", "ours: head %", "span rule %", "select %", "scoring % (sum)", "reference: scoring fwd %",
               "same choice", "same argmax", "all rows finished", "max |score diff|"]  # fmt: skip
    lines = []
    for res in results:
        lines.append([
            res.k, f"{_share(res.ours, lambda r: r.extra['head_s']):.2f}",
            f"{_share(res.ours, lambda r: r.extra['span_s']):.2f}",
            f"{_share(res.ours, lambda r: r.seconds['select']):.2f}", f"{_share(res.ours, lambda r: r.scoring_s):.2f}",
            f"{_share(res.reference, lambda r: r.scoring_s):.1f}",
            f"{sum(a['same_choice'] for a in res.agreement):.0f}/{len(res.agreement)}",
            f"{sum(a['same_argmax'] for a in res.agreement):.0f}/{len(res.agreement)}",
            f"{sum(a['all_finished'] for a in res.agreement):.0f}/{len(res.agreement)}",
            f"{max(a['max_score_diff'] for a in res.agreement):.1e}",
        ])  # fmt: skip
    return common.format_table(headers, lines)


def _share(runs: list[Run], seconds: Callable[[Run], float]) -> float:
    """Median over runs of `seconds(run)` as a percentage of the run's end-to-end time."""
    return statistics.median(100 * seconds(r) / r.total_s for r in runs)


def scoring_rows(results: list[ScoreBatchResult], config: Config, stamp: dict) -> list[dict]:
    rows = []
    for res in results:
        for provider, t in res.timings.items():
            row = partial(_row, "score_batch", res.batch, config, stamp, provider)
            rows.append(row("ms", (t.p50, t.p20, t.p80)))
            rows.append(row("ms_per_text", (t.p50 / res.batch, t.p20 / res.batch, t.p80 / res.batch)))
            rows.append(row("tokens", (res.tokens,) * 3))
            if provider == "reflective_batched":
                rows.append(row("padded_tokens", (res.padded_tokens,) * 3))
    return rows


def scoring_table(results: list[ScoreBatchResult]) -> str:
    headers = ["batch", "tokens", "padded", "batched ms [p20, p80]", "ours 1-by-1 ms", "reference 1-by-1 ms",
               "vs reference", "vs ours 1-by-1", "max |score diff|"]  # fmt: skip
    lines = []
    for res in results:
        batched, single, ref = (res.timings[n] for n in ("reflective_batched", "reflective_one_at_a_time",
                                                          "reference_one_at_a_time"))  # fmt: skip
        lines.append([
            res.batch, res.tokens, res.padded_tokens, f"{batched.p50:.1f} [{batched.p20:.1f}, {batched.p80:.1f}]",
            f"{single.p50:.1f}", f"{ref.p50:.1f}", f"{ref.p50 / batched.p50:.2f}x", f"{single.p50 / batched.p50:.2f}x",
            f"{res.max_score_diff:.1e}",
        ])  # fmt: skip
    return common.format_table(headers, lines)


def memory_rows(result: MemoryResult, config: Config, stamp: dict) -> list[dict]:
    rows = []
    for (length, layers), by_provider in result.analytic.items():
        for provider, nbytes in by_provider.items():
            rows.append(_row(f"scoring_memory_L{layers}", length, config, stamp, provider, "kept_MB_analytic",
                             (nbytes / 1e6,) * 3))  # fmt: skip
    for (length, layers), by_provider in result.measured.items():
        for provider, mb in by_provider.items():
            rows.append(_row(f"scoring_memory_L{layers}", length, config, stamp, provider, "peak_MB_measured",
                             (mb,) * 3))  # fmt: skip
    rows.append(_row("scoring_memory_stream", config.stream_k, config, stamp, "reflective_stream", "extra_MB",
                     (result.stream_mb,) * 3))  # fmt: skip
    return rows


def memory_table(result: MemoryResult, config: Config) -> str:
    headers = ["T", "L", "kept: reference (L+1)TH MB", "ours score() TH MB", "ratio", "peak: reference MB",
               "ours score() MB", "ratio", f"ours generate k={config.stream_k} MB", "ref / generate"]  # fmt: skip
    lines = []
    for (length, layers), kept in result.analytic.items():
        ref, score = kept["reference_output_hidden_states"], kept["reflective_score"]
        cells = ["-"] * 3 + [f"{result.stream_mb:.3f}", "-"]
        measured = result.measured.get((length, layers))
        if measured:
            m_ref, m_ours = measured["reference_output_hidden_states"], measured["reflective_score"]
            cells = [
                f"{m_ref:.2f}",
                f"{m_ours:.2f}",
                f"{m_ref / m_ours:.1f}x",
                cells[3],
                f"{m_ref / result.stream_mb:.0f}x",
            ]
        lines.append([length, layers, f"{ref / 1e6:.2f}", f"{score / 1e6:.2f}", f"{ref / score:.1f}x", *cells])
    return common.format_table(headers, lines)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def run(config: Config, *, csv_path=None, log: Callable[[str], None] = print) -> list[dict]:
    """Every part of the benchmark that `config` asks for; prints the tables and appends the CSV rows."""
    device_name = common.device_name(torch.device("cpu"))
    stamp = dict(device_name=device_name, timestamp=common.utc_timestamp(), version=common.version_string())
    log(describe(config, device_name))
    load = common.OtherLoad()
    setup = build(config)
    rows = []
    pipeline = []
    for k in config.ks:
        print(f"pipeline k={k}", file=sys.stderr, flush=True)
        with load.measuring():
            pipeline.append(bench_k(setup, k))
    if pipeline:
        log("\nbest-of-k generation, per prompt (ours phases: prefill / think / select / answer; reference: "
            "generation / scoring / select)")  # fmt: skip
        log(pipeline_table(pipeline))
        log("\nscoring share of ours (head = StepScorer.update, span = docs/method.md §3 rule bookkeeping, select "
            "phase) and our candidates through the reference's scoring path")  # fmt: skip
        log(breakdown_table(pipeline))
        rows += pipeline_rows(pipeline, config, stamp)
    if config.scoring:
        print("score batches", file=sys.stderr, flush=True)
        scoring = bench_scoring(setup, load)
        log("\nscoring alone: ReflectiveModel.score on a batch against one text at a time (ms per whole batch)")
        log(scoring_table(scoring))
        rows += scoring_rows(scoring, config, stamp)
    if config.memory:
        print("scoring memory", file=sys.stderr, flush=True)
        memory = bench_memory(config)
        log(
            f"\nscoring memory, H={config.hidden_size}, fp32. kept: hidden-state bytes kept (analytic). peak: "
            "measured peak of one scoring call above what was allocated before it (torch.profiler CPU allocator "
            "events; '-' = not measured). ours generate: what scoring adds to a generate, independent of T and "
            f"L (one StepScorer.update's measured peak + its buffers for max_think={config.max_think})"
        )
        log(memory_table(memory, config))
        rows += memory_rows(memory, config, stamp)
    share = load.percent()
    if share is not None:
        rows.append(_row("machine_load", 0, config, stamp, "other_processes", "cpu_pct", (share,) * 3))
        log(f"\nother processes used {share:.0f}% of the CPUs while timing")
    if csv_path is not None:
        common.append_csv(csv_path, rows)
        log(f"appended {len(rows)} rows to {csv_path}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="k = 2 and 8, small budgets (about a minute on CPU)")
    parser.add_argument("--ks", type=int, nargs="+", help="k values (default 2 8 32; --quick: 2 8)")
    parser.add_argument("--csv", default=str(common.DEFAULT_CSV), help="CSV to append to (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--max-think", type=int, help="thinking tokens per candidate (default 128; --quick: 64)")
    parser.add_argument("--max-answer", type=int, help="answer tokens (default 32; --quick: 16)")
    parser.add_argument("--layers", type=int, help="decoder layers of the policy (default 4)")
    parser.add_argument("--hidden-size", type=int, help="hidden size of the policy and head (default 256)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt (default 3; --quick: 1)")
    parser.add_argument("--no-memory", action="store_true", help="leave out the scoring-memory part")
    parser.add_argument("--no-scoring", action="store_true", help="leave out the scoring-alone part")
    parser.add_argument("--no-peak", action="store_true", help="leave out the profiled peak memory of each flow")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    config = QUICK if args.quick else Config()
    changes = dict(memory=not args.no_memory, scoring=not args.no_scoring)
    if args.no_peak:
        changes["peak_memory"] = False
    for name, value in (("ks", args.ks), ("max_think", args.max_think), ("max_answer", args.max_answer),
                        ("num_layers", args.layers), ("hidden_size", args.hidden_size)):  # fmt: skip
        if value is not None:
            changes[name] = tuple(value) if name == "ks" else value
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    return replace(config, **changes)


def main(argv=None) -> None:
    args = parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("bench.pipeline times compiled code: unset TRITON_INTERPRET")
    torch.set_num_threads(args.threads)
    run(config_from_args(args), csv_path=args.csv)


if __name__ == "__main__":
    main()
