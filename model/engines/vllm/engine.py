"""`VLLMReflectiveModel`: best-of-k reflective generation and SPRM scoring on vLLM (the same face as
`ReflectiveModel`).

generate: every prompt's k thinking rows are submitted at once (one request per row, its own seed) and vLLM batches
them continuously; each row stops at `</think>` or `max_think_tokens`. The head runs inside vLLM's forward on
the layer L-2 state of every token (`model.py`) and the worker keeps the logits by request (`recorder.py`). As
soon as a prompt's k rows are done the engine applies the scoring rule (docs/method.md §3) to each final
sequence, fetches the logits at exactly those positions (no second pass over the thinking), scores (§4), chooses
(`selection.choose_best`) and adds the prompt's answer request while other prompts still think: prompt + the
chosen thinking (+ `</think>` for an unfinished row), whose KV vLLM's prefix cache serves
(`stats.answer_cached_tokens`).

score: one prefill-only request per sequence (max_tokens 1, prefix cache not read so that every position goes
through the model), the logits at the §3 positions; the same `ScoreResult`s as the HF engine.
"""

from __future__ import annotations

import os
import time
import uuid

import torch

import sprm_kernels.model.engines.vllm.compat as compat
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.params import GenerationParams, params_from
from sprm_kernels.model.core.selection import choose_best
from sprm_kernels.model.core.steps import scored_positions
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
from sprm_kernels.model.engines.vllm.recorder import EXTRA_FEATURES, EXTRA_KEY
from sprm_kernels.torch_ops import clamped_log_sigmoid


class VLLMReflectiveModel:
    """A vLLM `LLM` running the policy with its SPRM head (`model.py`), and the tokenizer for the scoring rule.

    >>> rm = VLLMReflectiveModel.from_pretrained("path/to/MetaStone-S1-1.5B")
    >>> rm.generate(["What is 2+3?", "What is 4+4?"], mode="low")[1].answer
    """

    supports_prompt_lists = True  # engines.base.SupportsPromptLists

    def __init__(
        self, llm, tokenizer, *, path: str, hidden_size: int, num_layers: int, lang: str = "en",
        vocab_size: int | None = None,
    ):  # fmt: skip
        if lang not in LANGS:
            raise ValueError(f"lang: expected one of {LANGS}, got {lang!r}")
        self.llm = llm
        self.tokenizer = tokenizer
        self.path = path
        self.lang = lang
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.vocab_size = len(tokenizer) if vocab_size is None else vocab_size  # valid ids: [0, vocab_size)
        self.think_start_id, self.think_end_id, self.step_token_ids = rule_token_ids(tokenizer, lang)
        self.eos_token_ids = sorted(compat.eos_token_ids(path, tokenizer))
        self.context_length = compat.max_model_len(llm)
        self._dtype = compat.model_dtype(llm)
        self._device = compat.device_name()
        compat.install_recorder(llm, self.step_token_ids, self.think_start_id)

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype=None, lang: str = "en", device: str | None = None, backend: str | None = None,
        **engine_args,
    ) -> VLLMReflectiveModel:  # fmt: skip
        """Load an official-layout folder (HF model + tokenizer + `score_module.pt` or `sprm_head.safetensors`).

        dtype: default float32 on CPU (as the HF engine) and the checkpoint's dtype on CUDA. `engine_args` go to
        `vllm.LLM` (e.g. gpu_memory_utilization, max_model_len, tensor_parallel_size); the engine sets
        enable_prefix_caching, the model class, the worker extension and, on CPU, enforce_eager. device: None or
        the platform vLLM was built for ("cpu" or "cuda"); vLLM has no per-engine device choice. backend: taken
        for the HF engine's callers; the head's route inside vLLM is fixed (PyTorch on CPU, Triton on CUDA).
        """
        _check_backend(backend)
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"path: expected a model folder, got {path!r}")
        compat.check_device(device)
        head = SPRMHead.from_pretrained(path)  # fail here, not in the worker, on a missing or bad head
        llm = compat.make_llm(path, dtype=dtype, **engine_args)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = compat.text_config(llm)
        if head.hidden_size != config.hidden_size:
            raise ValueError(f"head: expected hidden size H={config.hidden_size}, got a head with H={head.hidden_size}")
        return cls(llm, tokenizer, path=path, hidden_size=config.hidden_size,
                   num_layers=config.num_hidden_layers, lang=lang, vocab_size=config.vocab_size)  # fmt: skip

    # -- the engine interface (engine.py) ---------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="vllm",
            model_name=os.path.basename(self.path.rstrip("/")),
            path=self.path,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            context_length=self.context_length,
            device=self._device,
            dtype=self._dtype,
            backend="auto",
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts)

    def prompt_ids(self, prompt_or_messages) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt_or_messages)

    def close(self) -> None:
        """Stop vLLM's engine process now (it also stops at exit)."""
        compat.shutdown(self.llm)

    # -- scoring ----------------------------------------------------------------------------------------------

    def score(
        self, texts_or_token_ids, *, return_all_scores: bool = False, batch_tokens: int = 16384
    ) -> ScoreResult | list[ScoreResult]:
        """SPRM scores of texts (tokenized without special tokens) or token id lists, as `ReflectiveModel.score`.
        All sequences go to vLLM at once (its scheduler batches them; `batch_tokens` is checked, then unused)."""
        sequences, single = token_lists(self.tokenizer, texts_or_token_ids, self.vocab_size)  # the HF engine's errors
        check_batch_tokens(batch_tokens)
        self._check_lengths(sequences, "texts_or_token_ids", extra=1)
        results = self._score_sequences(sequences, return_all_scores)
        return results[0] if single else results

    def _score_sequences(self, sequences: list[list[int]], return_all_scores: bool) -> list[ScoreResult]:
        todo = [i for i, s in enumerate(sequences) if s]
        if not todo:
            return [ScoreResult(0.0, [] if return_all_scores else None, list(s), []) for s in sequences]
        positions = self._scored_positions([sequences[i] for i in todo])
        keys = [self._new_key() for _ in todo]
        requests = [
            (sequences[i], compat.sampling_params(max_tokens=1, temperature=0.0, extra_args={EXTRA_KEY: key},
                                                  skip_prefix_cache=True))
            for i, key in zip(todo, keys, strict=True)
        ]  # fmt: skip
        try:
            compat.run(self.llm, requests, progress=False)
            logits = compat.fetch(self.llm, dict(zip(keys, positions, strict=True)))
        finally:
            compat.drop(self.llm, keys)
        results = [ScoreResult(0.0, [] if return_all_scores else None, list(s), []) for s in sequences]
        for i, key, wanted in zip(todo, keys, positions, strict=True):
            values, _ = logits[key]
            if any(v is None for v in values):
                raise RuntimeError(f"sprm: the worker has no step logit for some positions of sequence {i}")
            value, probs = _score(values)
            results[i] = ScoreResult(value, probs if return_all_scores else None, list(sequences[i]), wanted)
        return results

    def _scored_positions(self, sequences: list[list[int]]) -> list[list[int]]:
        """docs/method.md §3 on each whole sequence, on the host (the PyTorch route)."""
        return scored_positions(
            sequences, step_token_ids=self.step_token_ids, think_start_id=self.think_start_id,
            think_end_id=self.think_end_id, backend="torch",
        )  # fmt: skip

    def _check_lengths(self, sequences, name: str, extra: int) -> None:
        limit = self.context_length
        for i, sequence in enumerate(sequences):
            if limit is not None and len(sequence) + extra > limit:
                raise ValueError(
                    f"{name}: item {i} has {len(sequence)} tokens; the model takes at most {limit - extra} here "
                    f"(its context is {limit} tokens)"
                )

    @staticmethod
    def _new_key() -> str:
        return uuid.uuid4().hex

    # -- generation -------------------------------------------------------------------------------------------

    def generate(
        self, prompt_or_prompts, *, progress: bool = False, backend: str | None = None, **options
    ) -> GenerationResult | list[GenerationResult]:
        """Best-of-k reflective generation, as `ReflectiveModel.generate` (same options: the fields of
        `GenerationParams`; same results and choice rule).

        A prompt (a string or a list of {"role", "content"} messages) gives one `GenerationResult`; a list of
        prompts gives a list, all of them generated together. Sampling is vLLM's: for a fixed `seed` the results are
        reproducible on one machine and vLLM version, but they differ from the HF engine's samples.
        `stats` of each result count that prompt's tokens; `stats.seconds` are the whole call's phases.
        """
        params = params_from(GenerationParams, "generate", options)
        _check_backend(backend)
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected a bool, got {progress!r}")
        single = isinstance(prompt_or_prompts, str) or (
            isinstance(prompt_or_prompts, (list, tuple))
            and bool(prompt_or_prompts)
            and all(isinstance(m, dict) for m in prompt_or_prompts)
        )
        prompts = [prompt_or_prompts] if single else prompt_or_prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(
                "prompt_or_messages: expected a prompt string, a list of {'role', 'content'} dicts, or a non-empty "
                f"list of those, got {type(prompt_or_prompts).__name__}"
            )
        prompt_ids = [chat_prompt_ids(self.tokenizer, p) for p in prompts]
        self._check_lengths(prompt_ids, "prompt_or_messages", extra=1)
        results = self._generate(prompt_ids, params, progress)
        return results[0] if single else results

    def _generate(self, prompt_ids: list[list[int]], params: GenerationParams, progress: bool):
        """All rows go in at once; as soon as a prompt's k rows are done its candidates are scored, chosen and its
        answer request goes in, while other prompts still think (vLLM batches them all continuously)."""
        k, n = params.num_candidates, len(prompt_ids)
        clock = time.perf_counter()
        seconds = {"think": 0.0, "select": 0.0}
        keys = [[self._new_key() for _ in range(k)] for _ in range(n)]
        outputs = [[None] * k for _ in range(n)]
        waiting, candidates, best = [k] * n, [None] * n, [None] * n
        answers, deferred = {}, []
        stepper = compat.Stepper(self.llm, progress)
        try:
            rows = [(p, j) for p in range(n) for j in range(k)]
            thinking = dict(zip(stepper.add([self._think_request(prompt_ids[p], params, p, j, keys[p][j])
                                            for p, j in rows]), rows, strict=True))  # fmt: skip
            answering = {}
            while stepper.busy():
                done = []
                for request_id, out in stepper.step():
                    if request_id in answering:
                        answers[answering[request_id]] = out
                        continue
                    p, j = thinking[request_id]
                    outputs[p][j] = out
                    waiting[p] -= 1
                    done += [p] if not waiting[p] else []
                if not done:
                    continue
                if not any(waiting):
                    seconds["think"] = time.perf_counter() - clock
                tick = time.perf_counter()
                self._select(done, prompt_ids, outputs, keys, params, candidates, best)
                deferred += [p for p in done if candidates[p] is None]
                ready = [p for p in done if candidates[p] is not None]
                requests = self._answer_requests(ready, prompt_ids, candidates, best, params)
                answering.update(zip(stepper.add([r for _, r in requests]), [row for row, _ in requests], strict=True))
                seconds["select"] += time.perf_counter() - tick
        finally:
            compat.drop(self.llm, [key for row in keys for key in row])
        if deferred:  # scored prompt positions the prefix cache served: prefill-only scoring, then the answers
            tick = time.perf_counter()
            self._select(deferred, prompt_ids, outputs, keys, params, candidates, best, rescore=True)
            requests = self._answer_requests(deferred, prompt_ids, candidates, best, params)
            answers.update(
                zip([row for row, _ in requests], compat.run(self.llm, [r for _, r in requests]), strict=True)
            )
            seconds["select"] += time.perf_counter() - tick
        seconds["answer"] = time.perf_counter() - clock - seconds["think"] - seconds["select"]
        return [self._result(p, prompt_ids[p], outputs[p], candidates[p], best[p], answers, params, seconds)
                for p in range(n)]  # fmt: skip

    def _think_request(self, prompt, params: GenerationParams, p: int, j: int, key: str):
        sampling = compat.sampling_params(
            max_tokens=params.max_think_tokens, temperature=params.temperature, top_p=params.top_p,
            seed=_row_seed(params.seed, p, j, params.num_candidates), stop_token_ids=[self.think_end_id],
            ignore_eos=True, extra_args={EXTRA_KEY: key, EXTRA_FEATURES: params.return_features},
        )  # fmt: skip
        return prompt, sampling

    def _select(self, prompts, prompt_ids, outputs, keys, params, candidates, best, rescore=False) -> None:
        """Candidates and choice of each prompt in `prompts` (written into `candidates`, `best`), from the logits the
        worker kept at exactly the positions the rule scores. A prompt with a scored position that the prefix
        cache served (no logit) is left None unless `rescore`, which scores its rows by prefill-only requests."""
        rows = [(p, j) for p in prompts for j in range(params.num_candidates)]
        sequences = [prompt_ids[p] + list(outputs[p][j].token_ids) for p, j in rows]
        positions = self._scored_positions(sequences)
        wanted = {keys[p][j]: where for (p, j), where in zip(rows, positions, strict=True)}
        fetched = {} if rescore else compat.fetch(self.llm, wanted, features=params.return_features)
        if rescore:
            if params.return_features:
                raise RuntimeError("sprm: return_features with scored prompt positions served by the prefix cache")
            scored = self._score_sequences(sequences, True)
        by_prompt = {p: [] for p in prompts}
        for i, ((p, j), sequence, where) in enumerate(zip(rows, sequences, positions, strict=True)):
            if rescore:
                value, probs = scored[i].value, scored[i].all_scores
                features = None
            else:
                values, features = fetched[keys[p][j]]
                if any(v is None for v in values):
                    by_prompt[p] = None
                if by_prompt[p] is None:
                    continue
                value, probs = _score(values)
                if params.return_features:
                    rows_h = torch.tensor(features, dtype=torch.float32).reshape(len(where), self.hidden_size)
                    features = rows_h.to(compat.torch_dtype(self._dtype))
            response = sequence[len(prompt_ids[p]) :]
            by_prompt[p].append(
                Candidate(
                    token_ids=response,
                    text=self.tokenizer.decode(response, skip_special_tokens=False),
                    score=value,
                    step_scores=probs,
                    score_positions=where,
                    finished=bool(response) and response[-1] == self.think_end_id,
                    step_features=features,
                )
            )
        for p, cs in by_prompt.items():
            candidates[p] = cs
            if cs is not None:
                best[p] = choose_best([c.score for c in cs], [c.finished for c in cs])

    def _answer_requests(self, prompts, prompt_ids, candidates, best, params):
        """((prompt, row), request) of each answer to write: the chosen row's, or every row's with answer_all."""
        if params.max_answer_tokens == 0:
            return []
        requests = []
        for p in prompts:
            for j, candidate in enumerate(candidates[p]):
                if not (params.answer_all or j == best[p]):
                    continue
                ids = prompt_ids[p] + candidate.token_ids + ([] if candidate.finished else [self.think_end_id])
                sampling = compat.sampling_params(
                    max_tokens=params.max_answer_tokens, temperature=params.answer_sampling_temperature,
                    top_p=params.top_p, seed=_row_seed(params.seed, p, j, params.num_candidates, answer=True),
                    stop_token_ids=self.eos_token_ids,
                )  # fmt: skip
                requests.append(((p, j), (ids, sampling)))
        return requests

    def _result(self, p, prompt, outs, cs, best, answers, params, seconds) -> GenerationResult:
        answer_fed = answer_cached = 0
        for j, candidate in enumerate(cs):
            out = answers.get((p, j))
            ids = [] if out is None else list(out.token_ids)
            if out is not None:
                fed = len(prompt) + len(candidate.token_ids) + (0 if candidate.finished else 1)
                answer_fed += fed - out.num_cached_tokens + max(len(ids) - 1, 0)
                answer_cached += out.num_cached_tokens
            if params.answer_all:
                candidate.answer_token_ids = ids
                candidate.answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        chosen = answers.get((p, best))
        chosen_ids = [] if chosen is None else list(chosen.token_ids)
        stats = GenerationStats(
            prefill_tokens=sum(len(prompt) - o.num_cached_tokens for o in outs),
            think_decode_tokens=sum(max(len(c.token_ids) - 1, 0) for c in cs),
            think_generated_tokens=sum(len(c.token_ids) for c in cs),
            answer_decode_tokens=answer_fed,
            seconds=dict(seconds),
            answer_cached_tokens=answer_cached,
        )
        return GenerationResult(
            candidates=cs,
            best=best,
            answer=self.tokenizer.decode(chosen_ids, skip_special_tokens=True),
            answer_token_ids=chosen_ids,
            prompt_token_ids=prompt,
            stats=stats,
        )


def _score(logits: list[float]) -> tuple[float, list[float]]:
    """(score, step probabilities) from the head's logits at the scored positions, in fp32 as `sprm_score`."""
    if not logits:
        return 0.0, []
    z = torch.tensor(logits, dtype=torch.float32)
    return clamped_log_sigmoid(z).mean().exp().item(), torch.sigmoid(z).tolist()


def _row_seed(seed: int | None, prompt: int, row: int, k: int, *, answer: bool = False) -> int | None:
    """Each request's own seed: distinct rows sample differently; None stays unseeded."""
    if seed is None:
        return None
    return (seed * 1_000_003 + 2 * (prompt * k + row) + int(answer)) % (2**63)


def _check_backend(backend) -> None:
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"backend: expected None, 'auto', 'torch' or 'triton', got {backend!r}")
