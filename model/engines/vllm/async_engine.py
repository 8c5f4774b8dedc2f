"""`AsyncVLLMReflectiveModel`: the vLLM engine on vLLM's asynchronous engine (`AsyncLLM`), for servers.

Every call, from any number of concurrent callers, puts its requests into one continuously batched engine: a
generation's k thinking rows (one request per row, its own seed), then its answer, share the engine's batches with
every other call's rows, answers and scoring requests. Nothing waits on a lock. The choice rule, the scores and
the results are the synchronous engine's (`rows.py`): for one prompt and a fixed seed both engines give the same
rows (every request carries its own seed), so the same result.

The `AsyncLLM` lives on an event loop of its own, in a daemon thread (`EngineLoop`): its client's sockets belong
to the loop that made it, and this way any loop (a server's, a test's) or plain synchronous code can call it.
Cancelling a call (its task, or the caller of an `agenerate`) cancels the call's task on the engine loop, which
aborts every request of the call in vLLM and drops the worker's records of them.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import sprm_kernels.model.engines.vllm.compat as compat
import sprm_kernels.model.engines.vllm.rows as rows_
import sprm_kernels.model.engines.vllm.search as search_
from sprm_kernels.model.core.head import SPRMHead
from sprm_kernels.model.core.params import GenerationParams, params_from, search_options
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
from sprm_kernels.model.engines.vllm.engine_loop import EngineLoop


class AsyncVLLMReflectiveModel:
    """The policy and its SPRM head on one `AsyncLLM`; async methods for servers, and the synchronous Engine face.

    >>> rm = AsyncVLLMReflectiveModel.from_pretrained("path/to/model")
    >>> result = await rm.agenerate("What is 2+3?", mode="low", seed=0)   # from any event loop
    >>> rm.generate("What is 2+3?", mode="low", seed=0)                    # or from synchronous code
    """

    def __init__(self, engine, engine_loop: EngineLoop, tokenizer, *, path: str, hidden_size: int, num_layers: int,
                 lang: str = "en", vocab_size: int | None = None):  # fmt: skip
        if lang not in LANGS:
            raise ValueError(f"lang: expected one of {LANGS}, got {lang!r}")
        self.engine, self.engine_loop, self.tokenizer = engine, engine_loop, tokenizer
        self.path, self.lang = path, lang
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.vocab_size = len(tokenizer) if vocab_size is None else vocab_size
        self.think_start_id, self.think_end_id, self.step_token_ids = rule_token_ids(tokenizer, lang)
        self.eos_token_ids = sorted(compat.eos_token_ids(path, tokenizer))
        self.context_length = compat.max_model_len(engine)
        self._dtype = compat.model_dtype(engine)
        self._device = compat.device_name()
        self.rules = rows_.RowRules(tokenizer, self.think_start_id, self.think_end_id, tuple(self.step_token_ids),
                                    tuple(self.eos_token_ids), hidden_size, self._dtype)  # fmt: skip
        engine_loop.call(compat.install_recorder_async(engine, self.step_token_ids, self.think_start_id))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, lang: str = "en", device: str | None = None,
                        backend: str | None = None, **engine_args) -> AsyncVLLMReflectiveModel:  # fmt: skip
        """As `VLLMReflectiveModel.from_pretrained`; `engine_args` go to vLLM's `AsyncEngineArgs`."""
        from transformers import AutoTokenizer

        if backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend: expected None, 'auto', 'torch' or 'triton', got {backend!r}")
        if not os.path.isdir(path):
            raise ValueError(f"path: expected a model folder, got {path!r}")
        compat.check_device(device)
        head = SPRMHead.from_pretrained(path)
        engine_loop = EngineLoop()

        async def make():
            return compat.make_async_llm(path, dtype=dtype, **engine_args)

        try:
            engine = engine_loop.call(make())
        except BaseException:
            engine_loop.stop()
            raise
        config = compat.text_config(engine)
        if head.hidden_size != config.hidden_size:
            engine.shutdown()
            engine_loop.stop()
            raise ValueError(f"head: expected hidden size H={config.hidden_size}, got a head with H={head.hidden_size}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(engine, engine_loop, tokenizer, path=path, hidden_size=config.hidden_size,
                   num_layers=config.num_hidden_layers, lang=lang, vocab_size=config.vocab_size)  # fmt: skip

    # -- the engine interface (engines.base) -------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(engine="vllm", model_name=os.path.basename(self.path.rstrip("/")), path=self.path,
                          hidden_size=self.hidden_size, num_layers=self.num_layers,
                          context_length=self.context_length, device=self._device, dtype=self._dtype,
                          backend="auto")  # fmt: skip

    def encode(self, texts: list[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts)

    def prompt_ids(self, prompt_or_messages) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt_or_messages)

    def score(self, texts_or_token_ids, *, return_all_scores: bool = False, batch_tokens: int = 16384):
        """As `VLLMReflectiveModel.score`, from synchronous code."""
        sequences, single = self._score_inputs(texts_or_token_ids, batch_tokens)
        results = self.engine_loop.call(self._score(sequences, return_all_scores))
        return results[0] if single else results

    def generate(self, prompt_or_messages, *, progress: bool = False, backend: str | None = None, **options):
        """As `VLLMReflectiveModel.generate` for one prompt, from synchronous code."""
        prompt, params = self._generation_inputs(prompt_or_messages, progress, backend, options)
        return self.engine_loop.call(self._generate(prompt, params))

    def close(self) -> None:
        """Stop vLLM's engine process and the engine loop."""
        engine, self.engine = self.engine, None
        if engine is not None:
            self.engine_loop.cancel_tasks()  # first: vLLM's output handler would log the shutdown as an engine failure
            engine.shutdown()  # now, not again at exit (vLLM's __del__ fails when run during interpreter shutdown)
            del engine
        self.engine_loop.stop()

    # -- the async interface (engines.base.SupportsAsync) ------------------------------------------------------

    async def ascore(self, texts_or_token_ids, *, return_all_scores: bool = False, batch_tokens: int = 16384):
        """`score` from an event loop; its requests share the engine's batches with everything else running."""
        sequences, single = self._score_inputs(texts_or_token_ids, batch_tokens)
        results = await self.engine_loop.run(self._score(sequences, return_all_scores))
        return results[0] if single else results

    async def agenerate(self, prompt_or_messages, **options) -> GenerationResult:
        """`generate` of one prompt from an event loop. Cancelling the caller aborts all of its rows."""
        prompt, params = self._generation_inputs(prompt_or_messages, False, None, options)
        return await self.engine_loop.run(self._generate(prompt, params))

    async def astream(self, prompt_or_messages, **options) -> AsyncIterator[tuple]:
        """`agenerate` with its progress as events: `("reasoning", candidates, best)` once the k rows are scored
        and one is chosen, `("answer", token_ids)` (cumulative, the chosen answer so far) while it is decoded,
        and last `("result", GenerationResult)`. Leaving the iteration early aborts the generation."""
        prompt, params = self._generation_inputs(prompt_or_messages, False, None, options)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def send(event) -> None:  # called on the engine loop
            loop.call_soon_threadsafe(events.put_nowait, event)

        async def work():
            try:
                send(("result", await self._generate(prompt, params, send)))
            except BaseException as error:
                send(("error", error))
                raise

        runner = asyncio.ensure_future(self.engine_loop.run(work()))
        try:
            while True:
                event = await events.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "result":
                    return
        finally:
            # leaving early aborts the generation, and returns once its requests are aborted and records dropped
            runner.cancel()
            await asyncio.wait({runner})
            if not runner.cancelled():
                runner.exception()  # retrieved (it was raised above, as the "error" event)

    def search(self, prompt_or_messages, *, progress: bool = False, backend: str | None = None, **options):
        """`asearch` from synchronous code (`engines.base.SupportsSearch`)."""
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected a bool, got {progress!r}")
        if backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend: expected None, 'auto', 'torch' or 'triton', got {backend!r}")
        prompt, shape, params = self._search_inputs(prompt_or_messages, options)
        return self.engine_loop.call(self._search(prompt, shape, params))

    async def asearch(self, prompt_or_messages, **options) -> GenerationResult:
        """Step-level beam search or DVTS, as `VLLMReflectiveModel.search` (same options and result), from an event
        loop: each row's round requests share the engine's batches with every other call. Cancelling the caller
        aborts the search's requests and drops their records."""
        prompt, shape, params = self._search_inputs(prompt_or_messages, options)
        return await self.engine_loop.run(self._search(prompt, shape, params))

    async def engine_state(self) -> dict:
        """{"unfinished_requests": requests vLLM holds, "records": step-logit records the worker holds}: both 0
        when nothing runs (what the tests of cancellation check)."""

        async def state():
            return {"unfinished_requests": compat.unfinished_requests(self.engine),
                    "records": await compat.drop_async(self.engine, [])}  # fmt: skip

        return await self.engine_loop.run(state())

    async def _forget(self, request_ids: list[str], keys: list[str]) -> None:
        await compat.abort_async(self.engine, request_ids)
        await compat.drop_async(self.engine, keys)

    async def pause(self) -> None:
        """Stop scheduling: requests already in the engine, and new ones, wait (for maintenance, and for tests that
        need requests to stay in flight) until `resume`."""
        await self.engine_loop.run(compat.pause_async(self.engine))

    async def resume(self) -> None:
        await self.engine_loop.run(compat.resume_async(self.engine))

    # -- on the engine loop ------------------------------------------------------------------------------------

    def _score_inputs(self, texts_or_token_ids, batch_tokens):
        sequences, single = token_lists(self.tokenizer, texts_or_token_ids, self.vocab_size)
        check_batch_tokens(batch_tokens)
        self._check_lengths(sequences, "texts_or_token_ids", extra=1)
        return sequences, single

    def _generation_inputs(self, prompt_or_messages, progress, backend, options):
        params = params_from(GenerationParams, "generate", options)
        if backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"backend: expected None, 'auto', 'torch' or 'triton', got {backend!r}")
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected a bool, got {progress!r}")
        # chat_prompt_ids checks the prompt: a string, a TextPrompt, or a list of {"role", "content"} messages
        prompt = chat_prompt_ids(self.tokenizer, prompt_or_messages)
        self._check_lengths([prompt], "prompt_or_messages", extra=1)
        return prompt, params

    def _search_inputs(self, prompt_or_messages, options):
        shape, params = search_options(options)
        prompt = chat_prompt_ids(self.tokenizer, prompt_or_messages)
        self._check_lengths([prompt], "prompt_or_messages", extra=1)
        return prompt, shape, params

    def _check_lengths(self, sequences, name: str, extra: int) -> None:
        for i, sequence in enumerate(sequences):
            if len(sequence) + extra > self.context_length:
                limit = self.context_length
                raise ValueError(f"{name}: item {i} has {len(sequence)} tokens; the model takes at most "
                                 f"{limit - extra} here (its context is {limit} tokens)")  # fmt: skip

    async def _score(self, sequences: list[list[int]], return_all_scores: bool) -> list[ScoreResult]:
        todo = [i for i, s in enumerate(sequences) if s]
        positions = rows_.positions_of(self.rules, [sequences[i] for i in todo])
        keys = [uuid.uuid4().hex for _ in todo]
        try:
            await asyncio.gather(*(compat.final_output(self.engine, *rows_.score_request(sequences[i], key), key)
                                   for i, key in zip(todo, keys, strict=True)))  # fmt: skip
            logits = await compat.fetch_async(self.engine, dict(zip(keys, positions, strict=True))) if todo else {}
        finally:
            await compat.drop_async(self.engine, keys)
        return rows_.score_results(sequences, todo, positions, [logits[key] for key in keys], return_all_scores)

    async def _think(self, prompt: list[int], params: GenerationParams, keys: list[str], pruning) -> list:
        """The k thinking rows (one request each, the request id its record's key) until each is done. With pruning
        on, the running step scores are read every `prune_poll` outputs per running row, and the rows the
        rule stops are aborted (their KV freed); their outputs are then what they fed (`rows_.StoppedRow`, read once
        all rows are done)."""
        running, stopped = [True] * len(keys), set()
        progress, outputs = asyncio.Event(), [0]

        def count(_completion) -> None:
            outputs[0] += 1
            progress.set()

        async def row(j: int, key: str):
            sampling = rows_.think_sampling(self.rules, params, 0, j, key)
            try:
                return await compat.final_output(self.engine, prompt, sampling, key, count if pruning.on else None)
            finally:
                running[j] = False
                progress.set()

        async def prune() -> None:
            while any(running):
                await progress.wait()
                progress.clear()
                if outputs[0] < params.prune_poll * sum(running):
                    continue
                outputs[0] = 0
                wanted = [key for j, key in enumerate(keys) if not pruning.pruned[0][j]]
                window = params.confidence_window if pruning.confidence else 0
                read = await compat.poll_async(self.engine, wanted, {}, window)
                if pruning.confidence:
                    stop = pruning.decide_by_confidence(0, keys, list(running), read["confidence"])
                else:
                    stop = pruning.decide(0, keys, list(running), read["running"])
                if stop:
                    await compat.abort_async(self.engine, [keys[j] for j in stop])
                    stopped.update(stop)

        thinks = []
        if pruning.keeps_confidence:
            await compat.start_confidence_async(self.engine)
        if pruning.confidence:  # the warm-up rows run first, to the end, and set the threshold
            if pruning.warmup < len(keys):
                thinks = list(await asyncio.gather(*(row(j, keys[j]) for j in range(pruning.warmup))))
                states = await compat.confidence_async(self.engine, keys[: pruning.warmup], params.confidence_window)
                pruning.set_threshold(0, keys, states)
        start = len(thinks)
        running[start:] = [True] * (len(keys) - start)
        monitor = asyncio.ensure_future(prune()) if pruning.on else None
        try:
            thinks += await asyncio.gather(*(row(j, keys[j]) for j in range(start, len(keys))))
            if monitor is not None:
                await monitor
        finally:
            if monitor is not None and not monitor.done():
                monitor.cancel()
        if stopped:  # what the stopped rows fed, in one read once all rows are done
            read = await compat.poll_async(self.engine, [], {keys[j]: len(prompt) for j in stopped})
            thinks = [
                rows_.StoppedRow(*read["stopped"][keys[j]]) if j in stopped else out for j, out in enumerate(thinks)
            ]
        return thinks

    async def _generate(self, prompt: list[int], params: GenerationParams, send: Callable | None = None):
        """One prompt: its k rows at once; once all are done, the candidates from the kept logits, the choice, and
        the answer(s); `send` gets the events of `astream`."""
        k = params.num_candidates
        clock = time.perf_counter()
        keys = [uuid.uuid4().hex for _ in range(k)]
        answer_ids = [uuid.uuid4().hex for _ in range(k)]
        pruning = rows_.Pruning(params, 1)
        try:
            thinks = await self._think(prompt, params, keys, pruning)
            think_seconds = time.perf_counter() - clock
            responses = [list(out.token_ids) for out in thinks]
            sequences = [prompt + response for response in responses]
            positions = rows_.positions_of(self.rules, sequences)
            wanted = dict(zip(keys, positions, strict=True))
            confidence = {}
            if params.return_confidence:  # before the fetch, which drops the records
                confidence = await compat.confidence_async(self.engine, keys, params.confidence_window)
            by_key = await compat.fetch_async(self.engine, wanted, features=params.return_features)
            candidates = rows_.candidates_from_logits(self.rules, responses, positions, [by_key[key] for key in keys])
            await compat.drop_async(self.engine, keys)
            if candidates is None:  # scored prompt positions the prefix cache served: exact scores by prefill
                if params.return_features:
                    raise RuntimeError("sprm: return_features with scored prompt positions served by the prefix cache")
                scored = await self._score(sequences, True)
                candidates = [rows_.candidate(self.rules, response, where, s.value, s.all_scores)
                              for response, where, s in zip(responses, positions, scored, strict=True)]  # fmt: skip
            pruning.mark(0, candidates)
            if params.return_confidence:
                pruning.attach_confidence(candidates, keys, confidence)
            best = rows_.choose(candidates)
            select_seconds = time.perf_counter() - clock - think_seconds
            if send is not None:
                send(("reasoning", candidates, best))
            requests = rows_.answer_requests(self.rules, params, 0, prompt, candidates, best)

            def progress(j: int):
                if send is None or j != best:
                    return None
                return lambda completion: send(("answer", list(completion.token_ids)))

            outs = await asyncio.gather(*(
                compat.final_output(self.engine, ids, sampling, answer_ids[j], progress(j))
                for j, (ids, sampling) in requests
            ))  # fmt: skip
        except BaseException:
            # AsyncLLM aborts a cancelled request, but not one cancelled while it was being added: abort every
            # request of the call by its id (unknown or finished ids are ignored), then drop the records. Shielded,
            # so that a second cancellation cannot cut the clean-up short.
            await asyncio.shield(self._forget(keys + answer_ids, keys))
            raise
        answers = {j: out for (j, _), out in zip(requests, outs, strict=True)}
        seconds = {"think": think_seconds, "select": select_seconds}
        seconds["answer"] = time.perf_counter() - clock - think_seconds - select_seconds
        return rows_.result_of(self.rules, params, prompt, thinks, candidates, best, answers, seconds)

    async def _search(self, prompt: list[int], shape, params: GenerationParams) -> GenerationResult:
        """The search's rounds (`search.arun_rounds`), the candidates, the choice and the answer."""
        clock = time.perf_counter()
        engine_seconds = [0.0]

        def timed(call):
            async def run(*args):
                start = time.perf_counter()
                try:
                    return await call(*args)
                finally:
                    engine_seconds[0] += time.perf_counter() - start

            return run

        submit_one = timed(lambda ids, sampling, key: compat.final_output(self.engine, ids, sampling, key))
        fetch = timed(lambda wanted: compat.fetch_async(self.engine, wanted))
        search = search_.RoundSearch(self.rules, prompt, shape, params, await self._prompt_logits(prompt))
        answer_id = uuid.uuid4().hex
        try:
            await search_.arun_rounds(search, submit_one, fetch, lambda: uuid.uuid4().hex)
            think_seconds = time.perf_counter() - clock
            unscored = search.unscored()
            rescored = await self._score(search.sequences(unscored), True) if unscored else []
            candidates = search.candidates(dict(zip(unscored, rescored, strict=True)))
            best = rows_.choose(candidates)
            requests = rows_.answer_requests(self.rules, params, 0, prompt, candidates, best)
            answer_start = time.perf_counter()
            answer = None
            if requests:
                [(_, (ids, sampling))] = requests
                answer = await compat.final_output(self.engine, ids, sampling, answer_id)
        except BaseException:  # as _generate: every request aborted by id, every record dropped, shielded
            await asyncio.shield(self._forget(search.keys + [answer_id], search.keys))
            raise
        seconds = {"think": think_seconds, "engine": engine_seconds[0], "select": answer_start - clock - think_seconds,
                   "answer": time.perf_counter() - answer_start}  # fmt: skip
        return search_.search_result(search, candidates, best, answer, seconds)

    async def _prompt_logits(self, prompt: list[int]) -> dict[int, float]:
        """Head logits at the prompt positions a final rule could score, by one prefill-only request (none
        usually: the prompt precedes `<think>`)."""
        positions = prompt_step_positions(prompt, self.rules.step_token_ids, self.rules.think_start_id)
        if not positions:
            return {}
        key = uuid.uuid4().hex
        try:
            await compat.final_output(self.engine, *rows_.score_request(prompt, key), key)
            logits = (await compat.fetch_async(self.engine, {key: positions}))[key][0]  # the fetch drops the record
        except BaseException:
            await asyncio.shield(self._forget([key], [key]))
            raise
        return {t: z for t, z in zip(positions, logits, strict=True) if z is not None}
