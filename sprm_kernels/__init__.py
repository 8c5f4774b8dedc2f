"""sprm-kernels: fused Triton kernels for SPRM process-reward scoring (MetaStone-S1 style).

Importing this package never imports transformers; the HF integration lives in `sprm_kernels.model`.
"""

from .dispatch import resolve_backend
from .grad import sprm_step_logits, sprm_step_logits_reference
from .loss import SPRLossDetails, spr_loss, spr_loss_reference
from .ops import sprm_score, step_positions
from .reference import SPRMScores, sprm_score_reference, step_positions_reference
from .scorer import StepScorer

__version__ = "0.1.0"

__all__ = [
    "SPRLossDetails",
    "SPRMScores",
    "StepScorer",
    "resolve_backend",
    "sprm_score",
    "sprm_score_reference",
    "sprm_step_logits",
    "sprm_step_logits_reference",
    "spr_loss",
    "spr_loss_reference",
    "step_positions",
    "step_positions_reference",
]
