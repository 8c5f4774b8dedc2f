"""Step-level search guided by the streaming step scores: beam search and DVTS on the HF engine, with KV forking.

Rows decode in one batch until each writes a scored step token (or `</think>`, or reaches the budget): a *round*.
At the end of a round every partial trajectory has a running score (`aggregate`: "mean" = the geometric mean of its
step probabilities so far, as in the final score; "last" = its last step's probability; "min" = its lowest), which
the forward that wrote each step already computed (`StepScorer`): no prefix is ever re-read. Then

- beam: the best `beam_width` partials over the whole batch survive, each forked into `expansions` children;
- DVTS (diverse verifier tree search): the batch holds `beam_width` independent subtrees; in each, the best partial
  survives and is forked into `expansions` children (greedy on the score within its subtree: diversity).

Forking selects KV rows (`index_select` on the batch dimension), never re-prefills: the survivors' step tokens are
fed once, then their rows are repeated. Rows that close their thinking or reach `max_think_tokens` wait as finished
beams; beam search stops once `beam_width` beams have finished, DVTS once every subtree has one (or nothing is left
to expand). The choice and the answer pass are `generate`'s: finished first, then the final score (docs/method.md
§4); the answer continues from the chosen row's own KV cache.

A row that reaches its boundary before the others waits: it takes masked padding (attention mask 0) until the round
ends, so its KV holds holes that attention never sees; positions are explicit, so its tokens get the positions they
would have without the holes, and its KV is compacted before the answer.

The search is a strategy over the engine's public step API (`ReflectiveModel.capture_penultimate`, `new_cache`,
`forward_cached`, `prompt_step_probs`, `scored_positions`, `answer_candidate`); the streaming rule is `core.steps`,
the survivor rule `core.selection.search_survivors`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sprm_kernels import StepScorer, resolve_backend
from sprm_kernels.model.core.params import GenerationParams, SearchParams, search_options
from sprm_kernels.model.core.progress import progress_bar
from sprm_kernels.model.core.sampling import sample_tokens
from sprm_kernels.model.core.selection import choose_best, geometric_mean, search_survivors
from sprm_kernels.model.core.steps import ThinkSpan, could_score
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats
from sprm_kernels.model.engines.hf.compat import compact_row
from sprm_kernels.reference import PROB_EPS


class SearchRows:
    """Per-row state of the search batch, all tensors with the batch first; `select` forks or prunes rows.

    `rm` is the engine (`ReflectiveModel`); `logits` [rows, V] and `hidden` [rows, H] are of each row's last fed
    position; `cache` holds the rows' KV (None in unit tests that never forward)."""

    BATCHED = ("tokens", "step_probs", "lengths", "mask", "previous", "sum_log", "count", "last", "lowest", "subtree",
               "logits", "hidden")  # fmt: skip

    def __init__(self, rm, prompt_ids: list[int], rows: int, max_think: int, cache, logits, hidden):
        device = rm.device
        self.cache = cache
        self.tokens = torch.full((rows, max_think), rm.pad_token_id, dtype=torch.long, device=device)
        self.step_probs = torch.zeros((rows, max_think), dtype=torch.float32, device=device)  # of token i's state
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # thinking tokens written
        self.mask = torch.ones((rows, len(prompt_ids)), dtype=torch.long, device=device)  # attention mask of the KV
        self.previous = torch.full((rows,), prompt_ids[-1], dtype=torch.long, device=device)
        self.sum_log = torch.zeros(rows, dtype=torch.float32, device=device)  # running sum of log p of steps
        self.count = torch.zeros(rows, dtype=torch.long, device=device)
        self.last = torch.zeros(rows, dtype=torch.float32, device=device)  # last step probability
        self.lowest = torch.ones(rows, dtype=torch.float32, device=device)
        self.subtree = torch.zeros(rows, dtype=torch.long, device=device)
        self.logits, self.hidden = logits, hidden  # of each row's last fed position
        self.span = ThinkSpan(prompt_ids, rows, rm.think_start_id, rm.think_end_id, device)  # rule 4 so far

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index`, in that order; a repeated index forks a row (its KV, history and running score)."""
        for name in self.BATCHED:
            setattr(self, name, getattr(self, name)[index])
        self.span.select(index)
        self.cache.batch_select_indices(index)

    def running_score(self, how: str) -> torch.Tensor:
        """Each partial trajectory's score so far (0 before its first scored step, as a final score would be)."""
        if how == "mean":
            value = torch.exp(self.sum_log / self.count.clamp(min=1))
        else:
            value = self.last if how == "last" else self.lowest
        return torch.where(self.count > 0, value, torch.zeros_like(value))


@dataclass
class FinishedBeam:
    """A row that closed its thinking or reached the budget: a candidate, waiting for the choice."""

    token_ids: list[int]
    step_probs: list[float]
    closed: bool
    cache: object  # one row, compacted, every token but the last fed


class StepSearch:
    """One search's rounds on `rm` (a `ReflectiveModel`, through its public step API): decoding to the next step
    boundary, choosing survivors (`selection.search_survivors`), finishing beams."""

    def __init__(self, rm, prompt_ids, shape: SearchParams, params: GenerationParams, backend, sample):
        self.rm, self.prompt_ids, self.shape, self.params, self.sample = rm, prompt_ids, shape, params, sample
        self.width = params.num_candidates
        self.step_ids = torch.tensor(rm.step_token_ids, device=rm.device)
        self.scorer = StepScorer(*rm.head.kernel_weights(), batch_size=self.width, backend=backend)
        self.sampled = self.fed = self.padded = 0
        self.forward_seconds = 0.0

    def forward(self, rows: SearchRows, token: torch.Tensor, real: torch.Tensor, captured) -> None:
        """Feed one token per row (`real` rows; the others get masked padding) and keep the real rows' logits and
        layer L-2 states. Positions are explicit: a real token's position is its row's real length so far."""
        rm = self.rm
        rows.mask = torch.cat([rows.mask, real.long()[:, None]], dim=1)
        position = (len(self.prompt_ids) + rows.lengths - 1)[:, None]
        start = time.perf_counter()
        input_ids = torch.where(real, token, rm.pad_token_id)[:, None]
        out = rm.forward_cached(input_ids, rows.cache, attention_mask=rows.mask, position_ids=position)
        self.forward_seconds += time.perf_counter() - start
        rows.logits = torch.where(real[:, None], out.logits[:, -1].float(), rows.logits.float())
        rows.hidden = torch.where(real[:, None], captured["features"][:, -1], rows.hidden)
        fed = int(real.sum())
        self.fed, self.padded = self.fed + fed, self.padded + len(rows) - fed

    def decode_round(self, rows: SearchRows, captured) -> None:
        """Decode every row until it writes a scored step token, `</think>`, or reaches the budget. A row's last
        token (the one that ended its round) is left unfed."""
        rm, device = self.rm, self.rm.device
        prompt_len, max_think = len(self.prompt_ids), self.params.max_think_tokens
        waiting = torch.zeros(len(rows), dtype=torch.bool, device=device)
        features = torch.zeros((self.width, rows.hidden.shape[-1]), dtype=rows.hidden.dtype, device=device)
        flags = torch.zeros(self.width, dtype=torch.bool, device=device)
        while True:
            writing = ~waiting
            token = torch.full((len(rows),), rm.pad_token_id, dtype=torch.long, device=device)
            token[writing] = self.sample(rows.logits[writing])
            self.sampled += int(writing.sum())
            position = prompt_len + rows.lengths - 1  # the state that predicted `token`
            scorable = could_score(token, rows.previous, writing, self.step_ids, rm.think_start_id)  # rules 1-3
            is_step = scorable & rows.span.contains(position)  # rule 4, with the markers written so far
            features.zero_()
            features[: len(rows)] = rows.hidden
            flags.zero_()
            flags[: len(rows)] = scorable
            # The head runs for rows where rules 1-3 hold (the only positions a final rule can score, even when a
            # later marker moves the span); the scorer's own sums are not used (forks reorder rows).
            prob = self.scorer.update(features, flags, want_prob=flags)[: len(rows)]
            index = rows.lengths.clamp(max=max_think - 1)[:, None]
            _write_at(rows.step_probs, index, prob, writing)
            _write_at(rows.tokens, index, token, writing)
            log_p = prob.clamp(min=PROB_EPS).log()
            rows.sum_log = torch.where(is_step, rows.sum_log + log_p, rows.sum_log)
            rows.count = rows.count + is_step
            rows.last = torch.where(is_step, prob, rows.last)
            rows.lowest = torch.where(is_step, torch.minimum(rows.lowest, prob), rows.lowest)
            rows.span.observe(token, position + 1, writing)
            rows.lengths = rows.lengths + writing
            rows.previous = torch.where(writing, token, rows.previous)
            boundary = writing & (is_step | (token == rm.think_end_id) | (rows.lengths >= max_think))
            waiting |= boundary
            if bool(waiting.all()):  # the one host synchronisation of a decode step
                return
            self.forward(rows, token, writing & ~boundary, captured)

    def survivors(self, rows: SearchRows, alive: torch.Tensor) -> torch.Tensor:
        """[survivors] long: beam, the best `beam_width` alive rows; DVTS, the best alive row of each subtree, by
        the running score (`aggregate`). NaN ranks lowest, ties go to the lowest index (`alive` [n] long)."""
        kept = search_survivors(
            rows.running_score(self.shape.aggregate).tolist(), alive.tolist(), rows.subtree.tolist(),
            method=self.shape.method, beam_width=self.shape.beam_width,
        )  # fmt: skip
        return torch.tensor(kept, dtype=torch.long, device=self.rm.device)

    def finish(self, rows: SearchRows, row: int) -> FinishedBeam:
        """Row `row` as a finished beam, its KV compacted to one row without the waiting holes."""
        length = int(rows.lengths[row])
        keep = rows.mask[row].nonzero().flatten()
        return FinishedBeam(
            token_ids=rows.tokens[row, :length].tolist(),
            step_probs=rows.step_probs[row, :length].tolist(),
            closed=int(rows.tokens[row, length - 1]) == self.rm.think_end_id,
            cache=compact_row(rows.cache, row, keep),
        )


@torch.inference_mode()
def search(
    rm, prompt_or_messages, *, backend: str | None = None, progress: bool = False, **options
) -> GenerationResult:
    """Beam search or DVTS over thinking steps (module docstring). The same result type as `generate`: the
    candidates are the finished beams; `stats.think_generated_tokens` counts every thinking token sampled, pruned
    rows included, and `stats.seconds["forward"]` the time spent in the model's forwards. `progress` shows a bar
    of the search's rounds (one per step) on stderr. `options`: the fields of `SearchParams` (method, beam_width,
    expansions, aggregate) and the sampling fields of `GenerationParams` (`core.params.SEARCH_SAMPLING_OPTIONS`),
    with their defaults."""
    shape, params = search_options(options)
    backend = rm.backend if backend is None else backend
    resolve_backend(rm.device, backend)
    prompt_ids = rm.prompt_ids(prompt_or_messages)
    generator = None if params.seed is None else torch.Generator(device=rm.device).manual_seed(params.seed)

    def sample(logits, temperature=params.temperature):
        return sample_tokens(logits, temperature=temperature, top_p=params.top_p, generator=generator)

    def sample_answer(logits):
        return sample(logits, params.answer_sampling_temperature)

    run = StepSearch(rm, prompt_ids, shape, params, backend, sample)
    start = time.perf_counter()
    finished: list[FinishedBeam] = []
    with rm.capture_penultimate() as captured:
        cache = rm.new_cache()
        out = rm.forward_cached(torch.tensor([prompt_ids], device=rm.device), cache)
        features = captured["features"][0]
        prompt_step_probs = rm.prompt_step_probs(prompt_ids, features, backend)
        cache.batch_repeat_interleave(run.width)
        rows = SearchRows(rm, prompt_ids, run.width, params.max_think_tokens, cache,
                     out.logits[:, -1].float().expand(run.width, -1), features[-1].expand(run.width, -1))  # fmt: skip
        rows.subtree = torch.arange(run.width, device=rm.device) // shape.expansions  # DVTS: its first children
        run.forward_seconds += time.perf_counter() - start
        done_trees: set[int] = set()
        rounds = 0
        bar = progress_bar(None, f"{shape.method} search", progress, leave=False)
        while len(rows):
            run.decode_round(rows, captured)
            rounds += 1
            if bar is not None:
                bar.update(1)
            ends = rows.tokens.gather(1, (rows.lengths - 1)[:, None])[:, 0]
            terminal = (ends == rm.think_end_id) | (rows.lengths >= params.max_think_tokens)
            for row in terminal.nonzero().flatten().tolist():
                finished.append(run.finish(rows, row))
                done_trees.add(int(rows.subtree[row]))
            if shape.method == "beam" and len(finished) >= shape.beam_width:
                break
            alive = [r for r in (~terminal).nonzero().flatten().tolist()
                     if shape.method == "beam" or int(rows.subtree[r]) not in done_trees]  # fmt: skip
            if not alive:
                break
            rows.select(run.survivors(rows, torch.tensor(alive, device=rm.device)))
            ones = torch.ones(len(rows), dtype=torch.bool, device=rm.device)
            run.forward(rows, rows.tokens.gather(1, (rows.lengths - 1)[:, None])[:, 0], ones, captured)
            rows.select(torch.arange(len(rows), device=rm.device).repeat_interleave(shape.expansions))
    think_seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    candidates = [_candidate(rm, prompt_ids, f, prompt_step_probs, backend) for f in finished]
    best = choose_best([c.score for c in candidates], [c.finished for c in candidates])
    answer_start = time.perf_counter()
    answer_ids, answer_fed = rm.answer_candidate(finished[best].cache, 0, prompt_ids, candidates[best],
                                                 params.max_answer_tokens, sample_answer)  # fmt: skip
    answer_seconds = time.perf_counter() - answer_start
    stats = GenerationStats(
        prefill_tokens=len(prompt_ids),
        think_decode_tokens=run.fed,
        think_generated_tokens=run.sampled,
        answer_decode_tokens=answer_fed,
        seconds={"think": think_seconds, "answer": answer_seconds, "forward": run.forward_seconds},
        padded_decode_tokens=run.padded,
        rounds=rounds,
    )
    return GenerationResult(
        candidates=candidates,
        best=best,
        answer=rm.tokenizer.decode(answer_ids, skip_special_tokens=True),
        answer_token_ids=answer_ids,
        prompt_token_ids=prompt_ids,
        stats=stats,
    )


def _write_at(history: torch.Tensor, index: torch.Tensor, value: torch.Tensor, where: torch.Tensor) -> None:
    """history[r, index[r]] = value[r] for the rows in `where` (the others keep what they had)."""
    kept = history.gather(1, index)[:, 0]
    history.scatter_(1, index, torch.where(where, value, kept)[:, None])


def _candidate(rm, prompt_ids, finished: FinishedBeam, prompt_step_probs, backend) -> Candidate:
    """A finished beam as `generate` reports a candidate: positions by the exact rule on its final ids, the step
    probabilities its decoding computed (prompt positions from the prefill), their geometric mean."""
    prompt_len = len(prompt_ids)
    positions = rm.scored_positions([prompt_ids + finished.token_ids], backend)[0]
    probs = [prompt_step_probs[t] if t < prompt_len - 1 else finished.step_probs[t - prompt_len + 1] for t in positions]
    return Candidate(
        token_ids=finished.token_ids,
        text=rm.tokenizer.decode(finished.token_ids, skip_special_tokens=False),
        score=geometric_mean(probs),
        step_scores=probs,
        score_positions=positions,
        finished=finished.closed,
    )
