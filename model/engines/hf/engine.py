"""`ReflectiveModel`: an HF causal LM, its tokenizer and an SPRM head; scoring, best-of-k generation and step search
(docs/method.md §3-5). A small facade over free functions:

- `features`: the output of decoder layer L-2 (HF `hidden_states[-2]`), captured by a forward hook, so no forward
  ever materialises all hidden states;
- `scoring`: `score` batches sequences by length and stops each forward right after that layer (the last layer and
  the LM head never run);
- `decode` / `thinking`: `generate` prefills the prompt once, decodes k thinking rows as one batch while scoring each
  step as it is produced, then continues the answer from the chosen row's own KV cache;
- `search`: beam search / DVTS over the public step API below (`capture_penultimate`, `new_cache`,
  `forward_cached`, `prompt_step_probs`, `scored_positions`, `answer_candidate`);
- `compat`: every transformers version fork and KV-cache row operation.

The rule of which positions are scored is `sprm_kernels.model.core.steps`, shared with the other engines.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import torch
from torch import nn

import sprm_kernels.model.engines.hf.compat as compat
import sprm_kernels.model.engines.hf.decode as decode
import sprm_kernels.model.engines.hf.scoring as scoring
from sprm_kernels import resolve_backend
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.params import GenerationParams, params_from
from sprm_kernels.model.core.selection import MODES, choose_best
from sprm_kernels.model.core.steps import prompt_step_positions, scored_positions
from sprm_kernels.model.core.tokens import LANGS, chat_prompt_ids
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats, ScoreResult
from sprm_kernels.model.engines.base import EngineInfo
from sprm_kernels.model.engines.common import (
    check_batch_tokens,
    encode_texts,
    prompt_token_ids,
    rule_token_ids,
    token_lists,
)
from sprm_kernels.model.engines.hf.features import capture_layer_output, decoder_layers, run_until_layer

__all__ = ["MODES", "Candidate", "GenerationResult", "GenerationStats", "ReflectiveModel", "ScoreResult", "choose_best"]


class ReflectiveModel:
    """A policy (`AutoModelForCausalLM`), its tokenizer and an `SPRMHead` reading the policy's layer L-2.

    >>> rm = ReflectiveModel.from_pretrained("path/to/MetaStone-S1-1.5B")
    >>> rm.score(["<think>a.\\n\\nb.\\n\\n</think>x"], return_all_scores=True)[0].value
    >>> rm.generate("What is 2+3?", mode="low").answer

    The head is moved to the model's device and dtype (as the reference does). `backend` (None, "torch" or
    "triton") is passed to every kernel op; None picks Triton on CUDA and the PyTorch path on CPU.
    """

    def __init__(self, model: nn.Module, tokenizer, head: SPRMHead, *, lang: str = "en", backend: str | None = None):
        if lang not in LANGS:
            raise ValueError(f"lang: expected one of {LANGS}, got {lang!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = compat.text_config(model.config)
        if not isinstance(head, SPRMHead):
            raise ValueError(f"head: expected an SPRMHead, got {type(head).__name__}")
        if head.hidden_size != config.hidden_size:
            raise ValueError(
                f"head: expected hidden size H={config.hidden_size} (the model's hidden_size), "
                f"got a head with H={head.hidden_size}"
            )
        self.layers = decoder_layers(model, config.num_hidden_layers)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # valid ids: [0, vocab_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.head = head.to(device=self.device, dtype=self.dtype).eval()
        self.backend = backend
        resolve_backend(self.device, backend)  # fail now on a bad backend, not in the middle of a generation
        self.think_start_id, self.think_end_id, self.step_token_ids = rule_token_ids(tokenizer, lang)
        self.lang = lang
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )  # any id works: padded positions are never attended to by real ones nor scored
        self._last_logits_only = compat.last_logits_kwargs(model)
        self._cache_argument = compat.cache_argument(model)  # past_key_values or cache, as this transformers wants it

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        lang: str = "en",
        backend: str | None = None,
        **model_kwargs,
    ) -> ReflectiveModel:
        """Load an official-layout folder: HF model + tokenizer + `score_module.pt` (or `sprm_head.safetensors`).

        device: default CUDA when available, else CPU. dtype: default the checkpoint's own dtype on CUDA and
        float32 on CPU. `model_kwargs` go to `AutoModelForCausalLM.from_pretrained` (e.g. attn_implementation).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = "auto" if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, **{compat.dtype_keyword(): dtype}, **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, SPRMHead.from_pretrained(path), lang=lang, backend=backend)

    # -- the engine interface (engines/base.py) ---------------------------------------------------------------

    def info(self) -> EngineInfo:
        config = compat.text_config(self.model.config)
        path = compat.name_or_path(config)
        return EngineInfo(
            engine="hf",
            model_name=os.path.basename(path.rstrip("/")) or type(self.model).__name__,
            path=path or None,
            hidden_size=config.hidden_size,
            num_layers=len(self.layers),
            context_length=getattr(config, "max_position_embeddings", None),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            backend=self.backend or "auto",
            num_parameters=sum(p.numel() for p in self.model.parameters()),
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added: what `score` scores for a text."""
        return encode_texts(self.tokenizer, texts)

    def prompt_ids(self, prompt_or_messages) -> list[int]:
        """The chat template applied to a prompt or messages, tokenized: what `generate` prefills."""
        return prompt_token_ids(self.tokenizer, prompt_or_messages)

    def with_head(self, head: SPRMHead) -> ReflectiveModel:
        """Another head on the same backbone and tokenizer (nothing is copied), e.g. to compare two heads
        (`engines.base.SupportsHeadSwap`)."""
        return ReflectiveModel(self.model, self.tokenizer, head, lang=self.lang, backend=self.backend)

    # -- features and the step API (what `search` drives) -----------------------------------------------------

    def capture_penultimate(self, *, stop: bool = False) -> AbstractContextManager[dict]:
        """A context whose dict's "features" is the output [B, T, H] (model dtype) of decoder layer L-2 in the
        latest forward. `stop`: end every forward right after that layer (see `penultimate_hidden_states`)."""
        return capture_layer_output(self.layers[-2], stop=stop)

    @torch.inference_mode()
    def penultimate_hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None):
        """[B, T, H] output of decoder layer L-2 (= HF `hidden_states[-2]`); the forward stops right after it.

        No attention mask is taken: pad on the right (causal attention keeps real tokens blind to it), or pack
        sequences into one row with `position_ids` restarting at 0 per sequence (see `score(packed=...)`).
        """
        return run_until_layer(self.model, self.layers[-2], input_ids, position_ids)

    def new_cache(self):
        """An empty KV cache (`DynamicCache`) for `forward_cached`."""
        return compat.new_cache(self.model)

    def forward_cached(self, input_ids: torch.Tensor, cache, *, last_logits_only: bool = False, **options):
        """The policy's forward on `input_ids` [B, T] long, extending `cache` in place; the output's `logits` are
        [B, T, V] ([B, 1, V] with `last_logits_only`, where this transformers can). `options` go to the forward
        (e.g. attention_mask [B, cached + T], position_ids [B, T])."""
        extra = self._last_logits_only if last_logits_only else {}
        return self.model(input_ids=input_ids, **{self._cache_argument: cache}, use_cache=True, **options, **extra)

    def prompt_step_probs(self, prompt_ids: list[int], features: torch.Tensor, backend=None) -> dict[int, float]:
        """{t: step probability} at the prompt positions that the rule could score (rules 1-3 of docs/method.md §3;
        rule 4 depends on markers the rows have not written yet), from the prefill's `features` [T, H]. Usually
        empty (the prompt precedes `<think>`)."""
        positions = prompt_step_positions(prompt_ids, self.step_token_ids, self.think_start_id)
        backend = self.backend if backend is None else backend
        return scoring.step_probs_at(features, positions, self.head.kernel_weights(), backend)

    def scored_positions(self, sequences: list[list[int]], backend=None) -> list[list[int]]:
        """The positions docs/method.md §3 scores in each whole sequence (prompt + response ids)."""
        return scored_positions(
            sequences, step_token_ids=self.step_token_ids, think_start_id=self.think_start_id,
            think_end_id=self.think_end_id, device=self.device, backend=self.backend if backend is None else backend,
        )  # fmt: skip

    def answer_candidate(
        self, cache, row: int, prompt_ids: list[int], candidate: Candidate, max_answer_tokens: int, sample,
        progress: bool = False,
    ) -> tuple[list[int], int]:  # fmt: skip
        """(answer ids, tokens fed): the answer after `candidate`'s thinking, from row `row` of `cache` (which holds
        every token of the row but its last; the cache is cut to that row), until EOS or `max_answer_tokens`.
        `sample` maps logits [1, V] to a token [1]; `</think>` is fed first to a row that never wrote it."""
        return decode.answer_candidate(self, cache, row, prompt_ids, candidate, max_answer_tokens, sample, progress)

    # -- scoring ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(
        self,
        texts_or_token_ids,
        *,
        return_all_scores: bool = False,
        batch_tokens: int = 16384,
        packed: bool | None = None,
        backend: str | None = None,
    ) -> ScoreResult | list[ScoreResult]:
        """SPRM scores of texts (tokenized without special tokens, as the reference server does) or token id lists.

        A single text or id list gives one `ScoreResult`, a list of them a list. Sequences are sorted by length
        and run in batches of at most `batch_tokens` tokens (padding included), one forward each, that stops
        after layer L-2. `packed`: put a batch's sequences back to back in one row (no padding; attention masked
        per sequence from the restarting position ids; worth it with flash-attention, whose varlen kernels skip
        the masked blocks), else right-pad them. None: packed exactly when the model runs flash-attention.
        """
        sequences, single = token_lists(self.tokenizer, texts_or_token_ids, self.vocab_size)
        check_batch_tokens(batch_tokens)
        packed = scoring.resolve_packed(self.model, packed)
        backend = self.backend if backend is None else backend
        results = scoring.score_sequences(
            self, sequences, return_all_scores=return_all_scores, batch_tokens=batch_tokens, packed=packed,
            backend=backend,
        )  # fmt: skip
        return results[0] if single else results

    # -- generation -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompt_or_messages, *, backend: str | None = None, progress: bool = False, **options
    ) -> GenerationResult:
        """Best-of-k reflective generation (docs/method.md §1, §5).

        `options` are the fields of `GenerationParams` (core/params.py: mode, k, max_think_tokens,
        max_answer_tokens, temperature, top_p, answer_temperature, seed, return_features, answer_all), with its
        defaults. mode low / medium / high = k 2 / 8 / 32 (an explicit `k` overrides it). The chat template is
        applied to the prompt, which is prefilled once; k thinking rows are sampled as one batch (temperature,
        top_p), each step scored as it is produced; each row stops at `</think>` or after `max_think_tokens`. The
        best candidate (below) keeps its KV cache row, cropped to its own length, and the answer continues from it
        until EOS or `max_answer_tokens`, sampled at `answer_temperature` (None: `temperature`; 0: greedy).

        The choice: finished rows (that wrote `</think>`) rank above unfinished ones, then by score; NaN ranks
        below every score; ties go to the lowest index. A row that never closes its thinking keeps the score of
        the steps it wrote (docs/method.md §3 with end = its length) and `finished=False`; it is chosen only when no row
        finished, and then `</think>` is appended before the answer. Deterministic for a fixed `seed` (on one device
        and backend). temperature 0 makes the k rows identical.

        For training the head (`sprm_kernels.model.training`): `return_features` puts on each candidate the layer L-2
        rows its step scores were computed from (`Candidate.step_features`, kept while decoding: no second forward;
        it costs one more small host synchronisation per decode step). `answer_all` also decodes every other
        candidate's answer, each from its own KV cache (no re-prefill), after the chosen one's, which stays what it
        is without the option; meanwhile it holds a copy of the KV of the other rows still in the batch.
        """
        params = params_from(GenerationParams, "generate", options)
        if params.prune != "none":
            raise ValueError(f"prune: the hf engine does not prune, got {params.prune!r} (use the vllm engine)")
        backend = self.backend if backend is None else backend
        resolve_backend(self.device, backend)
        prompt_ids = chat_prompt_ids(self.tokenizer, prompt_or_messages)
        return decode.best_of_k(self, prompt_ids, params, backend, progress)

    def search(self, prompt_or_messages, **options) -> GenerationResult:
        """Step-level beam search or DVTS guided by the streaming step scores, with KV forking (`search.search`:
        method="beam" | "dvts", beam_width, expansions, aggregate="mean" | "last" | "min", and generate's
        sampling options). Returns the same `GenerationResult` as `generate`; candidates are the finished beams
        (`engines.base.SupportsSearch`)."""
        from sprm_kernels.model.engines.hf.search import search

        return search(self, prompt_or_messages, **options)


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids
