"""sprm-kernels: fused Triton kernels for SPRM process-reward scoring (MetaStone-S1 style).

Importing this package never imports transformers; the HF integration lives in `sprm_kernels.model`.
"""

from .dispatch import resolve_backend
from .ops import sprm_score, step_positions
from .reference import SPRMScores, sprm_score_reference, step_positions_reference
from .scorer import StepScorer

__version__ = "0.1.0"

__all__ = [
    "SPRMScores",
    "StepScorer",
    "resolve_backend",
    "sprm_score",
    "sprm_score_reference",
    "step_positions",
    "step_positions_reference",
]
