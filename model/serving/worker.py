"""The model worker: one thread runs every model call, and queued score requests are batched dynamically.

- One worker thread owns the model: every model call (a scoring batch or a generation) runs there, one at a time
  (an asyncio lock on the event loop orders them), so the model is never used by two calls at once, and the event
  loop stays free to take requests meanwhile (torch releases the GIL inside its ops).
- Dynamic batching: a score request's token ids are queued. Once the model is free, a batching task takes the
  queued texts, in arrival order, while their tokens stay within `max_batch_tokens`, and scores them in one `score`
  call (which sorts them by length into forwards of at most `max_batch_tokens` padded tokens with little padding).
  Texts that arrive while the model is busy form the next batch, so batches grow with the load and no request ever
  waits on a timer.
- Failure isolation: when a batch raises, its texts are scored again one at a time, so that only the faulty one
  fails (`ModelCallFailed`: a 500 with a message); the server keeps serving.
- Back-pressure: at most `max_queue` texts and generations are in the worker's hands (queued or running); more
  raise `Overloaded` (a 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from sprm_kernels.model.core.params import SEARCH_SAMPLING_OPTIONS
from sprm_kernels.model.core.types import ScoreResult
from sprm_kernels.model.engines.base import Engine, supports_search

logger = logging.getLogger("sprm.server")


class Overloaded(Exception):
    """The queue is full: answered 503 with Retry-After."""


class ModelCallFailed(Exception):
    """A model call raised: answered 500 with this message."""


class TimedOut(Exception):
    """A request ran past the server's `request_timeout`: answered 504; its work was cancelled."""


@dataclass
class ServerStats:
    accepted: int = 0  # texts and generations admitted since the start (a 503 is not admitted)
    batches_served: int = 0
    texts_scored: int = 0
    largest_batch: int = 0
    multi_text_batches: int = 0  # batches of more than one text: the evidence that batching happens
    failed_batches: int = 0  # batches that raised and were retried one text at a time
    failed_texts: int = 0
    generations: int = 0
    cancelled: int = 0  # requests cancelled before their answer (a client that went away)
    timed_out: int = 0  # requests cut at the server's request_timeout (async worker)


class Admission:
    """The server's bound: at most `max_queue` texts and generations in hand (queued or running); more raise
    `Overloaded`. `on_change()` is called whenever the count moves (a request comes or leaves)."""

    def __init__(self, max_queue: int, stats: ServerStats, on_change: Callable[[], None] | None = None):
        self.max_queue, self.stats, self.on_change = max_queue, stats, on_change
        self.in_hand = 0

    @contextlib.contextmanager
    def admitted(self, count: int):
        if self.in_hand + count > self.max_queue:
            raise Overloaded(f"queue full ({self.in_hand} of {self.max_queue} in hand); retry later")
        self.in_hand += count
        self.stats.accepted += count
        self._changed()
        try:
            yield
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        finally:
            self.in_hand -= count
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def search_sampling(options: dict) -> dict:
    """The options a search takes of a generation's resolved options (`core.params.SEARCH_SAMPLING_OPTIONS`; the
    routes refuse mode, k and pruning with a search, so only their defaults are left out)."""
    return {name: value for name, value in options.items() if name in SEARCH_SAMPLING_OPTIONS}


def result_events(result):
    """A finished result as `astream`'s events: the reasoning, the answer a token at a time, the result."""
    yield "reasoning", result.candidates, result.best
    for end in range(1, len(result.answer_token_ids)):  # one token at a time, as an incremental engine does
        yield "answer", list(result.answer_token_ids[:end])
    yield "result", result


def log_generation(result, start: float) -> None:
    logger.info("generate: %d candidates, %d tokens through the model, %.1f ms", len(result.candidates),
                result.stats.total_tokens, 1000 * (time.perf_counter() - start))  # fmt: skip


@dataclass
class _QueuedText:
    token_ids: list[int]
    future: asyncio.Future


class ModelWorker:
    """Runs every model call in one thread, and batches queued score requests (see the module docstring)."""

    def __init__(self, model: Engine, *, max_batch_tokens: int, max_queue: int):
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.stats = ServerStats()
        self.admission = Admission(max_queue, self.stats)
        self._queue: deque[_QueuedText] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sprm-model")
        # Held around every model call. A batch is formed once the lock is won, i.e. when the model is free, so it
        # takes every text that queued while a generation ran. asyncio.Lock is FIFO: no starvation either way.
        self._model_lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._model_lock = asyncio.Lock()
        self._batcher = asyncio.create_task(self._batch_loop(), name="sprm-batcher")

    async def stop(self) -> None:
        """Called after the server has answered every request in flight."""
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def in_hand(self) -> int:
        """Texts and generations accepted and not answered yet (queued or running)."""
        return self.admission.in_hand

    async def score(self, sequences: list[list[int]]) -> list[ScoreResult]:
        """Scores of token id lists, each scored in whichever batch it lands in."""
        loop = asyncio.get_running_loop()
        with self.admission.admitted(len(sequences)):
            queued = [_QueuedText(ids, loop.create_future()) for ids in sequences]
            self._queue.extend(queued)
            self._wakeup.set()
            return list(await asyncio.gather(*(item.future for item in queued)))

    async def generate(self, prompt, search: dict | None = None, **options):
        """The engine's `generate`, or with `search` (SearchParams fields) its `search` with the sampling options."""
        if search is not None and not supports_search(self.model):
            raise ValueError(f"search: the {self.model.info().engine} engine has no step-level search")
        call = partial(self.model.generate, prompt, **options)
        if search is not None:
            call = partial(self.model.search, prompt, **search, **search_sampling(options))
        with self.admission.admitted(1):
            async with self._model_lock:
                start = time.perf_counter()
                try:
                    result = await self._in_worker(call)
                finally:
                    self.stats.generations += 1
        log_generation(result, start)
        return result

    async def stream(self, prompt, search: dict | None = None, **options):
        """`generate`, then its result as the events of `engines.base.SupportsAsync.astream`: this worker's model
        call is not incremental, so they all come once the generation is done."""
        for event in result_events(await self.generate(prompt, search, **options)):
            yield event

    async def _in_worker(self, call: Callable):
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _batch_loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._model_lock:
                batch = self._take_batch()
                if batch:
                    await self._score_batch(batch)

    def _take_batch(self) -> list[_QueuedText]:
        """Queued texts in arrival order while their tokens stay within max_batch_tokens (the first one always).
        `ReflectiveModel.score` then sorts them by length into forwards of at most max_batch_tokens padded tokens
        with little padding, so the batch is bounded by its real tokens, not by rows x longest."""
        batch, tokens = [], 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # its request went away (cancelled): skip the work
                self._queue.popleft()
                continue
            if batch and tokens + len(item.token_ids) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += len(item.token_ids)
        return batch

    def _score_sequences(self, sequences: list[list[int]]) -> list[ScoreResult]:
        # Step scores always: they cost nothing extra, and the requests of one batch may differ in the flag.
        return self.model.score(sequences, return_all_scores=True, batch_tokens=self.max_batch_tokens)

    async def _score_batch(self, batch: list[_QueuedText]) -> None:
        start = time.perf_counter()
        try:
            results = await self._in_worker(partial(self._score_sequences, [item.token_ids for item in batch]))
        except Exception as error:  # isolate the failure: retry one at a time, so that only the faulty text fails
            self.stats.failed_batches += 1
            logger.warning("batch of %d texts failed (%s: %s); scoring them one at a time", len(batch),
                           type(error).__name__, error)  # fmt: skip
            if len(batch) == 1:
                self._fail(batch[0], error)
                return
            for item in batch:
                try:
                    [result] = await self._in_worker(partial(self._score_sequences, [item.token_ids]))
                except Exception as single_error:
                    self._fail(item, single_error)
                else:
                    self._succeed([item], [result])
            return
        milliseconds = 1000 * (time.perf_counter() - start)
        tokens = sum(len(item.token_ids) for item in batch)
        longest = max(len(item.token_ids) for item in batch)
        logger.info("batch of %d: %d tokens (longest %d), %.1f ms", len(batch), tokens, longest, milliseconds)
        self.stats.batches_served += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.multi_text_batches += len(batch) > 1
        self._succeed(batch, results)

    def _succeed(self, items: list[_QueuedText], results: list[ScoreResult]) -> None:
        self.stats.texts_scored += len(items)
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _fail(self, item: _QueuedText, error: Exception) -> None:
        self.stats.failed_texts += 1
        logger.error("scoring a text of %d tokens failed: %s: %s", len(item.token_ids), type(error).__name__, error)
        if not item.future.done():
            item.future.set_exception(ModelCallFailed(f"scoring failed: {type(error).__name__}: {error}"))
