"""An ASGI middleware that refuses request bodies over a size limit with our JSON 413.

The body is read in full (at most ``max_bytes``, within ``read_timeout`` seconds when one is
given) before the app is called, so an oversized body is refused (413) before any endpoint runs,
whether it declares a Content-Length or arrives chunked, and one that does not arrive in time is
answered 408.
Starlette's own limit answers in plain text; our services answer every error in JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# After refusing, read and discard at most this much more of the body (and for at most
# DRAIN_SECONDS): a client still sending then reads the 413 instead of a connection reset.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 1.0


class BodySizeLimit:
    """Answer 413 when Content-Length, or the bytes actually streamed, exceed ``max_bytes``.

    ``extra_fields`` returns what every error body must carry besides ``ok`` and ``error``.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        extra_fields: Callable[[], dict[str, Any]],
        read_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.extra_fields = extra_fields
        self.read_timeout = read_timeout

    async def _refuse(self, receive: Receive, send: Send, more_body: bool) -> None:
        if more_body:
            await _drain(receive)
        await self._error(send, 413, f"request body larger than {self.max_bytes} bytes")

    async def _error(self, send: Send, status: int, message: str) -> None:
        body = json.dumps({"ok": False, "error": message, **self.extra_fields()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)  # no body to limit: stay off the hot path
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(receive, send, more_body=True)
                return

        chunks: list[bytes] = []
        received = 0
        try:
            # A body trickled in byte by byte must not hold a connection for ever.
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left before its body was complete: nobody to answer
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    more = bool(message.get("more_body", False))
                    if received > self.max_bytes:
                        await self._refuse(receive, send, more_body=more)
                        return
                    chunks.append(chunk)
                    if not more:
                        break
        except TimeoutError:
            await self._error(send, 408, f"request body not received within {self.read_timeout} s")
            return

        replayed = False

        async def replay() -> Message:
            # The whole body at once; after that, whatever the server says next (disconnect).
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of a refused body, within the drain budget."""
    drained = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while drained <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))
    except TimeoutError:
        return
