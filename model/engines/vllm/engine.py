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

import sprm_kernels.model.engines.vllm.compat as compat
import sprm_kernels.model.engines.vllm.rows as rows_
import sprm_kernels.model.engines.vllm.search as search_
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.params import GenerationParams, params_from, search_options
from sprm_kernels.model.core.progress import progress_bar
from sprm_kernels.model.core.steps import prompt_step_positions
from sprm_kernels.model.core.tokens import LANGS, chat_prompt_ids
from sprm_kernels.model.core.types import GenerationResult, ScoreResult
from sprm_kernels.model.engines.base import EngineInfo
from sprm_kernels.model.engines.common import (
    check_batch_tokens,
    encode_texts,
    prompt_token_ids,
    rule_token_ids,
    token_lists,
)


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
        self.rules = rows_.RowRules(tokenizer, self.think_start_id, self.think_end_id, tuple(self.step_token_ids),
                                    tuple(self.eos_token_ids), hidden_size, self._dtype)  # fmt: skip
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
        positions = rows_.positions_of(self.rules, [sequences[i] for i in todo])
        keys = [self._new_key() for _ in todo]
        try:
            compat.run(self.llm, [rows_.score_request(sequences[i], key) for i, key in zip(todo, keys, strict=True)])
            logits = compat.fetch(self.llm, dict(zip(keys, positions, strict=True))) if todo else {}
        finally:
            compat.drop(self.llm, keys)
        return rows_.score_results(sequences, todo, positions, [logits[key] for key in keys], return_all_scores)

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
        answers, deferred = [{} for _ in range(n)], []
        stepper = compat.Stepper(self.llm, progress)
        pruning = rows_.Pruning(params, n)
        if pruning.keeps_confidence:
            compat.start_confidence(self.llm)
        try:
            # With confidence pruning only the warm-up rows go in first; the others once those are done.
            rows = [(p, j) for p in range(n) for j in range(pruning.warmup)]
            think = [(prompt_ids[p], rows_.think_sampling(self.rules, params, p, j, keys[p][j])) for p, j in rows]
            thinking = dict(zip(stepper.add(think), rows, strict=True))
            request_of = {row: request_id for request_id, row in thinking.items()}
            answering, steps, launched, stopped = {}, 0, [pruning.warmup == k] * n, set()
            while stepper.busy() or stopped:  # stopped: rows aborted whose fed tokens the next poll reads
                done, touched = [], set()
                for request_id, out in stepper.step() if stepper.busy() else ():
                    if request_id in answering:
                        p, j = answering[request_id]
                        answers[p][j] = out
                        continue
                    row = thinking.pop(request_id, None)
                    if row is None:  # a pruned row that finished in the step its abort was sent: it stays pruned
                        continue
                    p, j = row
                    outputs[p][j] = out
                    waiting[p] -= 1
                    done += [p] if not waiting[p] else []
                    touched.add(p)
                ready = [p for p in sorted(touched) if not launched[p]
                         and all(outputs[p][j] is not None for j in range(pruning.warmup))]  # fmt: skip
                if ready:  # DeepConf online: the threshold from the warm-up rows, then the other rows
                    warm = [keys[p][j] for p in ready for j in range(pruning.warmup)]
                    states = compat.confidence(self.llm, warm, params.confidence_window)
                    rest = [(p, j) for p in ready for j in range(pruning.warmup, k)]
                    for p in ready:
                        pruning.set_threshold(p, keys[p], states)
                        launched[p] = True
                    more = [
                        (prompt_ids[p], rows_.think_sampling(self.rules, params, p, j, keys[p][j])) for p, j in rest
                    ]
                    added = dict(zip(stepper.add(more), rest, strict=True))
                    thinking.update(added)
                    request_of.update({row: request_id for request_id, row in added.items()})
                steps += 1
                if pruning.on and (thinking or stopped) and (steps % params.prune_poll == 0 or not stepper.busy()):
                    done += self._prune(pruning, thinking, request_of, keys, prompt_ids, outputs, waiting, stopped)
                if not done:
                    continue
                if not any(waiting):
                    seconds["think"] = time.perf_counter() - clock
                tick = time.perf_counter()
                self._select(done, prompt_ids, outputs, keys, params, candidates, best, pruning)
                deferred += [p for p in done if candidates[p] is None]
                requests = self._answer_requests([p for p in done if candidates[p] is not None], prompt_ids,
                                                 candidates, best, params)  # fmt: skip
                answering.update(zip(stepper.add([r for _, r in requests]), [row for row, _ in requests], strict=True))
                seconds["select"] += time.perf_counter() - tick
        finally:
            compat.drop(self.llm, [key for row in keys for key in row])
        if deferred:  # scored prompt positions the prefix cache served: prefill-only scoring, then the answers
            tick = time.perf_counter()
            self._select(deferred, prompt_ids, outputs, keys, params, candidates, best, pruning, rescore=True)
            requests = self._answer_requests(deferred, prompt_ids, candidates, best, params)
            for (p, j), out in zip([row for row, _ in requests], compat.run(self.llm, [r for _, r in requests]),
                                   strict=True):  # fmt: skip
                answers[p][j] = out
            seconds["select"] += time.perf_counter() - tick
        seconds["answer"] = time.perf_counter() - clock - seconds["think"] - seconds["select"]
        return [
            rows_.result_of(self.rules, params, prompt_ids[p], outputs[p], candidates[p], best[p], answers[p], seconds)
            for p in range(n)
        ]

    def _prune(self, pruning, thinking, request_of, keys, prompt_ids, outputs, waiting, stopped) -> list[int]:
        """One read (`compat.poll`): the fed tokens of the rows stopped at the previous poll, which are done now, and
        the running scores (or confidence) of the rows still decoding; the rows the rule prunes now are aborted in
        vLLM (their KV blocks are freed) and join `stopped`. Returns the prompts whose rows are all done now."""
        still = {}  # prompt -> rows still decoding
        for p, j in thinking.values():
            still.setdefault(p, set()).add(j)
        k = len(keys[0])
        wanted = [keys[p][j] for p in still for j in range(k) if not pruning.pruned[p][j]]
        window = pruning.params.confidence_window if pruning.confidence else 0
        read = compat.poll(self.llm, wanted, {keys[p][j]: len(prompt_ids[p]) for p, j in stopped}, window)
        done = []
        for p, j in sorted(stopped):
            outputs[p][j] = rows_.StoppedRow(*read["stopped"][keys[p][j]])
            waiting[p] -= 1
            done += [p] if not waiting[p] else []
        stopped.clear()
        for p, decoding in sorted(still.items()):
            running = [j in decoding for j in range(k)]
            if pruning.confidence:
                stop = pruning.decide_by_confidence(p, keys[p], running, read["confidence"])
            else:
                stop = pruning.decide(p, keys[p], running, read["running"])
            stopped.update((p, j) for j in stop)
        if stopped:
            compat.abort(self.llm, [request_of[row] for row in stopped])
            for row in stopped:
                thinking.pop(request_of[row], None)
        return done

    def _select(self, prompts, prompt_ids, outputs, keys, params, candidates, best, pruning, rescore=False) -> None:
        """Candidates and choice of each prompt in `prompts` (written into `candidates`, `best`), from the logits the
        worker kept at exactly the positions the rule scores. A prompt with a scored position that the prefix
        cache served (no logit) is left None unless `rescore`, which scores its rows by prefill-only requests."""
        k = params.num_candidates
        rows = [(p, j) for p in prompts for j in range(k)]
        sequences = [prompt_ids[p] + list(outputs[p][j].token_ids) for p, j in rows]
        positions = rows_.positions_of(self.rules, sequences)
        if rescore:
            if params.return_features:
                raise RuntimeError("sprm: return_features with scored prompt positions served by the prefix cache")
            scored = self._score_sequences(sequences, True)
        else:
            wanted = {keys[p][j]: where for (p, j), where in zip(rows, positions, strict=True)}
            if params.return_confidence:  # before the fetch, which drops the records
                confidence = compat.confidence(self.llm, list(wanted), params.confidence_window)
            by_key = compat.fetch(self.llm, wanted, features=params.return_features)
            fetched = [by_key[keys[p][j]] for p, j in rows]
        for i, p in enumerate(prompts):
            lo, hi = i * k, (i + 1) * k
            responses = [sequences[r][len(prompt_ids[p]) :] for r in range(lo, hi)]
            if rescore:  # the scored probabilities, as logits would give them: exact scores from the prefill
                picked = zip(responses, positions[lo:hi], scored[lo:hi], strict=True)
                cs = [
                    rows_.candidate(self.rules, response, where, s.value, s.all_scores) for response, where, s in picked
                ]
            else:
                cs = rows_.candidates_from_logits(self.rules, responses, positions[lo:hi], fetched[lo:hi])
            candidates[p] = cs
            if cs is not None and params.return_confidence:
                pruning.attach_confidence(cs, keys[p], {} if rescore else confidence)
            if cs is not None:
                pruning.mark(p, cs)
                best[p] = rows_.choose(cs)

    def _answer_requests(self, prompts, prompt_ids, candidates, best, params):
        """((prompt, row), request) of each answer to write: the chosen row's, or every row's with answer_all."""
        requests = []
        for p in prompts:
            answers = rows_.answer_requests(self.rules, params, p, prompt_ids[p], candidates[p], best[p])
            requests += [((p, j), request) for j, request in answers]
        return requests

    # -- step-level search (engines.base.SupportsSearch) ------------------------------------------------------

    def search(self, prompt_or_messages, *, progress: bool = False, backend: str | None = None, **options):
        """Step-level beam search or DVTS guided by the step scores, as `ReflectiveModel.search` (same options:
        method="beam" | "dvts", beam_width, expansions, aggregate, and generate's sampling options; same result
        contract: the candidates are the finished beams). Rounds are vLLM requests that stop at a step token;
        survivors are forked through the prefix cache (`search.py`). `stats.seconds`: "think" (the rounds),
        "engine" (the part of "think" inside vLLM's calls), "select" (the candidates, the choice), "answer"."""
        shape, params = search_options(options)
        _check_backend(backend)
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected a bool, got {progress!r}")
        prompt = chat_prompt_ids(self.tokenizer, prompt_or_messages)
        self._check_lengths([prompt], "prompt_or_messages", extra=1)
        clock = time.perf_counter()
        engine_seconds = [0.0]

        def timed(call):
            def run(*args):
                start = time.perf_counter()
                try:
                    return call(*args)
                finally:
                    engine_seconds[0] += time.perf_counter() - start

            return run

        submit = timed(lambda requests: compat.run(self.llm, requests))
        fetch = timed(lambda wanted: compat.fetch(self.llm, wanted))
        search = search_.RoundSearch(self.rules, prompt, shape, params, self._prompt_logits(prompt, submit, fetch))
        bar = progress_bar(None, f"{shape.method} search", progress, leave=False)
        try:
            search_.run_rounds(search, submit, fetch, self._new_key, bar)
        except BaseException:  # each fetch dropped its records; a request cut short may have left some
            compat.drop(self.llm, search.keys)
            raise
        finally:
            if bar is not None:
                bar.close()
        think_seconds = time.perf_counter() - clock
        unscored = search.unscored()
        rescored = dict(zip(unscored, self._score_sequences(search.sequences(unscored), True), strict=True))
        candidates = search.candidates(rescored)
        best = rows_.choose(candidates)
        requests = rows_.answer_requests(self.rules, params, 0, prompt, candidates, best)
        answer_start = time.perf_counter()
        outs = compat.run(self.llm, [request for _, request in requests])
        seconds = {"think": think_seconds, "engine": engine_seconds[0], "select": answer_start - clock - think_seconds,
                   "answer": time.perf_counter() - answer_start}  # fmt: skip
        return search_.search_result(search, candidates, best, outs[0] if outs else None, seconds)

    def _prompt_logits(self, prompt: list[int], submit, fetch) -> dict[int, float]:
        """Head logits at the prompt positions a final rule could score, by one prefill-only request (none
        usually: the prompt precedes `<think>`)."""
        positions = prompt_step_positions(prompt, self.rules.step_token_ids, self.rules.think_start_id)
        if not positions:
            return {}
        key = self._new_key()
        try:
            submit([rows_.score_request(prompt, key)])
            logits = fetch({key: positions})[key][0]  # the fetch drops the record
        except BaseException:
            compat.drop(self.llm, [key])
            raise
        return {t: z for t, z in zip(positions, logits, strict=True) if z is not None}


def _check_backend(backend) -> None:
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"backend: expected None, 'auto', 'torch' or 'triton', got {backend!r}")
