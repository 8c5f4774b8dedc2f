"""Engines: the SPRM head (`score_module.pt` layout), the engine interface (`Engine`, `load_engine`) and the HF
engine `ReflectiveModel` (scoring, best-of-k generation).

This subpackage imports transformers lazily (only `ReflectiveModel.from_pretrained` needs it);
`import sprm_kernels` never imports it.
"""

from .engine import ENGINES, Engine, EngineInfo, load_engine
from .head import SPRMHead
from .params import GenerationParams
from .reflective import ReflectiveModel
from .sampling import sample_tokens
from .selection import MODES, choose_best, geometric_mean
from .tokens import chat_prompt_ids, step_token_ids, think_marker_ids
from .types import Candidate, GenerationResult, GenerationStats, ScoreResult

__all__ = [
    "ENGINES",
    "MODES",
    "Engine",
    "EngineInfo",
    "GenerationParams",
    "geometric_mean",
    "load_engine",
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
