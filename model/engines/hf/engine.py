"""`ReflectiveModel`: an HF causal LM, its tokenizer and an SPRM head; scoring and best-of-k generation
(docs/method.md §3-5).

Features are the output of decoder layer L-2 (HF `hidden_states[-2]`), captured by a forward hook, so no forward
ever materialises all hidden states. `score` stops the forward right after that layer (the last layer and the LM
head never run). `generate` prefills the prompt once, decodes k thinking rows as one batch while scoring each step
as it is produced, then continues the answer from the chosen row's own KV cache.
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from sprm_kernels import StepScorer, resolve_backend, sprm_score, step_positions
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.params import GenerationParams
from sprm_kernels.model.core.progress import progress_bar
from sprm_kernels.model.core.sampling import sample_tokens
from sprm_kernels.model.core.selection import MODES, choose_best, geometric_mean
from sprm_kernels.model.core.tokens import LANGS, chat_prompt_ids, check_round_trip, step_token_ids, think_marker_ids
from sprm_kernels.model.core.types import Candidate, GenerationResult, GenerationStats, ScoreResult
from sprm_kernels.model.engines.base import EngineInfo
from sprm_kernels.model.engines.common import check_batch_tokens, encode_texts, prompt_token_ids, token_lists
from sprm_kernels.model.engines.hf.compat import cache_argument, keep_row, new_cache, take_rows

__all__ = ["MODES", "Candidate", "GenerationResult", "GenerationStats", "ReflectiveModel", "ScoreResult", "choose_best"]

MAX_PADDING = 0.1  # share of a padded scoring batch's tokens that may be padding (see _length_batches)


class _FeaturesReady(Exception):
    """Raised by the hook to end a scoring forward once layer L-2 has run."""


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
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if not isinstance(head, SPRMHead):
            raise ValueError(f"head: expected an SPRMHead, got {type(head).__name__}")
        if head.hidden_size != config.hidden_size:
            raise ValueError(
                f"head: expected hidden size H={config.hidden_size} (the model's hidden_size), "
                f"got a head with H={head.hidden_size}"
            )
        self.layers = _decoder_layers(model, config.num_hidden_layers)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # valid ids: [0, vocab_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.head = head.to(device=self.device, dtype=self.dtype).eval()
        self.backend = backend
        resolve_backend(self.device, backend)  # fail now on a bad backend, not in the middle of a generation
        self.think_start_id, self.think_end_id = think_marker_ids(tokenizer)
        self.step_token_ids = step_token_ids(tokenizer, lang)
        check_round_trip(tokenizer, (self.think_start_id, self.think_end_id), self.step_token_ids, lang)
        self.lang = lang
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.pad_token_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )  # any id works: padded positions are never attended to by real ones nor scored
        self._last_logits_only = _last_logits_kwargs(model)
        self._cache_argument = cache_argument(model)  # past_key_values or cache, as this transformers wants it

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
        import transformers
        from packaging.version import Version
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = "auto" if device.type == "cuda" else torch.float32
        dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(path, **{dtype_kwarg: dtype}, **model_kwargs)
        if "device_map" not in model_kwargs:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, SPRMHead.from_pretrained(path), lang=lang, backend=backend)

    # -- the engine interface (engine.py) ---------------------------------------------------------------------

    def info(self) -> EngineInfo:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        path = getattr(config, "_name_or_path", "") or ""
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
        """Another head on the same backbone and tokenizer (nothing is copied), e.g. to compare two heads."""
        return ReflectiveModel(self.model, self.tokenizer, head, lang=self.lang, backend=self.backend)

    # -- features ---------------------------------------------------------------------------------------------

    @contextmanager
    def _hook_penultimate(self, *, stop: bool):
        """Yields a dict whose "features" is the output of decoder layer L-2 of the latest forward."""
        captured = {}

        def hook(module, args, output):
            captured["features"] = output[0] if isinstance(output, tuple) else output  # tuple in transformers 4.x
            if stop:
                raise _FeaturesReady

        handle = self.layers[-2].register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    @torch.inference_mode()
    def penultimate_hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None):
        """[B, T, H] output of decoder layer L-2 (= HF `hidden_states[-2]`); the forward stops right after it.

        No attention mask is taken: pad on the right (causal attention keeps real tokens blind to it), or pack
        sequences into one row with `position_ids` restarting at 0 per sequence (see `score(packed=...)`).
        """
        with self._hook_penultimate(stop=True) as captured:
            try:
                self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            except _FeaturesReady:
                pass
        return captured["features"]

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
        packed = self._resolve_packed(packed)
        backend = self.backend if backend is None else backend
        results = [ScoreResult(0.0, [] if return_all_scores else None, [], []) for _ in sequences]
        for batch in _length_batches([len(s) for s in sequences], batch_tokens, packed):
            batch_results = self._score_batch([sequences[i] for i in batch], packed, return_all_scores, backend)
            for index, result in zip(batch, batch_results, strict=True):
                results[index] = result
        return results[0] if single else results

    def _resolve_packed(self, packed: bool | None) -> bool:
        attn = str(getattr(self.model.config, "_attn_implementation", None) or "")
        flash = attn.startswith("flash_attention")
        if packed is None:
            return flash
        if packed and not (flash or _masks_packed_sequences()):
            raise ValueError(
                "packed: expected False with this transformers version and attention, which would let packed "
                "sequences attend to each other (needs transformers >= 4.53 or flash-attention)"
            )
        return bool(packed)

    def _score_batch(self, sequences, packed, return_all_scores, backend) -> list[ScoreResult]:
        lengths = [len(s) for s in sequences]
        rules = dict(
            step_token_ids=self.step_token_ids, think_start_id=self.think_start_id, think_end_id=self.think_end_id
        )
        if packed:
            input_ids = torch.tensor([t for s in sequences for t in s], device=self.device)
            cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], device=self.device)
            position_ids = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
            hidden = self.penultimate_hidden_states(input_ids[None], position_ids=position_ids[None])[0]
            step_index, offsets = step_positions(input_ids, cu_seqlens=cu_seqlens, backend=backend, **rules)
            row_starts = cu_seqlens[:-1].tolist()
        else:
            width = max(lengths)
            input_ids = torch.tensor(
                [s + [self.pad_token_id] * (width - len(s)) for s in sequences], device=self.device
            )
            real = torch.arange(width, device=self.device) < torch.tensor(lengths, device=self.device)[:, None]
            hidden = self.penultimate_hidden_states(input_ids)  # right padding needs no mask (see that method)
            step_index, offsets = step_positions(input_ids, attention_mask=real, backend=backend, **rules)
            row_starts = [row * width for row in range(len(sequences))]
        scores = sprm_score(
            hidden, step_index, offsets, *self.head.kernel_weights(), return_step_scores=return_all_scores,
            backend=backend,
        )  # fmt: skip
        values, offsets, step_index = scores.score.tolist(), offsets.tolist(), step_index.tolist()
        step_scores = scores.step_scores.tolist() if return_all_scores else None
        results = []
        for row, sequence in enumerate(sequences):
            lo, hi = offsets[row], offsets[row + 1]
            results.append(
                ScoreResult(
                    value=values[row],
                    all_scores=step_scores[lo:hi] if return_all_scores else None,
                    token_ids=sequence,
                    score_positions=[index - row_starts[row] for index in step_index[lo:hi]],
                )
            )
        return results

    # -- generation -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt_or_messages,
        *,
        mode: str = "medium",
        k: int | None = None,
        max_think_tokens: int = 4096,
        max_answer_tokens: int = 1024,
        temperature: float = 0.6,
        top_p: float = 0.95,
        answer_temperature: float | None = None,
        seed: int | None = None,
        backend: str | None = None,
        progress: bool = False,
        return_features: bool = False,
        answer_all: bool = False,
    ) -> GenerationResult:
        """Best-of-k reflective generation (docs/method.md §1, §5).

        mode low / medium / high = k 2 / 8 / 32 (an explicit `k` overrides it). The chat template is applied to
        the prompt, which is prefilled once; k thinking rows are sampled as one batch (temperature, top_p), each
        step scored as it is produced; each row stops at `</think>` or after `max_think_tokens`. The best
        candidate (below) keeps its KV cache row, cropped to its own length, and the answer continues from it
        until EOS or `max_answer_tokens`, sampled at `answer_temperature` (None: `temperature`; 0: greedy).

        The choice: finished rows (that wrote `</think>`) rank above unfinished ones, then by score; NaN ranks
        below every score; ties go to the lowest index. A row that never closes its thinking keeps the score of
        the steps it wrote (docs/method.md §3 with end = its length) and `finished=False`; it is chosen only when no row
        finished, and then `</think>` is appended before the answer. Deterministic for a fixed `seed` (on one device
        and backend). temperature 0 makes the k rows identical.

        For training the head (`sprm_kernels.model.train`): `return_features` puts on each candidate the layer L-2
        rows its step scores were computed from (`Candidate.step_features`, kept while decoding: no second forward;
        it costs one more small host synchronisation per decode step). `answer_all` also decodes every other
        candidate's answer, each from its own KV cache (no re-prefill), after the chosen one's, which stays what it
        is without the option; meanwhile it holds a copy of the KV of the other rows still in the batch.
        """
        params = GenerationParams(
            mode=mode, k=k, max_think_tokens=max_think_tokens, max_answer_tokens=max_answer_tokens,
            temperature=temperature, top_p=top_p, answer_temperature=answer_temperature, seed=seed,
            return_features=return_features, answer_all=answer_all,
        )  # fmt: skip
        k, answer_temperature = params.num_candidates, params.answer_sampling_temperature
        backend = self.backend if backend is None else backend
        resolve_backend(self.device, backend)
        prompt_ids = chat_prompt_ids(self.tokenizer, prompt_or_messages)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        seconds = {}

        clock = _Clock(self.device)
        with self._hook_penultimate(stop=False) as captured:
            prompt = torch.tensor([prompt_ids], device=self.device)
            cache = new_cache(self.model)
            out = self.model(
                input_ids=prompt, **{self._cache_argument: cache}, use_cache=True, **self._last_logits_only
            )
            features = captured["features"][0]
            prompt_step_probs = self._prompt_step_probs(prompt_ids, features, backend)
            # Rows of the prompt positions that a later marker could bring into the span (see _finalize_candidates).
            prompt_features = {t: features[t].clone() for t in prompt_step_probs} if return_features else None
            cache.batch_repeat_interleave(k)  # the k rows share the prompt: one prefill, k copies of its KV
            seconds["prefill"] = clock.lap()

            think = self._decode_thinking(
                cache, out.logits[:, -1].expand(k, -1), features[-1].expand(k, -1), prompt_ids, k,
                max_think_tokens, partial(sample_tokens, temperature=temperature, top_p=top_p, generator=generator),
                captured, backend, progress, prompt_features,
            )  # fmt: skip
            seconds["think"] = clock.lap()

        candidates = self._finalize_candidates(prompt_ids, think, prompt_step_probs, backend)
        best = choose_best([c.score for c in candidates], [c.finished for c in candidates])
        chosen = candidates[best]
        other_caches = {j: think.copy_cache(j) for j in range(k) if j != best} if answer_all else {}
        cache, row = think.take_cache(best)
        seconds["select"] = clock.lap()

        sample_answer = partial(sample_tokens, temperature=answer_temperature, top_p=top_p, generator=generator)
        answer_ids, answer_fed = self._answer_candidate(
            cache, row, prompt_ids, chosen, max_answer_tokens, sample_answer, progress
        )
        for j, (cache, row) in other_caches.items():  # after the chosen answer, which thus keeps its samples
            ids, fed = self._answer_candidate(cache, row, prompt_ids, candidates[j], max_answer_tokens, sample_answer)
            candidates[j].answer_token_ids = ids
            candidates[j].answer = self.tokenizer.decode(ids, skip_special_tokens=True)
            answer_fed += fed
        if answer_all:
            chosen.answer_token_ids = answer_ids
            chosen.answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        seconds["answer"] = clock.lap()
        stats = GenerationStats(
            prefill_tokens=len(prompt_ids),
            think_decode_tokens=think.decode_tokens,
            think_generated_tokens=sum(len(c.token_ids) for c in candidates),
            answer_decode_tokens=answer_fed,
            seconds=seconds,
        )
        return GenerationResult(
            candidates=candidates,
            best=best,
            answer=self.tokenizer.decode(answer_ids, skip_special_tokens=True),
            answer_token_ids=answer_ids,
            prompt_token_ids=prompt_ids,
            stats=stats,
        )

    def search(self, prompt_or_messages, **options) -> GenerationResult:
        """Step-level beam search or DVTS guided by the streaming step scores, with KV forking (`search.search`:
        method="beam" | "dvts", beam_width, expansions, aggregate="mean" | "last" | "min", and generate's
        sampling options). Returns the same `GenerationResult` as `generate`; candidates are the finished beams."""
        from sprm_kernels.model.engines.hf.search import search

        return search(self, prompt_or_messages, **options)

    def _prompt_step_probs(self, prompt_ids, features, backend) -> dict[int, float]:
        """Step probabilities at the prompt positions that the rule could score: rules 1-3 of docs/method.md §3
        hold; rule 4 depends on markers the rows have not written yet. Usually empty (the prompt precedes `<think>`)."""
        step_ids = set(self.step_token_ids)
        positions = [
            t
            for t in range(1, len(prompt_ids) - 1)
            if prompt_ids[t + 1] in step_ids and prompt_ids[t] not in step_ids and prompt_ids[t] != self.think_start_id
        ]
        if not positions:
            return {}
        step_index = torch.tensor(positions, device=self.device)
        offsets = torch.tensor([0, len(positions)], device=self.device)
        scores = sprm_score(
            features, step_index, offsets, *self.head.kernel_weights(), return_step_scores=True, backend=backend
        )
        return dict(zip(positions, scores.step_scores.tolist(), strict=True))

    def _decode_thinking(
        self, cache, logits, hidden, prompt_ids, k, max_think_tokens, sample, captured, backend, progress,
        prompt_features=None,
    ) -> _Thinking:  # fmt: skip
        """Sample k rows in lockstep. At step i every live row samples its token x[t+1] (t = len(prompt_ids) - 1 + i)
        from the logits of position t, whose layer L-2 state `hidden` came from the same forward: when x[t+1] is a
        step token and the rule holds so far, that state is scored (the shift of docs/method.md §3). With
        `prompt_features` (the prefill's rows, by position), the states at every position where rules 1-3 hold are
        kept too: rule 4 can still change when a later marker moves the span.

        A row that closes its thinking leaves the batch with its KV rows moved to a cache of its own (needed only
        if it is chosen), so that later forwards process live rows only. The scorer keeps a fixed [k, H] shape."""
        device = self.device
        step_ids = torch.tensor(self.step_token_ids, device=device)
        scorer = StepScorer(*self.head.kernel_weights(), batch_size=k, backend=backend)
        think = _Thinking(
            tokens=torch.full((k, max_think_tokens), self.pad_token_id, dtype=torch.long, device=device),
            step_probs=torch.zeros((k, max_think_tokens), dtype=torch.float32, device=device),
            flagged=torch.zeros((k, max_think_tokens), dtype=torch.bool, device=device),
            lengths=torch.zeros(k, dtype=torch.long, device=device),
            closed=torch.zeros(k, dtype=torch.bool, device=device),
            scorer=scorer,
            cache=cache,
            rows=list(range(k)),
            features=None if prompt_features is None else [dict(prompt_features) for _ in range(k)],
            no_features=hidden.new_empty((0, hidden.shape[-1])),
        )
        rows = torch.arange(k, device=device)  # the candidate of each row of `cache`
        features = torch.zeros((k, hidden.shape[-1]), dtype=hidden.dtype, device=device)  # rows of all k candidates
        span = _ThinkSpan(prompt_ids, k, self.think_start_id, self.think_end_id, device)
        previous = torch.full((k,), prompt_ids[-1], dtype=torch.long, device=device)
        live = torch.ones(k, dtype=torch.bool, device=device)
        bar = progress_bar(max_think_tokens, f"thinking (k={k})", progress, leave=False)
        for i in range(max_think_tokens):
            position = len(prompt_ids) - 1 + i  # predicts the token sampled now
            token = torch.full((k,), self.pad_token_id, dtype=torch.long, device=device)
            token[rows] = sample(logits)
            features[rows] = hidden
            could_score = (
                live
                & torch.isin(token, step_ids)  # rule 1: x[t+1] is a step token
                & ~torch.isin(previous, step_ids)  # rule 2: first of a run
                & (previous != self.think_start_id)  # rule 3: not <think> itself
            )
            is_step = could_score & span.contains(position)  # rule 4, with the markers written so far
            if think.features is not None:
                think.record_features(position, features, could_score)
            # Only rows where rules 1-3 hold need a probability (the exact positions are among them): a step with
            # no such row skips the head (no W1 traffic); the others read NaN, never used.
            think.step_probs[:, i] = scorer.update(features, is_step, want_prob=could_score)
            think.flagged[:, i] = is_step
            think.tokens[:, i] = token
            think.lengths += live
            span.observe(token, position + 1, live)
            think.closed |= live & (token == self.think_end_id)
            live &= token != self.think_end_id
            previous = token
            if bar is not None:
                bar.update(1)
            still_live = live[rows].tolist()  # the one host synchronisation of a step
            if i + 1 == max_think_tokens or not any(still_live):
                break
            if not all(still_live):
                for row, candidate in enumerate(think.rows):
                    if not still_live[row]:
                        think.closed_caches[candidate] = take_rows(cache, [row])
                keep = [row for row, alive in enumerate(still_live) if alive]
                cache.batch_select_indices(torch.tensor(keep, device=device))
                think.rows = [think.rows[row] for row in keep]
                rows = torch.tensor(think.rows, device=device)
            out = self.model(input_ids=token[rows][:, None], **{self._cache_argument: cache}, use_cache=True)
            think.decode_tokens += len(think.rows)
            logits, hidden = out.logits[:, -1], captured["features"][:, -1]
        if bar is not None:
            bar.close()
        return think

    def _finalize_candidates(self, prompt_ids, think: _Thinking, prompt_step_probs, backend) -> list[Candidate]:
        """Per-row results. The scored positions are recomputed by docs/method.md §3 on each final sequence; they
        match the positions scored while streaming unless a marker written later moved the span (a second `<think>`, or
        markers in the prompt), and then the score is recomputed from the recorded step probabilities. Recorded
        features cover every position where rules 1-3 hold (prompt and thinking): they follow the final positions
        exactly in both cases."""
        prompt_len = len(prompt_ids)
        lengths, closed = think.lengths.tolist(), think.closed.tolist()
        responses = [row[:n] for row, n in zip(think.tokens.tolist(), lengths, strict=True)]
        exact_positions = self._scored_positions([prompt_ids + r for r in responses], backend)
        running = think.scorer.result().score.tolist()
        step_probs, flagged = think.step_probs.tolist(), think.flagged.tolist()
        candidates = []
        for row, response in enumerate(responses):
            streamed = [prompt_len - 1 + i for i, flag in enumerate(flagged[row]) if flag]
            positions = exact_positions[row]
            probs = [
                prompt_step_probs[t] if t < prompt_len - 1 else step_probs[row][t - prompt_len + 1] for t in positions
            ]
            score = running[row] if positions == streamed else geometric_mean(probs)
            candidates.append(
                Candidate(
                    token_ids=response,
                    text=self.tokenizer.decode(response, skip_special_tokens=False),
                    score=score,
                    step_scores=probs,
                    score_positions=positions,
                    finished=bool(closed[row]),
                    step_features=None if think.features is None else think.features_at(row, positions),
                )
            )
        return candidates

    def _scored_positions(self, sequences, backend) -> list[list[int]]:
        lengths = [len(s) for s in sequences]
        input_ids = torch.tensor([t for s in sequences for t in s], device=self.device)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], device=self.device)
        step_index, offsets = step_positions(
            input_ids, step_token_ids=self.step_token_ids, think_start_id=self.think_start_id,
            think_end_id=self.think_end_id, cu_seqlens=cu_seqlens, backend=backend,
        )  # fmt: skip
        step_index, offsets, starts = step_index.tolist(), offsets.tolist(), cu_seqlens.tolist()
        return [[i - starts[row] for i in step_index[offsets[row] : offsets[row + 1]]] for row in range(len(lengths))]

    def _answer_candidate(
        self, cache, row, prompt_ids, candidate, max_answer_tokens, sample, progress=False
    ) -> tuple[list[int], int]:
        """The answer after `candidate`'s thinking, from row `row` of `cache`, which holds every token of the row but
        its last (not fed when the row stopped); `</think>` is fed first to a row that never wrote it."""
        keep_row(cache, row, len(prompt_ids) + len(candidate.token_ids) - 1)
        pending = candidate.token_ids[-1:] + ([] if candidate.finished else [self.think_end_id])
        return self._decode_answer(cache, pending, max_answer_tokens, sample, progress)

    def _decode_answer(self, cache, pending, max_answer_tokens, sample, progress) -> tuple[list[int], int]:
        """Feed the chosen row's pending tokens, then decode one row until EOS or the budget."""
        answer, fed = [], 0
        input_ids = torch.tensor([pending], device=self.device)
        bar = progress_bar(max_answer_tokens, "answer", progress, leave=False)
        for _ in range(max_answer_tokens):
            out = self.model(input_ids=input_ids, **{self._cache_argument: cache}, use_cache=True)
            fed += input_ids.shape[1]
            token = sample(out.logits[:, -1])
            answer.append(int(token))
            if bar is not None:
                bar.update(1)
            if answer[-1] in self.eos_token_ids:
                break
            input_ids = token[:, None]
        if bar is not None:
            bar.close()
        return answer, fed


@dataclass
class _Thinking:
    tokens: torch.Tensor  # [k, max_think] sampled ids (padding after a row stops)
    step_probs: torch.Tensor  # [k, max_think] probability of the state that predicted token i
    flagged: torch.Tensor  # [k, max_think] whether that state was scored while streaming
    lengths: torch.Tensor  # [k] tokens each row wrote
    closed: torch.Tensor  # [k] the row wrote </think>
    scorer: StepScorer
    cache: object  # the KV of the rows still in the batch when decoding stopped
    rows: list[int]  # the candidate of each row of `cache`
    closed_caches: dict[int, object] = field(default_factory=dict)  # one-row KV of each row that left the batch
    decode_tokens: int = 0  # rows through the model in decode forwards
    features: list[dict[int, torch.Tensor]] | None = None  # per candidate: position -> [H] layer L-2 row
    no_features: torch.Tensor | None = None  # [0, H]: the rows of a candidate without scored positions

    def record_features(self, position: int, features: torch.Tensor, could_score: torch.Tensor) -> None:
        """Keep the rows of `features` [k, H] (position `position` of each candidate) where `could_score` [k]."""
        candidates = could_score.nonzero().flatten().tolist()
        if candidates:
            rows = features[candidates]  # a copy: `features` is overwritten by the next step
            for candidate, state in zip(candidates, rows, strict=True):
                self.features[candidate][position] = state

    def features_at(self, candidate: int, positions: list[int]) -> torch.Tensor:
        """[len(positions), H]: the recorded rows at a candidate's final scored positions."""
        if not positions:
            return self.no_features
        return torch.stack([self.features[candidate][t] for t in positions])

    def copy_cache(self, candidate: int) -> tuple[object, int]:
        """(cache, row) holding `candidate`'s KV, releasing nothing: the one-row cache of a row that left the batch
        (nobody else uses it), else a copy of its row of the batch cache."""
        if candidate in self.closed_caches:
            return self.closed_caches[candidate], 0
        return take_rows(self.cache, [self.rows.index(candidate)]), 0

    def take_cache(self, candidate: int) -> tuple[object, int]:
        """(cache, row) holding `candidate`'s KV; every other cache is released."""
        if candidate in self.closed_caches:
            found = self.closed_caches[candidate], 0
        else:
            found = self.cache, self.rows.index(candidate)
        self.cache, self.closed_caches = None, {}
        return found


class _ThinkSpan:
    """Per-row `<think>` / `</think>` counts and first positions over prompt + tokens so far (docs/method.md §3,
    rule 4)."""

    def __init__(self, prompt_ids, rows, start_id, end_id, device):
        self.start_id, self.end_id = start_id, end_id
        self.counts, self.first = {}, {}
        for marker in (start_id, end_id):
            where = [t for t, token in enumerate(prompt_ids) if token == marker]
            self.counts[marker] = torch.full((rows,), len(where), dtype=torch.long, device=device)
            self.first[marker] = torch.full((rows,), where[0] if where else 0, dtype=torch.long, device=device)

    def contains(self, position: int) -> torch.Tensor:
        """start < position < end, with start = the single `<think>` else 0 and end = the single `</think>` else
        unbounded (the sequence is not over yet)."""
        start = torch.where(self.counts[self.start_id] == 1, self.first[self.start_id], 0)
        end = torch.where(self.counts[self.end_id] == 1, self.first[self.end_id], torch.iinfo(torch.long).max)
        return (start < position) & (position < end)

    def observe(self, token: torch.Tensor, position: int, live: torch.Tensor) -> None:
        for marker in (self.start_id, self.end_id):
            seen = live & (token == marker)
            self.first[marker] = torch.where(seen & (self.counts[marker] == 0), position, self.first[marker])
            self.counts[marker] += seen


def _length_batches(lengths: list[int], budget: int, packed: bool, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices of the non-empty sequences, longest first, in batches of at most `budget` tokens: the sum of the
    lengths when packed, rows x longest when padded (one sequence over the budget gets a batch of its own).

    Padded batches also close before padding would exceed `max_padding` of their tokens: a padded position costs
    a forward as much as a real one, so one wide batch of mixed lengths can be slower than scoring the sequences
    one at a time (64 texts of 36-172 tokens padded to 2.3x their tokens: 0.6-0.7x the speed, on CPU)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batches, current, used, real = [], [], 0, 0
    for index in order:
        length = lengths[index]
        cost = used + length if packed else (len(current) + 1) * lengths[current[0] if current else index]
        too_padded = not packed and cost - (real + length) > max_padding * cost
        if current and (cost > budget or too_padded):
            batches.append(current)
            current, cost, real = [], length, 0
        current.append(index)
        used, real = cost, real + length
    return batches + ([current] if current else [])


def _decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):  # other layouts (e.g. GPT-2's transformer.h): the layer list
        layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers), None)
    if layers is None:
        raise ValueError(f"model: expected a list of {num_layers} decoder layers, found none")
    if len(layers) < 2:
        raise ValueError(f"model: expected at least 2 decoder layers (the head reads layer L-2), got {len(layers)}")
    return layers


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _last_logits_kwargs(model) -> dict:
    """Ask the prefill for the last position's logits only (the name changed across transformers versions)."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


def _masks_packed_sequences() -> bool:
    """transformers >= 4.53 builds per-sequence causal masks from restarting position_ids for every attention."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


class _Clock:
    """Wall time per phase; waits for the device so that queued kernels count in their own phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
