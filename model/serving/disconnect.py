"""Work that stops when its client goes away. Once a request's body is read, the next ASGI `receive()` returns
only when the client disconnects (or the response is complete), so a watcher task awaiting it is an event, not a
poll: the work is cancelled the moment the server learns of the disconnect."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing is sent."""


async def disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, coro):
    """Await `coro`, cancelling it (and raising `ClientGone`) if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if work.cancelled():
        raise ClientGone("the client disconnected")
    return work.result()


async def until_disconnected(request: Request, events):
    """The items of the async iterator `events` until the client disconnects; then `events` is closed (which
    cancels what it was waiting for)."""
    watcher = asyncio.ensure_future(disconnected(request))
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                    await step
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        watcher.cancel()
        await events.aclose()
