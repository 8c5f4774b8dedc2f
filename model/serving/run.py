"""Running the app under uvicorn until SIGTERM / SIGINT, with a graceful drain.

On SIGTERM the server first drains: it keeps its socket and its connections open, finishes the requests in flight,
answers every new request 503 with Retry-After, and marks every response `Connection: close`, until nothing is in
flight and no request came for DRAIN_QUIET_SECONDS (at most DRAIN_MAX_SECONDS of 503s after the last request in
flight). Only then does uvicorn close the socket and the idle connections and run the lifespan shutdown, which
stops the batching task and the worker thread. So every request the server has read gets an answer: the 200 it was
being served, or a 503. What it cannot answer is a request it never read: one sent on an idle connection, or a
connection made, in the instant it closes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse

logger = logging.getLogger("sprm.server")

RETRY_AFTER_SECONDS = 1
DRAIN_QUIET_SECONDS = 1.0
DRAIN_MAX_SECONDS = 10.0


class Drain:
    """Pure ASGI wrapper (outermost): counts the requests in flight; once `drain` has begun (SIGTERM), answers new
    requests 503 with Retry-After and marks every response `Connection: close` (see the module docstring)."""

    def __init__(self, app):
        self.app = app
        self.draining = False
        self.in_flight = 0
        self.last_arrival = 0.0
        self.read = 0  # requests the server has read (their head): each must get an answer
        self.answered = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.last_arrival = time.monotonic()
        self.read += 1

        async def send_counted(message):
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.answered += 1
            await send(message)

        if self.draining:
            # Read the body first (and drop it): closing a socket with unread bytes resets the connection, and the
            # client would lose the answer.
            message = {"more_body": True}
            while message.get("more_body", False):
                message = await receive()
            detail = "shutting down: retry later (or on another server)"
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"}
            await JSONResponse({"detail": detail}, 503, headers=headers)(scope, receive, send_counted)
            return

        async def send_closing(message):
            if self.draining and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send_counted(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            self.in_flight -= 1

    async def drain(self, forced: Callable[[], bool]) -> None:
        """Returns once nothing is in flight and no request came for DRAIN_QUIET_SECONDS (or DRAIN_MAX_SECONDS of
        503s passed since the last request in flight ended), or at once when `forced()` (a second Ctrl-C)."""
        self.draining = True
        logger.info("draining: finishing %d requests in flight, answering new ones 503", self.in_flight)
        idle_since = None
        while not forced():
            now = time.monotonic()
            if self.in_flight:
                idle_since = None
            else:
                idle_since = idle_since or now
                if now - self.last_arrival >= DRAIN_QUIET_SECONDS or now - idle_since >= DRAIN_MAX_SECONDS:
                    break
            await asyncio.sleep(0.02)


def run_app(app, *, host: str, port: int, log_level: str = "info", access_log: bool = False) -> None:
    """Serve `app` on host:port until SIGTERM or SIGINT, then drain (see the module docstring) and return (a clean
    stop, exit status 0)."""
    import signal
    import threading

    import uvicorn

    drain = Drain(app)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):  # uvicorn's shutdown closes the socket and the idle connections
            await drain.drain(lambda: self.force_exit)
            await super().shutdown(sockets=sockets)
            logger.info("stopped: answered %d of the %d requests read", drain.answered, drain.read)

    # timeout_graceful_shutdown None: on SIGTERM, wait for every request in flight however long it takes (a second
    # SIGINT forces the exit).
    config = uvicorn.Config(
        drain, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=None
    )
    server = DrainingServer(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn (>= 0.29) handles SIGTERM / SIGINT itself, shuts down gracefully, then re-raises the signal to the
    # previous handler, which by default would kill the process with that signal after a clean shutdown. This
    # handler turns the re-raised signal into a normal return.
    previous = {sig: signal.signal(sig, raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stopped(Exception):
    """The signal uvicorn re-raises after its graceful shutdown, turned into a normal return."""


def raise_stopped(signum, frame):
    raise Stopped


def log_to_stderr(level: str) -> None:
    """The server's log lines (batches, generations, the drain) on stderr, at `level` and above."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s sprm: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
