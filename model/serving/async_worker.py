"""The worker for an engine with coroutines (`engines.base.SupportsAsync`, e.g. vLLM's `AsyncLLM`): no lock, no
batching here. Every request goes straight to the engine, which batches all of them continuously; `ModelWorker`'s
bound (`max_queue` texts and generations in hand, else `Overloaded`) and a per-request deadline
(`request_timeout` seconds, else `TimedOut`) hold as on the one-thread worker. A request past its deadline, or
whose caller is cancelled (a client that went away, see `disconnect.py`), is cancelled in the engine: all of its
rows are aborted there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from sprm_kernels.model.core.types import ScoreResult
from sprm_kernels.model.engines.base import supports_async_search
from sprm_kernels.model.serving.worker import (
    Admission,
    ServerStats,
    TimedOut,
    log_generation,
    result_events,
    search_sampling,
)

logger = logging.getLogger("sprm.server")


class AsyncWorker:
    def __init__(self, model, *, max_queue: int, request_timeout: float | None = None):
        self.model = model
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.stats = ServerStats()
        self.changed = threading.Condition()  # notified whenever a request comes or leaves (`wait_until`)
        self.admission = Admission(max_queue, self.stats, on_change=self._notify)

    @property
    def in_hand(self) -> int:
        return self.admission.in_hand

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_until(self, predicate, timeout: float) -> bool:
        """Block (another thread than the server's) until `predicate()` holds as a request comes or leaves, or `timeout`
        seconds: an event for tests and monitors to wait on, instead of sleeping."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    async def _bounded(self, coro):
        try:
            return await asyncio.wait_for(coro, self.request_timeout)
        except TimeoutError:
            self.stats.timed_out += 1
            raise TimedOut(f"the request ran past the server's limit of {self.request_timeout:g} s") from None

    async def score(self, sequences: list[list[int]]) -> list[ScoreResult]:
        with self.admission.admitted(len(sequences)):
            results = await self._bounded(self.model.ascore(sequences, return_all_scores=True))
        self.stats.texts_scored += len(sequences)
        self.stats.batches_served += 1
        return results

    async def generate(self, prompt, search: dict | None = None, **options):
        """The engine's `agenerate`, or with `search` (SearchParams fields) its `asearch`."""
        if search is not None and not supports_async_search(self.model):
            raise ValueError(f"search: the {self.model.info().engine} engine has no step-level search")
        if search is None:
            call = self.model.agenerate(prompt, **options)
        else:
            call = self.model.asearch(prompt, **search, **search_sampling(options))
        with self.admission.admitted(1):
            start = time.perf_counter()
            try:
                result = await self._bounded(call)
            finally:
                self.stats.generations += 1
        log_generation(result, start)
        return result

    async def stream(self, prompt, search: dict | None = None, **options):
        """The engine's `astream` events, under the same bound and deadline; a search's all come once it is
        done (its answer follows the choice of a finished beam, as best-of-k's does)."""
        if search is not None:
            for event in result_events(await self.generate(prompt, search, **options)):
                yield event
            return
        with self.admission.admitted(1):
            deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
            events = self.model.astream(prompt, **options)
            try:
                while True:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    try:
                        event = await self._bounded_next(events, left)
                    except StopAsyncIteration:
                        return
                    yield event
            finally:
                self.stats.generations += 1
                await events.aclose()

    async def _bounded_next(self, events, seconds):
        try:
            return await asyncio.wait_for(anext(events), seconds)
        except TimeoutError:
            self.stats.timed_out += 1
            raise TimedOut(f"the request ran past the server's limit of {self.request_timeout:g} s") from None
