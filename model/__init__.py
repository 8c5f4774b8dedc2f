"""`sprm_kernels.model`: SPRM scoring and best-of-k reflective generation on an engine (Hugging Face or vLLM).

The public names are re-exported here; the package is built in layers that import downward only (CONTRIBUTING,
"The tree"): `core` (types, options, rules) <- `engines` (`base`, `registry`, `hf`, `vllm`) <- apps (`serving`,
`evaluation`, `training`) <- `ray` <- `cli`. Importing it imports neither transformers nor vLLM (an engine's
`from_pretrained` does).
"""

from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.params import GenerationParams, SearchParams
from sprm_kernels.model.core.sampling import sample_tokens
from sprm_kernels.model.core.selection import MODES, choose_best, geometric_mean
from sprm_kernels.model.core.tokens import chat_prompt_ids, step_token_ids, think_marker_ids
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats, ScoreResult
from sprm_kernels.model.engines.base import (
    Engine,
    EngineInfo,
    SupportsAsync,
    SupportsAsyncSearch,
    SupportsHeadSwap,
    SupportsPromptLists,
    SupportsSearch,
    supports_async,
    supports_async_search,
    supports_head_swap,
    supports_prompt_lists,
    supports_search,
)
from sprm_kernels.model.engines.hf import ReflectiveModel
from sprm_kernels.model.engines.registry import ENGINES, load_engine

__all__ = [
    "ENGINES",
    "MODES",
    "Candidate",
    "Engine",
    "EngineInfo",
    "GenerationParams",
    "GenerationResult",
    "GenerationStats",
    "ReflectiveModel",
    "SPRMHead",
    "ScoreResult",
    "SearchParams",
    "SupportsAsync",
    "SupportsAsyncSearch",
    "SupportsHeadSwap",
    "SupportsPromptLists",
    "SupportsSearch",
    "chat_prompt_ids",
    "choose_best",
    "geometric_mean",
    "load_engine",
    "sample_tokens",
    "step_token_ids",
    "supports_async",
    "supports_async_search",
    "supports_head_swap",
    "supports_prompt_lists",
    "supports_search",
    "think_marker_ids",
]
