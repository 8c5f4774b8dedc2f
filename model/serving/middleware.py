"""Pure ASGI middleware, run before FastAPI parses anything: the request body size limit and bearer auth."""

from __future__ import annotations

import secrets

from fastapi.responses import JSONResponse


class BodyLimit:
    """Pure ASGI middleware: a request body over `max_bytes` gets 413 before the app sees any of it, at once when its
    Content-Length says so (nothing of it is read), else as soon as the bytes streamed so far pass the limit. A body
    within the limit is buffered (the app reads all of it anyway) and replayed to the app. uvicorn then reads and
    discards the rest of a refused body, so the client can finish sending and read the 413."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
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
