"""The Hugging Face engine: `ReflectiveModel` (transformers' causal LMs; scoring, best-of-k generation, search)."""

from sprm_kernels.model.engines.hf.engine import ReflectiveModel

__all__ = ["ReflectiveModel"]
