"""An ASGI middleware that refuses request bodies over a size limit with our JSON 413.

Starlette's own limit answers in plain text; our services answer every error in JSON.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodySizeLimit:
    """Answer 413 when Content-Length, or the bytes actually streamed, exceed ``max_bytes``.

    ``extra_fields`` returns what every error body must carry besides ``ok`` and ``error``.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, extra_fields: Callable[[], dict[str, Any]]
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.extra_fields = extra_fields

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "ok": False,
                "error": f"request body larger than {self.max_bytes} bytes",
                **self.extra_fields(),
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
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
                await self._refuse(send)
                return

        received = 0
        too_large = False
        refused = False

        async def limited_receive() -> Message:
            # Past the limit, end the body early; the app's answer is then replaced by a 413.
            nonlocal received, too_large
            if too_large:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def replacing_send(message: Message) -> None:
            nonlocal refused
            if not too_large:
                await send(message)
            elif not refused:
                refused = True
                await self._refuse(send)

        await self.app(scope, limited_receive, replacing_send)
