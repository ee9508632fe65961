"""The hashing gate: a pure-ASGI middleware in front of everything that admits or refuses the
requests that will hash, before the framework does any work for them.

Under a flood the refusals must stay cheap, or answering them takes the core the hashes need:
a refusal here reads no body, runs no routing, validation or dependency, and sends a JSON 503
built once. An admitted request holds its place in the hashing queue until it ends (see
:meth:`usersvc.passwords.Hashing.admit`), so it is never refused later.

Requests that hash: ``PUT /user/<name>`` (a sign-up, or an update that proves a password or sets
a new one), ``DELETE /user/<name>`` with Basic credentials, and ``POST /user/<name>/login``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from envoymesh.limits import ASGIApp, Receive, Scope, Send
from usersvc.passwords import Hashing, HashingBusy

BUSY_MESSAGE = "busy: too many password checks at once; retry shortly"

_USER = re.compile(r"/user/([A-Za-z0-9][A-Za-z0-9._-]{0,63})(/login)?")


def hashes(scope: Scope) -> bool:
    """True when the request will check or make a password hash (read from the head alone)."""
    match = _USER.fullmatch(scope["path"])
    if match is None:
        return False
    method: str = scope["method"]
    if match.group(2):
        return method == "POST"
    if method == "PUT":
        return True
    return method == "DELETE" and any(
        name == b"authorization" and value[:6].lower() == b"basic "
        for name, value in scope["headers"]
    )


class HashingGate:
    """Admit a hashing request into ``hashing``'s queue, or answer 503 at once.

    ``extra_fields`` returns what every error body carries besides ``ok`` and ``error``; it is
    read once, at the first refusal (after start-up, when the identity is known).
    """

    def __init__(
        self, app: ASGIApp, hashing: Hashing, extra_fields: Callable[[], dict[str, Any]]
    ) -> None:
        self.app = app
        self.hashing = hashing
        self.extra_fields = extra_fields
        self._body: bytes | None = None
        self._starts: dict[int, dict[str, Any]] = {}

    def _response_start(self, retry_after: int) -> dict[str, Any]:
        start = self._starts.get(retry_after)
        if start is None:
            if self._body is None:
                fields = {"ok": False, "error": BUSY_MESSAGE, **self.extra_fields()}
                self._body = json.dumps(fields).encode()
            start = {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
            self._starts[retry_after] = start
        return start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not hashes(scope):
            await self.app(scope, receive, send)
            return
        try:
            place = self.hashing.admit()
        except HashingBusy as busy:
            await send(self._response_start(busy.retry_after))
            await send({"type": "http.response.body", "body": self._body})
            return
        with place:
            await self.app(scope, receive, send)
