"""Refuse requests that are not clean text before any handler sees them.

Every sds input is text: paths, query strings, JSON and form bodies. Text that is not valid
UTF-8, that holds a NUL, or whose JSON escapes make a lone surrogate (``"\\ud800"``) cannot be
stored and served back faithfully, so it is refused here with a 400 and a JSON error, once for
every surface. The frameworks below would otherwise replace bad bytes with U+FFFD (paths,
urlencoded forms), fall back to Latin-1 (multipart) or fail in the middle of a handler.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# One JSON escape at a time, so an escaped backslash is never mistaken for the start of one.
_JSON_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def _clean(data: bytes, what: str) -> str | None:
    """Why ``data`` is not clean UTF-8 text, or None when it is."""
    if b"\x00" in data:
        return f"{what} contains a NUL character"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return f"{what} is not valid UTF-8"
    return None


def _percent_decoded(data: bytes, what: str) -> str | None:
    """:func:`_clean` of the percent-decoded ``data`` (``+`` is a space, as in forms)."""
    if b"%" not in data:
        return _clean(data, what)
    return _clean(unquote_to_bytes(data.replace(b"+", b" ")), what)


def json_escapes_problem(text: str) -> str | None:
    """Why the escapes in JSON ``text`` make unclean text (NUL, lone surrogate), or None."""
    if "\\u" not in text:
        return None
    pending_high_end = -1  # where a high surrogate escape ended, waiting for its low half
    for match in _JSON_ESCAPE.finditer(text):
        code = int(match.group(1), 16) if match.group(1) else -1
        if pending_high_end >= 0:
            if match.start() == pending_high_end and 0xDC00 <= code <= 0xDFFF:
                pending_high_end = -1
                continue
            return "request body has a lone surrogate escape (\\ud800-\\udfff)"
        if code == 0:
            return "request body contains a NUL character (\\u0000)"
        if 0xD800 <= code <= 0xDBFF:
            pending_high_end = match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return "request body has a lone surrogate escape (\\ud800-\\udfff)"
    if pending_high_end >= 0:
        return "request body has a lone surrogate escape (\\ud800-\\udfff)"
    return None


def body_problem(body: bytes, content_type: str) -> str | None:
    """Why a request body of ``content_type`` is not clean text, or None when it is."""
    problem = _clean(body, "request body")
    if problem is not None:
        return problem
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        for field in body.split(b"&"):
            problem = _percent_decoded(field, "a form field")
            if problem is not None:
                return problem
    elif media == "application/json" or media.endswith("+json"):
        return json_escapes_problem(body.decode("utf-8"))
    return None


class TextGuard:
    """Pure-ASGI middleware: 400 for a path, query or body that is not clean UTF-8 text.

    Sits inside the body size limit, which bounds what it buffers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass")
        problem = _percent_decoded(raw_path, "the path") or _percent_decoded(
            scope.get("query_string", b""), "the query string"
        )
        if problem is None and scope["method"] not in _BODILESS:
            body, receive = await _buffered(receive)
            content_type = next(
                (v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), ""
            )
            problem = body_problem(body, content_type)
        if problem is not None:
            await _refuse(send, problem)
            return
        await self.app(scope, receive, send)


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body, and a ``receive`` that hands it on as one message."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app will see the disconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _refuse(send: Send, problem: str) -> None:
    body = json.dumps({"error": problem}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
