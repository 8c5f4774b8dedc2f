"""Types shared by every engine (HF, vLLM): `TextPrompt` (a prompt used as written), and what `score` and
`generate` return.

The CLI, the server, the evaluation and the trainer read these and nothing engine-specific.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TextPrompt:
    """A prompt used as written: tokenized as it is (with the tokenizer's special tokens, e.g. a BOS), no chat
    template around it (what `/v1/completions` sends). A plain string prompt is a user message instead."""

    text: str


@dataclass
class ScoreResult:
    """One text's score, with the fields of the reference scoring server's response."""

    value: float  # geometric mean of the step probabilities; 0.0 when no position is scored
    all_scores: list[float] | None  # per-step probabilities (None unless return_all_scores)
    token_ids: list[int]  # the scored sequence
    score_positions: list[int]  # positions t whose hidden state was scored (x[t+1] is the step token)


@dataclass
class Candidate:
    token_ids: list[int]  # the thinking as generated, `</think>` included when the row closed it
    text: str  # decoded with special tokens kept, so the markers stay visible
    score: float  # SPRM score of prompt + token_ids, as `score()` gives it
    step_scores: list[float]  # probability of each scored step
    score_positions: list[int]  # scored positions in prompt + token_ids
    finished: bool  # True when the row wrote `</think>` within max_think_tokens
    # generate(return_features=True): [len(score_positions), H] layer L-2 rows the step scores came from (model
    # dtype and device), row i at score_positions[i]; None otherwise. Not compared (tensors) nor printed.
    step_features: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # generate(answer_all=True): this candidate's answer, decoded from its own KV cache; None otherwise.
    answer_token_ids: list[int] | None = None
    answer: str | None = None
    pruned: bool = False  # stopped early by `prune` (vLLM engine): a candidate that lost (docs/pruning.md)
    confidence: float | None = None  # the row's lowest window confidence (`return_confidence`, vLLM engine)


@dataclass
class GenerationStats:
    prefill_tokens: int  # prompt tokens through the model (once, for all k rows)
    think_decode_tokens: int  # rows through the model in thinking decode forwards (live rows only)
    think_generated_tokens: int  # thinking tokens the k rows actually wrote
    answer_decode_tokens: int  # tokens through the model in the answer phase
    seconds: dict[str, float] = field(default_factory=dict)  # prefill, think, select, answer (search: forward)
    padded_decode_tokens: int = 0  # search: masked padding rows in decode forwards (rows waiting at a step)
    rounds: int = 0  # search: steps of the search (one selection each)
    # Answer-phase prompt tokens served from a prefix cache instead of going through the model (vLLM engine; the HF
    # engine continues from the chosen row's own KV and feeds no prompt token again, so 0 there).
    answer_cached_tokens: int = 0
    # Thinking-phase request prompt tokens the prefix cache served (vLLM search: each round's requests re-read only
    # the partial last KV block of the ids their parent wrote).
    think_cached_tokens: int = 0
    pruned_rows: int = 0  # rows stopped by `prune`
    pruned_think_tokens: int = 0  # thinking tokens pruning saved (estimated: each pruned row as the kept rows' mean)

    @property
    def total_tokens(self) -> int:
        return self.prefill_tokens + self.think_decode_tokens + self.answer_decode_tokens


@dataclass
class GenerationResult:
    candidates: list[Candidate]
    best: int  # index of the chosen candidate
    answer: str  # decoded without special tokens
    answer_token_ids: list[int]  # after the chosen thinking, EOS included when generated
    prompt_token_ids: list[int]
    stats: GenerationStats


# -- JSON forms (the CLI's --json and the server's responses) -------------------------------------------------


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a non-finite score (a NaN in the model's features) is written as null."""
    return value if math.isfinite(value) else None


def score_json(result, return_all_scores: bool) -> dict:
    """The reference server's response: {"value"}, or with return_all_scores also the step scores, the token ids
    and the scored positions."""
    if not return_all_scores:
        return {"value": finite_or_none(result.value)}
    return {
        "value": finite_or_none(result.value),
        "all_scores": [finite_or_none(p) for p in result.all_scores],
        "token_ids": result.token_ids,
        "score_positions": result.score_positions,
    }


def generation_json(result, *, token_ids: bool = False) -> dict:
    """A `GenerationResult` as JSON; token ids only when asked (k x max_think_tokens of them)."""
    candidates = []
    for candidate in result.candidates:
        item = {
            "text": candidate.text,
            "score": finite_or_none(candidate.score),
            "step_scores": [finite_or_none(p) for p in candidate.step_scores],
            "score_positions": candidate.score_positions,
            "finished": candidate.finished,
            "pruned": candidate.pruned,
            "num_tokens": len(candidate.token_ids),
        }
        if token_ids:
            item["token_ids"] = candidate.token_ids
        candidates.append(item)
    stats = result.stats
    out = {
        "candidates": candidates,
        "best": result.best,
        "answer": result.answer,
        "stats": {
            "prefill_tokens": stats.prefill_tokens,
            "think_decode_tokens": stats.think_decode_tokens,
            "think_generated_tokens": stats.think_generated_tokens,
            "answer_decode_tokens": stats.answer_decode_tokens,
            "total_tokens": stats.total_tokens,
            "padded_decode_tokens": stats.padded_decode_tokens,
            "rounds": stats.rounds,
            "think_cached_tokens": stats.think_cached_tokens,
            "pruned_rows": stats.pruned_rows,
            "pruned_think_tokens": stats.pruned_think_tokens,
            "seconds": stats.seconds,
        },
    }
    if token_ids:
        out["answer_token_ids"] = result.answer_token_ids
        out["prompt_token_ids"] = result.prompt_token_ids
    return out
