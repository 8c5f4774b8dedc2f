"""Result types shared by every engine (HF, vLLM): what `score` and `generate` return.

The CLI, the server, the evaluation and the trainer read these and nothing engine-specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
