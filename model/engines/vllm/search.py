"""Step-level beam search and DVTS on the vLLM engines: the HF engine's `search` (`engines/hf/search.py`), with
vLLM's requests, its prefix cache and the worker's step logits.

A *round* decodes every partial trajectory until it writes a scored step token (docs/method.md §3), `</think>`,
or reaches the budget. On vLLM a row's round is a request: prompt + the row's thinking so far, stopping at a step
token or `</think>` (`stop_token_ids`). A step token that is not scored (a run of step tokens, one right after
`<think>`) does not end the round: the row is submitted again. Each request's step logits are the worker's own
(the forward that read a position computed its head logit; `fetch` reads them once the request is done), so no
prefix is scored again. At the round's end the survivors are chosen as on HF (`core.selection.search_survivors`,
by the running score `aggregate`) and forked: each child is a request with its parent's ids, whose full KV blocks
vLLM's prefix cache serves (only the partial last block, under one block of tokens, goes through the model
again; `stats.prefill_tokens` counts it). Beam search stops once `beam_width` beams have finished, DVTS once
every subtree has one, or when nothing is left to expand; the choice and the answer are `generate`'s.

`RoundSearch` is the search's state and rule, with no I/O: the synchronous engine submits its requests with
`LLM.generate`, the asynchronous one with asyncio (each row's requests as they come), both through
`run_rounds`' two callables.

Exactness: a finished beam's positions are the exact rule on its final ids, and its probabilities the logits the
worker kept at those positions; where one is missing (a prompt position the prefix cache served) the beam is
scored again by a prefill-only request, so every candidate's score equals a plain `score()` of its ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import sprm_kernels.model.engines.vllm.compat as compat
import sprm_kernels.model.engines.vllm.rows as rows_
from sprm_kernels.model.core.params import GenerationParams, SearchParams
from sprm_kernels.model.core.selection import search_survivors
from sprm_kernels.model.core.steps import is_scorable_pair, scored_positions_list
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats
from sprm_kernels.model.engines.vllm.recorder import EXTRA_KEY
from sprm_kernels.reference import LOG_PROB_EPS


@dataclass
class Partial:
    """One partial trajectory: its thinking ids so far and the head logit at each position the worker read."""

    tokens: list[int]
    subtree: int
    logits: dict[int, float] = field(default_factory=dict)  # absolute position -> head logit
    at_boundary: bool = False  # its round is over (a scored step, `</think>`, or the budget)

    def fork(self) -> Partial:
        return replace(self, tokens=list(self.tokens), logits=dict(self.logits), at_boundary=False)


@dataclass
class SearchCounts:
    requests: int = 0
    sampled: int = 0  # thinking tokens sampled, pruned rows included
    decoded: int = 0  # of those, fed back within their request (a request's last token is fed by the next one)
    prefilled: int = 0  # request prompt tokens through the model (the rest the prefix cache served)
    cached: int = 0


class RoundSearch:
    """The search's rounds over `rules` (`rows.RowRules`), for one prompt; `prompt_logits`: head logits at the
    prompt positions a final rule could score (usually none: the prompt precedes `<think>`)."""

    def __init__(self, rules: rows_.RowRules, prompt: list[int], shape: SearchParams, params: GenerationParams,
                 prompt_logits: dict[int, float]):  # fmt: skip
        self.rules, self.prompt, self.shape, self.params = rules, list(prompt), shape, params
        self.prompt_logits = dict(prompt_logits)
        self.step_ids = set(rules.step_token_ids)
        width = shape.beam_width * shape.expansions
        self.rows = [Partial([], subtree=j // shape.expansions) for j in range(width)]  # DVTS: first children
        self.finished: list[Partial] = []
        self.done_trees: set[int] = set()
        self.rounds = 0
        self.counts = SearchCounts()
        self.keys: list[str] = []  # every request key of the async driver (dropped by the caller at the end)

    # -- a round ---------------------------------------------------------------------------------------------

    def pending(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if not row.at_boundary]

    def request(self, i: int, key: str, attempt: int):
        """(ids, SamplingParams) of row i's next request this round; the worker records it under `key`."""
        row, params = self.rows[i], self.params
        sampling = compat.sampling_params(
            max_tokens=params.max_think_tokens - len(row.tokens), temperature=params.temperature,
            top_p=params.top_p, seed=search_seed(params.seed, self.rounds, i, attempt),
            stop_token_ids=[self.rules.think_end_id, *self.rules.step_token_ids], ignore_eos=True,
            extra_args={EXTRA_KEY: key},
        )  # fmt: skip
        return self.prompt + row.tokens, sampling

    def wanted(self, i: int, new_tokens: list[int]) -> list[int]:
        """The positions whose head logit row i's request computed and a final rule could score (rules 1-3): the
        states that predicted each of its new tokens."""
        sequence = self.prompt + self.rows[i].tokens + list(new_tokens)
        first = len(self.prompt) + len(self.rows[i].tokens) - 1
        start_id = self.rules.think_start_id
        return [t for t in range(first, len(sequence) - 1)
                if is_scorable_pair(sequence[t], sequence[t + 1], self.step_ids, start_id)]  # fmt: skip

    def absorb(self, i: int, completion, positions: list[int], logits: list[float | None], fed: int) -> None:
        """Row i's request is done: its new tokens, the logits at `positions` (None: not recorded; the candidate
        is then scored again), and whether its round is over. `fed`: the request's ids."""
        row, counts = self.rows[i], self.counts
        new = list(completion.token_ids)
        counts.requests += 1
        counts.sampled += len(new)
        counts.decoded += max(len(new) - 1, 0)
        counts.prefilled += fed - completion.num_cached_tokens
        counts.cached += completion.num_cached_tokens
        row.tokens += new
        row.logits.update({t: z for t, z in zip(positions, logits, strict=True) if z is not None})
        sequence = self.prompt + row.tokens
        last = len(sequence) - 2  # the state that predicted the last token
        row.at_boundary = (
            not new  # nothing more could be written
            or self.terminal(row)
            or (new[-1] in self.step_ids and last in self.positions(sequence))
        )

    def terminal(self, row: Partial) -> bool:
        return (
            bool(row.tokens)
            and row.tokens[-1] == self.rules.think_end_id
            or (len(row.tokens) >= self.params.max_think_tokens)
        )

    def end_round(self) -> bool:
        """Finished rows become beams; the survivors are chosen and forked. False once the search is over."""
        self.rounds += 1
        ended = [i for i, row in enumerate(self.rows) if self.terminal(row) or not row.tokens]
        for i in ended:
            self.finished.append(self.rows[i])
            self.done_trees.add(self.rows[i].subtree)
        if self.shape.method == "beam" and len(self.finished) >= self.shape.beam_width:
            return False
        alive = [i for i, row in enumerate(self.rows) if i not in ended
                 and (self.shape.method == "beam" or row.subtree not in self.done_trees)]  # fmt: skip
        if not alive:
            return False
        scores = [self.running_score(row) for row in self.rows]
        kept = search_survivors(scores, alive, [row.subtree for row in self.rows], method=self.shape.method,
                                beam_width=self.shape.beam_width)  # fmt: skip
        self.rows = [self.rows[i].fork() for i in kept for _ in range(self.shape.expansions)]
        return True

    # -- scores ----------------------------------------------------------------------------------------------

    def positions(self, sequence: list[int]) -> list[int]:
        """The exact rule (docs/method.md §3) in pure Python: the search reads short partial rows many times."""
        rules = self.rules
        return scored_positions_list(sequence, self.step_ids, rules.think_start_id, rules.think_end_id)

    def probabilities(self, row: Partial) -> tuple[list[int], list[float | None]]:
        """The exact rule on the row's ids so far (an unfinished row's span ends at its length) and the logits
        kept at those positions (None where none was recorded)."""
        positions = self.positions(self.prompt + row.tokens)
        return positions, [row.logits.get(t, self.prompt_logits.get(t)) for t in positions]

    def running_score(self, row: Partial) -> float:
        """As the HF search: "mean" the geometric mean of the step probabilities so far (the final score's
        rule), "last" the last one, "min" the lowest; 0 before the first scored step. In float64 on the host, for
        ranking only (a few floats per row: tensors would cost more than the arithmetic); candidates' scores are
        the fp32 `score_values`."""
        _, logits = self.probabilities(row)
        known = [z for z in logits if z is not None]
        if not known:
            return 0.0
        if self.shape.aggregate == "mean":
            return math.exp(sum(clamped_log_sigmoid(z) for z in known) / len(known))
        probs = [math.exp(clamped_log_sigmoid(z)) for z in known]
        return probs[-1] if self.shape.aggregate == "last" else min(probs)

    def unscored(self) -> list[int]:
        """The finished beams a kept logit is missing for (to score again by prefill-only requests)."""
        return [i for i, row in enumerate(self.finished) if None in self.probabilities(row)[1]]

    def sequences(self, beams: list[int]) -> list[list[int]]:
        return [self.prompt + self.finished[i].tokens for i in beams]

    def candidates(self, rescored: dict | None = None) -> list[Candidate]:
        """The finished beams as `generate`'s candidates; `rescored`: beam -> `ScoreResult` (with all scores) of
        the `unscored` beams."""
        out = []
        for i, row in enumerate(self.finished):
            if rescored and i in rescored:
                s = rescored[i]
                out.append(rows_.candidate(self.rules, row.tokens, s.score_positions, s.value, s.all_scores))
                continue
            positions, logits = self.probabilities(row)
            value, probs = rows_.score_values(logits)
            out.append(rows_.candidate(self.rules, row.tokens, positions, value, probs))
        return out


def clamped_log_sigmoid(z: float) -> float:
    """max(log sigmoid(z), log 1e-10), stable for any |z|; NaN stays NaN (and ranks lowest)."""
    if math.isnan(z):
        return z
    value = -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))
    return max(value, LOG_PROB_EPS)


def search_seed(seed: int | None, round_: int, row: int, attempt: int) -> int | None:
    """Each request's own seed: rows, rounds and re-submissions sample differently; None stays unseeded."""
    if seed is None:
        return None
    return (((seed * 1_000_003 + round_) * 1_000_033 + row) * 101 + attempt) % (2**63)


def search_result(
    search: RoundSearch, candidates: list[Candidate], best: int, answer, seconds: dict
) -> GenerationResult:
    """The search's `GenerationResult`; `answer`: the chosen beam's answer completion (None without one).
    `stats.think_decode_tokens` counts the thinking tokens fed within their requests, `stats.prefill_tokens` the
    request prompt tokens the prefix cache did not serve (each fork's re-read partial block included)."""
    rules, counts, prompt = search.rules, search.counts, search.prompt
    ids = [] if answer is None else list(answer.token_ids)
    answer_fed = answer_cached = 0
    if answer is not None:
        chosen = candidates[best]
        fed = len(prompt) + len(chosen.token_ids) + (0 if chosen.finished else 1)
        answer_fed = fed - answer.num_cached_tokens + max(len(ids) - 1, 0)
        answer_cached = answer.num_cached_tokens
    stats = GenerationStats(
        prefill_tokens=counts.prefilled,
        think_decode_tokens=counts.decoded,
        think_generated_tokens=counts.sampled,
        answer_decode_tokens=answer_fed,
        seconds=dict(seconds),
        rounds=search.rounds,
        answer_cached_tokens=answer_cached,
        think_cached_tokens=counts.cached,
    )
    return rows_.generation_result(rules, prompt, candidates, best, ids, stats)


# -- the drivers: the same rounds, submitted synchronously (LLM.generate) or with asyncio ----------------------


def run_rounds(search: RoundSearch, submit: Callable, fetch: Callable, new_key: Callable[[], str], bar=None) -> None:
    """Every round of `search`: `submit(requests)` runs (ids, SamplingParams) pairs to completion (in order, with
    `num_cached_tokens`), `fetch(wanted)` reads and drops the worker's records ({key: (logits, rows)})."""
    while True:
        attempt = 0
        while pending := search.pending():
            keys = [new_key() for _ in pending]
            search.keys.extend(keys)
            requests = [search.request(i, key, attempt) for i, key in zip(pending, keys, strict=True)]
            outs = submit(requests)
            wanted = {key: search.wanted(i, out.token_ids) for i, key, out in zip(pending, keys, outs, strict=True)}
            logits = fetch(wanted)
            for i, key, out, (ids, _) in zip(pending, keys, outs, requests, strict=True):
                search.absorb(i, out, wanted[key], logits[key][0], len(ids))
            attempt += 1
        more = search.end_round()
        if bar is not None:
            bar.update(1)
        if not more:
            return


async def arun_rounds(search: RoundSearch, submit_one: Callable, fetch: Callable, new_key: Callable[[], str]):
    """`run_rounds` with asyncio: each row's requests go in as soon as its previous one is done (rows of this and
    every other call share the engine's batches); `submit_one(ids, sampling, key)` awaits one completion and
    `fetch(wanted)` awaits the records. Keys whose records may be left (a cancelled request) are in `search.keys`
    for the caller to drop."""
    import asyncio

    async def row(i: int) -> None:
        attempt = 0
        while not search.rows[i].at_boundary:
            key = new_key()
            search.keys.append(key)
            ids, sampling = search.request(i, key, attempt)
            out = await submit_one(ids, sampling, key)
            wanted = search.wanted(i, out.token_ids)
            logits = await fetch({key: wanted})
            search.absorb(i, out, wanted, logits[key][0], len(ids))
            attempt += 1

    while True:
        await asyncio.gather(*(row(i) for i in search.pending()))
        if not search.end_round():
            return
