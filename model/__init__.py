"""HF integration: the SPRM head (`score_module.pt` layout) and `ReflectiveModel` (scoring, best-of-k generation).

This subpackage imports transformers lazily (only `ReflectiveModel.from_pretrained` needs it);
`import sprm_kernels` never imports it.
"""

from .head import SPRMHead
from .reflective import (
    MODES,
    Candidate,
    GenerationResult,
    GenerationStats,
    ReflectiveModel,
    ScoreResult,
    choose_best,
)
from .sampling import sample_tokens
from .tokens import chat_prompt_ids, step_token_ids, think_marker_ids

__all__ = [
    "MODES",
    "Candidate",
    "GenerationResult",
    "GenerationStats",
    "ReflectiveModel",
    "SPRMHead",
    "ScoreResult",
    "chat_prompt_ids",
    "choose_best",
    "sample_tokens",
    "step_token_ids",
    "think_marker_ids",
]
