"""Pure ASGI middleware, run before FastAPI parses anything: the request body size limit and bearer auth."""

from __future__ import annotations

import asyncio
import secrets

from fastapi.responses import JSONResponse

# A refused body on a connection the client asked to close (`Connection: close`, as urllib sends) is read and dropped
# before the 413, up to these bounds: uvicorn closes such a connection once it has answered, and closing a socket
# with unread bytes resets it, so the client would see ECONNRESET instead of the 413.
DROP_MAX_BYTES = 64 * 2**20
DROP_MAX_SECONDS = 10.0


class BodyLimit:
    """Pure ASGI middleware: a request body over `max_bytes` gets 413 before the app sees any of it, at once when its
    Content-Length says so (nothing of it is read), else as soon as the bytes streamed so far pass the limit. A body
    within the limit is buffered (the app reads all of it anyway) and replayed to the app. uvicorn then reads and
    discards the rest of a refused body on a keep-alive connection, so the client can finish sending and read the
    413; on a connection the client will close (`Connection: close`), the rest is read and dropped here first, within
    `DROP_MAX_BYTES` and `DROP_MAX_SECONDS` (a larger or slower body is answered at once)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= DROP_MAX_BYTES:
                await drop_rest(scope, receive)
            await self._refuse(int(declared), scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await drop_rest(scope, receive, already=size)
                await self._refuse(size, scope, receive, send, at_least=True)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal replayed
            if replayed or message["type"] != "http.request":
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope, receive, send, at_least: bool = False):
        size_text = f"more than {self.max_bytes}" if at_least else str(size)
        detail = f"request body: {size_text} bytes, over the limit of {self.max_bytes} bytes (--max-body-bytes)"
        await JSONResponse({"detail": detail}, 413)(scope, receive, send)


def closes_after(scope) -> bool:
    """Whether the server will close the connection after its answer: HTTP/1.0, or `Connection: close`, without
    `Expect: 100-continue` (such a client sends no body until told to, so there is nothing unread to drop)."""
    headers = dict(scope["headers"])
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return False
    tokens = [token.strip() for token in headers.get(b"connection", b"").lower().split(b",")]
    return scope.get("http_version") == "1.0" or b"close" in tokens


async def drop_rest(scope, receive, already: int = 0) -> None:
    """Read and drop the rest of the body, on a connection that closes after the answer (`closes_after`), within
    DROP_MAX_BYTES in all and DROP_MAX_SECONDS."""
    if not closes_after(scope):
        return

    async def drop():
        size = already
        while size <= DROP_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drop(), DROP_MAX_SECONDS)
    except TimeoutError:
        return


class BearerAuth:
    """Pure ASGI middleware: with a token, every request needs `Authorization: Bearer <token>` (401 otherwise). It
    runs before the body is parsed, so that an unauthenticated client learns nothing from validation errors."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = JSONResponse(
                    {"detail": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
