"""`EngineLoop`: an event loop of its own, in a daemon thread, for vLLM's `AsyncLLM`.

The AsyncLLM client's sockets belong to the loop that made it; with the engine on a loop of its own, any loop (a
server's, a test's) or plain synchronous code can call it: `run` from another loop, `call` from synchronous code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading


class EngineLoop:
    """An event loop in a daemon thread; `submit(coro)` runs a coroutine there (a concurrent Future)."""

    def __init__(self, name: str = "sprm-vllm-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro):
        """Await `coro` on the engine loop from another loop. Cancelling the awaiting task cancels the coroutine's
        task there and returns (raises CancelledError) only once that task has finished its clean-up, so that
        whatever the caller does next sees the aborts and drops done (a concurrent Future, cancelled, would
        return at once)."""
        caller = asyncio.get_running_loop()
        finished = caller.create_future()
        started: list[asyncio.Task] = []

        def settle(task: asyncio.Task) -> None:  # on the caller's loop
            if finished.done():
                return
            if task.cancelled():
                finished.cancel()
            elif task.exception() is not None:
                finished.set_exception(task.exception())
            else:
                finished.set_result(task.result())

        def report(task: asyncio.Task) -> None:  # on the engine loop
            try:
                caller.call_soon_threadsafe(settle, task)
            except RuntimeError:  # the caller's loop has closed: nobody waits for the result
                pass

        def start() -> None:  # on the engine loop
            task = self.loop.create_task(coro)
            task.add_done_callback(report)
            started.append(task)

        self.loop.call_soon_threadsafe(start)
        try:
            return await asyncio.shield(finished)
        except asyncio.CancelledError:
            if finished.done():  # the task itself was cancelled (the engine is closing)
                raise
            # start() ran or runs first (the loop keeps the order of call_soon_threadsafe), so started[0] exists
            self.loop.call_soon_threadsafe(lambda: started[0].cancel())
            await asyncio.wait({finished})  # not cancelled by a second cancellation of the caller
            if not finished.cancelled():
                finished.exception()  # retrieved: the cancellation is what the caller gets
            raise

    def call(self, coro):
        """Run `coro` on the engine loop from synchronous code (never from the engine loop itself)."""
        return self.submit(coro).result()

    def cancel_tasks(self) -> None:
        """Cancel what still runs on the loop (vLLM's output handler) and wait until it has stopped."""

        async def cancel_the_rest():
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            self.submit(cancel_the_rest()).result(timeout=10)

    def stop(self) -> None:
        self.cancel_tasks()
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
