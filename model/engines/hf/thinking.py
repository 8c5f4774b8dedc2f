"""The thinking loop of best-of-k on the HF engine: k rows decoded in lockstep, each step scored as it is produced
(docs/method.md §3, streaming), and the per-row candidates built from it (§3 recomputed on the final ids, §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sprm_kernels import StepScorer
from sprm_kernels.model.core.progress import progress_bar
from sprm_kernels.model.core.selection import geometric_mean
from sprm_kernels.model.core.steps import ThinkSpan, could_score
from sprm_kernels.model.core.types import Candidate
from sprm_kernels.model.engines.hf.compat import take_rows


@dataclass
class Thinking:
    """What the thinking loop produced, by candidate j < k (row j of the tensors)."""

    tokens: torch.Tensor  # [k, max_think] long: sampled ids (padding after a row stops)
    step_probs: torch.Tensor  # [k, max_think] fp32: probability of the state that predicted token i
    flagged: torch.Tensor  # [k, max_think] bool: whether that state was scored while streaming
    lengths: torch.Tensor  # [k] long: tokens each row wrote
    closed: torch.Tensor  # [k] bool: the row wrote </think>
    scorer: StepScorer
    cache: object  # the KV of the rows still in the batch when decoding stopped
    rows: list[int]  # the candidate of each row of `cache`
    closed_caches: dict[int, object] = field(default_factory=dict)  # one-row KV of each row that left the batch
    decode_tokens: int = 0  # rows through the model in decode forwards
    features: list[dict[int, torch.Tensor]] | None = None  # per candidate: position -> [H] layer L-2 row
    no_features: torch.Tensor | None = None  # [0, H]: the rows of a candidate without scored positions

    def record_features(self, position: int, features: torch.Tensor, could_score: torch.Tensor) -> None:
        """Keep the rows of `features` [k, H] (position `position` of each candidate) where `could_score` [k]."""
        candidates = could_score.nonzero().flatten().tolist()
        if candidates:
            rows = features[candidates]  # a copy: `features` is overwritten by the next step
            for candidate, state in zip(candidates, rows, strict=True):
                self.features[candidate][position] = state

    def features_at(self, candidate: int, positions: list[int]) -> torch.Tensor:
        """[len(positions), H]: the recorded rows at a candidate's final scored positions."""
        if not positions:
            return self.no_features
        return torch.stack([self.features[candidate][t] for t in positions])

    def copy_cache(self, candidate: int) -> tuple[object, int]:
        """(cache, row) holding `candidate`'s KV, releasing nothing: the one-row cache of a row that left the batch
        (nobody else uses it), else a copy of its row of the batch cache."""
        if candidate in self.closed_caches:
            return self.closed_caches[candidate], 0
        return take_rows(self.cache, [self.rows.index(candidate)]), 0

    def take_cache(self, candidate: int) -> tuple[object, int]:
        """(cache, row) holding `candidate`'s KV; every other cache is released."""
        if candidate in self.closed_caches:
            found = self.closed_caches[candidate], 0
        else:
            found = self.cache, self.rows.index(candidate)
        self.cache, self.closed_caches = None, {}
        return found


def decode_thinking(
    rm, cache, logits, hidden, prompt_ids, k, max_think_tokens, sample, captured, backend, progress,
    prompt_features=None,
) -> Thinking:  # fmt: skip
    """Sample k rows of `rm` (a `ReflectiveModel`) in lockstep from the prefill's `cache` (k rows), `logits` [k, V]
    and `hidden` [k, H] (the last prompt position). At step i every live row samples its token x[t+1]
    (t = len(prompt_ids) - 1 + i) from the logits of position t, whose layer L-2 state came from the same forward
    (`captured`, from `rm.capture_penultimate`): when x[t+1] is a step token and the rule holds so far, that state
    is scored (the shift of docs/method.md §3). With `prompt_features` (the prefill's rows, by position), the states
    at every position where rules 1-3 hold are kept too: rule 4 can still change when a later marker moves the span.

    A row that closes its thinking leaves the batch with its KV rows moved to a cache of its own (needed only
    if it is chosen), so that later forwards process live rows only. The scorer keeps a fixed [k, H] shape."""
    device = rm.device
    step_ids = torch.tensor(rm.step_token_ids, device=device)
    scorer = StepScorer(*rm.head.kernel_weights(), batch_size=k, backend=backend)
    think = Thinking(
        tokens=torch.full((k, max_think_tokens), rm.pad_token_id, dtype=torch.long, device=device),
        step_probs=torch.zeros((k, max_think_tokens), dtype=torch.float32, device=device),
        flagged=torch.zeros((k, max_think_tokens), dtype=torch.bool, device=device),
        lengths=torch.zeros(k, dtype=torch.long, device=device),
        closed=torch.zeros(k, dtype=torch.bool, device=device),
        scorer=scorer,
        cache=cache,
        rows=list(range(k)),
        features=None if prompt_features is None else [dict(prompt_features) for _ in range(k)],
        no_features=hidden.new_empty((0, hidden.shape[-1])),
    )
    rows = torch.arange(k, device=device)  # the candidate of each row of `cache`
    features = torch.zeros((k, hidden.shape[-1]), dtype=hidden.dtype, device=device)  # rows of all k candidates
    span = ThinkSpan(prompt_ids, k, rm.think_start_id, rm.think_end_id, device)
    previous = torch.full((k,), prompt_ids[-1], dtype=torch.long, device=device)
    live = torch.ones(k, dtype=torch.bool, device=device)
    bar = progress_bar(max_think_tokens, f"thinking (k={k})", progress, leave=False)
    for i in range(max_think_tokens):
        position = len(prompt_ids) - 1 + i  # predicts the token sampled now
        token = torch.full((k,), rm.pad_token_id, dtype=torch.long, device=device)
        token[rows] = sample(logits)
        features[rows] = hidden
        scorable = could_score(token, previous, live, step_ids, rm.think_start_id)  # rules 1-3
        is_step = scorable & span.contains(position)  # rule 4, with the markers written so far
        if think.features is not None:
            think.record_features(position, features, scorable)
        # Only rows where rules 1-3 hold need a probability (the exact positions are among them): a step with
        # no such row skips the head (no W1 traffic); the others read NaN, never used.
        think.step_probs[:, i] = scorer.update(features, is_step, want_prob=scorable)
        think.flagged[:, i] = is_step
        think.tokens[:, i] = token
        think.lengths += live
        span.observe(token, position + 1, live)
        think.closed |= live & (token == rm.think_end_id)
        live &= token != rm.think_end_id
        previous = token
        if bar is not None:
            bar.update(1)
        still_live = live[rows].tolist()  # the one host synchronisation of a step
        if i + 1 == max_think_tokens or not any(still_live):
            break
        if not all(still_live):
            for row, candidate in enumerate(think.rows):
                if not still_live[row]:
                    think.closed_caches[candidate] = take_rows(cache, [row])
            keep = [row for row, alive in enumerate(still_live) if alive]
            cache.batch_select_indices(torch.tensor(keep, device=device))
            think.rows = [think.rows[row] for row in keep]
            rows = torch.tensor(think.rows, device=device)
        out = rm.forward_cached(token[rows][:, None], cache)
        think.decode_tokens += len(think.rows)
        logits, hidden = out.logits[:, -1], captured["features"][:, -1]
    if bar is not None:
        bar.close()
    return think


def finalize_candidates(rm, prompt_ids, think: Thinking, prompt_step_probs, backend) -> list[Candidate]:
    """Per-row results. The scored positions are recomputed by docs/method.md §3 on each final sequence; they
    match the positions scored while streaming unless a marker written later moved the span (a second `<think>`,
    or markers in the prompt), and then the score is recomputed from the recorded step probabilities. Recorded
    features cover every position where rules 1-3 hold (prompt and thinking): they follow the final positions
    exactly in both cases."""
    prompt_len = len(prompt_ids)
    lengths, closed = think.lengths.tolist(), think.closed.tolist()
    responses = [row[:n] for row, n in zip(think.tokens.tolist(), lengths, strict=True)]
    exact_positions = rm.scored_positions([prompt_ids + r for r in responses], backend)
    running = think.scorer.result().score.tolist()
    step_probs, flagged = think.step_probs.tolist(), think.flagged.tolist()
    candidates = []
    for row, response in enumerate(responses):
        streamed = [prompt_len - 1 + i for i, flag in enumerate(flagged[row]) if flag]
        positions = exact_positions[row]
        probs = [prompt_step_probs[t] if t < prompt_len - 1 else step_probs[row][t - prompt_len + 1] for t in positions]
        score = running[row] if positions == streamed else geometric_mean(probs)
        candidates.append(
            Candidate(
                token_ids=response,
                text=rm.tokenizer.decode(response, skip_special_tokens=False),
                score=score,
                step_scores=probs,
                score_positions=positions,
                finished=bool(closed[row]),
                step_features=None if think.features is None else think.features_at(row, positions),
            )
        )
    return candidates
