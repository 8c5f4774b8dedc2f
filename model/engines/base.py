"""The engine interface: what the CLI, the server, the evaluation, the trainer and the Ray jobs may use of a model.

An engine holds a policy, its tokenizer and an SPRM head reading the policy's layer L-2 state. Apps take an `Engine`
and never look inside it: what they need of the model (its context length, its name, its tokenizer's ids) comes
from `info()`, `encode()` and `prompt_ids()`. What only some engines can do is a capability Protocol, checked with
its `supports_*` function (as vLLM's `model_executor/models/interfaces.py` does), never with `hasattr`.

Adding an engine: implement `Engine` (and the capabilities it has), register its loader in `registry.ENGINES`, and
run the engine-contract tests (`tests/engines/test_engine_contract.py`) against it (CONTRIBUTING, "Engines").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.types import GenerationResult, ScoreResult


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


# -- capabilities -------------------------------------------------------------------------------------------------


@runtime_checkable
class SupportsSearch(Protocol):
    """Step-level beam search / DVTS guided by the streaming step scores (keyword arguments: `SearchParams` and the
    sampling fields of `GenerationParams`); the same `GenerationResult` as `generate`."""

    def search(self, prompt_or_messages, **options) -> GenerationResult: ...


@runtime_checkable
class SupportsHeadSwap(Protocol):
    """Another head on the same backbone and tokenizer, nothing copied (e.g. to compare two heads)."""

    def with_head(self, head: SPRMHead) -> Engine: ...


@runtime_checkable
class SupportsPromptLists(Protocol):
    """`generate(list of prompts)` batches them in one call and returns one `GenerationResult` per prompt."""

    supports_prompt_lists: ClassVar[Literal[True]]


@runtime_checkable
class SupportsClose(Protocol):
    """Engines that hold a process or device memory to release before exit."""

    def close(self) -> None: ...


@runtime_checkable
class SupportsAsync(Protocol):
    """Coroutines for servers: concurrent calls share one continuously batched engine, and cancelling a call aborts
    its requests. `astream` yields `("reasoning", candidates, best)`, `("answer", token_ids so far)` and last
    `("result", GenerationResult)`."""

    async def agenerate(self, prompt_or_messages, **options) -> GenerationResult: ...

    async def ascore(self, texts_or_token_ids, *, return_all_scores: bool = False, batch_tokens: int = 16384): ...

    def astream(self, prompt_or_messages, **options): ...


@runtime_checkable
class SupportsAsyncSearch(Protocol):
    """`search` as a coroutine (the server's vLLM engine): its requests share the engine's batches with every other
    call, and cancelling it aborts them."""

    async def asearch(self, prompt_or_messages, **options) -> GenerationResult: ...


def supports_async(engine) -> bool:
    return isinstance(engine, SupportsAsync)


def supports_async_search(engine) -> bool:
    return isinstance(engine, SupportsAsyncSearch)


def supports_search(engine) -> bool:
    return isinstance(engine, SupportsSearch)


def supports_head_swap(engine) -> bool:
    return isinstance(engine, SupportsHeadSwap)


def supports_prompt_lists(engine) -> bool:
    return getattr(engine, "supports_prompt_lists", False) is True


def supports_close(engine) -> bool:
    return isinstance(engine, SupportsClose)
