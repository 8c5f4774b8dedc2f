"""What the synchronous (`engine.py`) and the asynchronous (`async_engine.py`) vLLM engines share: the requests
of a prompt's thinking rows and answers, its candidates from the logits the worker kept, and its result.

`RowRules` is what these functions need to know of the model (tokenizer, marker ids, the EOS ids, H, dtype); the
engines build one at load time. Nothing here talks to vLLM's engine: the callers submit the requests and fetch the
logits, each in its own way (a stepping loop, or asyncio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import sprm_kernels.model.engines.vllm.compat as compat
from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.selection import choose_best, confidence_stops, confidence_threshold, rows_to_prune
from sprm_kernels.model.core.steps import scored_positions
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats, ScoreResult
from sprm_kernels.model.engines.vllm.recorder import EXTRA_FEATURES, EXTRA_KEY
from sprm_kernels.torch_ops import clamped_log_sigmoid


@dataclass(frozen=True)
class RowRules:
    tokenizer: object
    think_start_id: int
    think_end_id: int
    step_token_ids: tuple[int, ...]
    eos_token_ids: tuple[int, ...]
    hidden_size: int
    dtype: str  # the model's dtype name ("float32", "bfloat16", ...): returned features take it


def row_seed(seed: int | None, prompt: int, row: int, k: int, *, answer: bool = False) -> int | None:
    """Each request's own seed: distinct rows sample differently; None stays unseeded."""
    if seed is None:
        return None
    return (seed * 1_000_003 + 2 * (prompt * k + row) + int(answer)) % (2**63)


def think_sampling(rules: RowRules, params: GenerationParams, p: int, j: int, key: str):
    """Row j of prompt p: samples up to `max_think_tokens`, stops at `</think>`, the worker records it under `key`."""
    return compat.sampling_params(
        max_tokens=params.max_think_tokens, temperature=params.temperature, top_p=params.top_p,
        seed=row_seed(params.seed, p, j, params.num_candidates), stop_token_ids=[rules.think_end_id],
        ignore_eos=True, extra_args={EXTRA_KEY: key, EXTRA_FEATURES: params.return_features},
    )  # fmt: skip


def positions_of(rules: RowRules, sequences: list[list[int]]) -> list[list[int]]:
    """docs/method.md §3 on each whole sequence, on the host (the PyTorch route)."""
    return scored_positions(
        sequences, step_token_ids=rules.step_token_ids, think_start_id=rules.think_start_id,
        think_end_id=rules.think_end_id, backend="torch",
    )  # fmt: skip


def score_values(logits: list[float]) -> tuple[float, list[float]]:
    """(score, step probabilities) from the head's logits at the scored positions, in fp32 as `sprm_score`."""
    if not logits:
        return 0.0, []
    z = torch.tensor(logits, dtype=torch.float32)
    return clamped_log_sigmoid(z).mean().exp().item(), torch.sigmoid(z).tolist()


def candidate(rules: RowRules, response: list[int], where: list[int], value: float, probs, features=None):
    """One thinking row as a `Candidate`; `features`: the fetched [n][H] float lists, or None."""
    if features is not None:
        rows = torch.tensor(features, dtype=torch.float32).reshape(len(where), rules.hidden_size)
        features = rows.to(compat.torch_dtype(rules.dtype))
    return Candidate(  # `pruned` set by `Pruning.mark`, `confidence` by `Pruning.attach_confidence`
        token_ids=list(response),
        text=rules.tokenizer.decode(response, skip_special_tokens=False),
        score=value,
        step_scores=probs,
        score_positions=where,
        finished=bool(response) and response[-1] == rules.think_end_id,
        step_features=features,
    )


def candidates_from_logits(rules: RowRules, responses, positions, fetched) -> list[Candidate] | None:
    """A prompt's candidates from the worker's `(logits, rows)` per row, or None when a scored position has no
    logit (a prompt position the prefix cache served: the caller scores those rows by prefill-only requests)."""
    out = []
    for response, where, (values, features) in zip(responses, positions, fetched, strict=True):
        if any(v is None for v in values):
            return None
        value, probs = score_values(values)
        out.append(candidate(rules, response, where, value, probs, features))
    return out


def choose(candidates: list[Candidate]) -> int:
    """`choose_best`: a pruned row never wins while another row was kept."""
    return choose_best([c.score for c in candidates], [c.finished for c in candidates],
                       [c.pruned for c in candidates])  # fmt: skip


# -- pruning (docs/pruning.md) ---------------------------------------------------------------------------------


@dataclass
class StoppedRow:
    """A pruned row in place of its completion: the ids the model read after the prompt, and how many prompt
    tokens the prefix cache served (the first position the worker saw)."""

    token_ids: list[int]
    num_cached_tokens: int


class Pruning:
    """The pruning state of a call's prompts: which rows were stopped, the rungs each prompt passed, and with
    `prune="confidence"` (DeepConf online) each prompt's threshold, set once its warm-up rows are done: the first
    `warmup` rows run first, to the end; the others start then and stop when their confidence falls below it."""

    def __init__(self, params: GenerationParams, prompts: int):
        self.params = params
        k = params.num_candidates
        self.pruned = [[False] * k for _ in range(prompts)]
        self.rungs = [0] * prompts
        self.confidence = params.prune == "confidence"
        self.warmup = min(k, params.confidence_warmup) if self.confidence else k  # rows submitted first
        self.thresholds: list[float | None] = [None] * prompts
        self.keeps_confidence = self.confidence or params.return_confidence  # the worker computes it

    def attach_confidence(self, candidates: list[Candidate], keys: list[str], states: dict) -> None:
        """`Candidate.confidence`: the row's lowest window confidence (`return_confidence`), None without one."""
        for c, key in zip(candidates, keys, strict=True):
            c.confidence = states[key][1] if key in states else None

    @property
    def on(self) -> bool:
        return self.params.prune != "none"

    def set_threshold(self, p: int, keys: list[str], states: dict) -> None:
        """From the worker's `confidence` answer for the prompt's warm-up rows."""
        lowest = [states[key][1] for key in keys[: self.warmup] if key in states]
        self.thresholds[p] = confidence_threshold(lowest, self.params.confidence_percentile)

    def decide_by_confidence(self, p: int, keys: list[str], running: list[bool], states: dict) -> list[int]:
        if self.thresholds[p] is None:
            return []
        lowest = [states.get(key, (0.0, math.inf, 0))[1] for key in keys]
        totals = [states.get(key, (0.0, 0.0, 0))[2] for key in keys]
        rows = [j for j in range(self.warmup, len(keys)) if not self.pruned[p][j]]
        stop = confidence_stops(lowest, totals, running, rows, threshold=self.thresholds[p],
                                window=self.params.confidence_window)  # fmt: skip
        for j in stop:
            self.pruned[p][j] = True
        return stop

    def decide(self, p: int, keys: list[str], running: list[bool], states: dict) -> list[int]:
        """Rows of prompt p to stop now; `states`: the worker's `running` answer for (some of) `keys`."""
        means, counts = [], []
        for key in keys:
            total, count = states.get(key, (0.0, 0, 0, 0))[:2]
            means.append(total / count if count else -math.inf)
            counts.append(count)
        params = self.params
        stop, self.rungs[p] = rows_to_prune(
            params.prune, means, counts, running, self.pruned[p], margin=params.prune_margin,
            every=params.prune_every, keep=params.prune_keep, rungs=self.rungs[p],
        )  # fmt: skip
        for j in stop:
            self.pruned[p][j] = True
        return stop

    def mark(self, p: int, candidates: list[Candidate]) -> None:
        for c, pruned in zip(candidates, self.pruned[p], strict=True):
            c.pruned = pruned


def answer_requests(rules: RowRules, params: GenerationParams, p: int, prompt, candidates, best: int) -> list:
    """(row, (ids, SamplingParams)) of each answer of prompt p to write: the chosen row's, or every row's with
    answer_all. The ids are prompt + thinking (+ `</think>` for an unfinished row): the prefix cache serves them."""
    if params.max_answer_tokens == 0:
        return []
    requests = []
    for j, c in enumerate(candidates):
        if not (params.answer_all or j == best):
            continue
        ids = list(prompt) + c.token_ids + ([] if c.finished else [rules.think_end_id])
        sampling = compat.sampling_params(
            max_tokens=params.max_answer_tokens, temperature=params.answer_sampling_temperature,
            top_p=params.top_p, seed=row_seed(params.seed, p, j, params.num_candidates, answer=True),
            stop_token_ids=list(rules.eos_token_ids),
        )  # fmt: skip
        requests.append((j, (ids, sampling)))
    return requests


def result_of(rules: RowRules, params, prompt, thinks, candidates, best, answers: dict, seconds) -> GenerationResult:
    """The prompt's `GenerationResult`. thinks: the k thinking completions (with `num_cached_tokens`); answers:
    row -> answer completion."""
    answer_fed = answer_cached = 0
    for j, c in enumerate(candidates):
        out = answers.get(j)
        ids = [] if out is None else list(out.token_ids)
        if out is not None:
            fed = len(prompt) + len(c.token_ids) + (0 if c.finished else 1)
            answer_fed += fed - out.num_cached_tokens + max(len(ids) - 1, 0)
            answer_cached += out.num_cached_tokens
        if params.answer_all:
            c.answer_token_ids = ids
            c.answer = rules.tokenizer.decode(ids, skip_special_tokens=True)
    chosen = answers.get(best)
    chosen_ids = [] if chosen is None else list(chosen.token_ids)
    kept = [len(c.token_ids) for c in candidates if not c.pruned]
    stats = GenerationStats(
        prefill_tokens=sum(len(prompt) - o.num_cached_tokens for o in thinks),
        # A row's last token is sampled, never fed, except a pruned row's: its tokens are those the model read.
        think_decode_tokens=sum(len(c.token_ids) if c.pruned else max(len(c.token_ids) - 1, 0) for c in candidates),
        think_generated_tokens=sum(len(c.token_ids) for c in candidates),
        answer_decode_tokens=answer_fed,
        seconds=dict(seconds),
        answer_cached_tokens=answer_cached,
    )
    # What pruning saved, estimated: each pruned row would have written as many tokens as the kept rows on average.
    stats.pruned_rows = len(candidates) - len(kept)
    stats.pruned_think_tokens = sum(
        max(0, round(sum(kept) / len(kept)) - len(c.token_ids)) for c in candidates if c.pruned and kept
    )
    return generation_result(rules, prompt, candidates, best, chosen_ids, stats)


def generation_result(rules: RowRules, prompt, candidates, best: int, answer_ids: list[int], stats) -> GenerationResult:
    """A prompt's `GenerationResult`, its answer decoded without special tokens."""
    return GenerationResult(
        candidates=candidates,
        best=best,
        answer=rules.tokenizer.decode(answer_ids, skip_special_tokens=True),
        answer_token_ids=answer_ids,
        prompt_token_ids=list(prompt),
        stats=stats,
    )


def score_request(sequence: list[int], key: str):
    """A prefill-only request (one token decoded) whose every position goes through the model: the prefix cache is
    not read, so the worker records a logit at each position."""
    sampling = compat.sampling_params(
        max_tokens=1, temperature=0.0, extra_args={EXTRA_KEY: key}, skip_prefix_cache=True
    )
    return list(sequence), sampling


def score_results(sequences, todo: list[int], positions, fetched, return_all_scores: bool) -> list[ScoreResult]:
    """`ScoreResult`s of all `sequences`; `todo`: the non-empty ones, with their positions and `(logits, rows)`."""
    results = [ScoreResult(0.0, [] if return_all_scores else None, list(s), []) for s in sequences]
    for i, wanted, (values, _) in zip(todo, positions, fetched, strict=True):
        if any(v is None for v in values):
            raise RuntimeError(f"sprm: the worker has no step logit for some positions of sequence {i}")
        value, probs = score_values(values)
        results[i] = ScoreResult(value, probs if return_all_scores else None, list(sequences[i]), wanted)
    return results
