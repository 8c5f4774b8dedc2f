"""The public reference flow of best-of-k SPRM selection, the pipeline benchmark's baseline (docs/method.md §1-5).

1. generation: k complete responses (thinking and answer) sampled with HF `generate` from the prompt expanded
   to k rows (`num_return_sequences=k`), each row running until EOS or the token budget;
2. scoring: one forward per response (prompt + response) with `output_hidden_states=True`, the step mask of
   docs/method.md §3, the head on `hidden_states[-2]` at the masked positions, the geometric mean of the probabilities;
3. select: the argmax of the k scores (ties: the lowest index).

Where the public code is unknown or costlier, this baseline takes the cheaper choice: the scoring forwards pass
`use_cache=False` (no KV cache is built) and the head runs on the gathered step rows only (not on every position).
The generation passes an explicit attention mask of ones, so that HF never infers one from the pad id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sprm_kernels.model import SPRMHead, chat_prompt_ids, step_token_ids, think_marker_ids

PROB_EPS = 1e-10  # docs/method.md §4: probabilities are clamped below at 1e-10 before the log


@dataclass(frozen=True)
class StepRule:
    """The token ids the docs/method.md §3 mask needs."""

    step_ids: tuple[int, ...]
    think_start_id: int
    think_end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, lang: str = "en") -> StepRule:
        start, end = think_marker_ids(tokenizer)
        return cls(tuple(step_token_ids(tokenizer, lang)), start, end)


@dataclass
class ReferenceStats:
    generation_prefill_tokens: int  # k * prompt: generate expands the prompt to k rows before its prefill
    generation_decode_tokens: int  # rows fed to decode forwards: k per step, finished rows fed padding
    generated_tokens: int  # response tokens the k rows actually wrote (EOS included)
    scoring_tokens: int  # tokens through the k scoring forwards (prompt + response each)
    seconds: dict[str, float] = field(default_factory=dict)  # generation, scoring, select

    @property
    def total_tokens(self) -> int:
        return self.generation_prefill_tokens + self.generation_decode_tokens + self.scoring_tokens


@dataclass
class ReferenceResult:
    prompt_token_ids: list[int]
    responses: list[list[int]]  # thinking and answer of each row, up to and including its EOS
    scores: list[float]
    best: int
    stats: ReferenceStats


def step_mask(input_ids: torch.Tensor, rule: StepRule) -> torch.Tensor:
    """[T] bool: position t is scored iff x[t+1] is a step token, x[t] is not, x[t] is not `<think>`, and
    start < t < end (start / end: the single `<think>` / `</think>`, else 0 / T). docs/method.md §3, vectorised."""
    length = input_ids.shape[0]
    is_step = torch.isin(input_ids, torch.tensor(rule.step_ids, device=input_ids.device))
    mask = torch.zeros(length, dtype=torch.bool, device=input_ids.device)
    mask[:-1] = is_step[1:] & ~is_step[:-1] & (input_ids[:-1] != rule.think_start_id)
    starts = (input_ids == rule.think_start_id).nonzero().flatten().tolist()
    ends = (input_ids == rule.think_end_id).nonzero().flatten().tolist()
    start = starts[0] if len(starts) == 1 else 0
    end = ends[0] if len(ends) == 1 else length
    positions = torch.arange(length, device=input_ids.device)
    return mask & (positions > start) & (positions < end)


@torch.inference_mode()
def score_sequence(model: nn.Module, head: SPRMHead, token_ids: Sequence[int], rule: StepRule) -> float:
    """One scoring forward with every hidden state kept; the head on `hidden_states[-2]` at the step positions;
    the geometric mean of the probabilities (0 without a scored position)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(token_ids)], device=device)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True,
                use_cache=False)  # fmt: skip
    rows = out.hidden_states[-2][0][step_mask(input_ids[0], rule)]
    if rows.shape[0] == 0:
        return 0.0
    probs = torch.sigmoid(head(rows).squeeze(-1).float())  # the reference casts the head's output to float
    return torch.log(torch.clamp(probs, min=PROB_EPS)).mean().exp().item()


def argmax(scores: Sequence[float]) -> int:
    """Index of the highest score, the lowest on ties; NaN ranks below every score."""
    return max(range(len(scores)), key=lambda j: (-math.inf if math.isnan(scores[j]) else scores[j], -j))


@torch.inference_mode()
def reference_generate(
    model: nn.Module,
    tokenizer,
    head: SPRMHead,
    prompt: str,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    rule: StepRule | None = None,
) -> ReferenceResult:
    """Best-of-k the reference way: k full responses, k scoring forwards, argmax (phases timed)."""
    rule = rule or StepRule.from_tokenizer(tokenizer)
    device = next(model.parameters()).device
    eos_ids = sorted({tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    seconds = {}
    start = time.perf_counter()
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    input_ids = torch.tensor([prompt_ids], device=device)
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=temperature,
        top_p=top_p, top_k=0, num_return_sequences=k, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )  # fmt: skip
    new_tokens = output.shape[1] - len(prompt_ids)
    responses = [_until_eos(row, eos_ids) for row in output[:, len(prompt_ids) :].tolist()]
    seconds["generation"] = _lap(start)

    start = time.perf_counter()
    scores = [score_sequence(model, head, prompt_ids + response, rule) for response in responses]
    seconds["scoring"] = _lap(start)

    start = time.perf_counter()
    best = argmax(scores)
    seconds["select"] = _lap(start)
    stats = ReferenceStats(
        generation_prefill_tokens=k * len(prompt_ids),
        generation_decode_tokens=k * max(new_tokens - 1, 0),
        generated_tokens=sum(len(r) for r in responses),
        scoring_tokens=sum(len(prompt_ids) + len(r) for r in responses),
        seconds=seconds,
    )
    return ReferenceResult(prompt_ids, responses, scores, best, stats)


def _until_eos(row: list[int], eos_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _lap(start: float) -> float:
    return time.perf_counter() - start
