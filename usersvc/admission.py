"""The hashing gate: a pure-ASGI middleware in front of everything that admits or refuses the
requests that will hash, before the framework does any work for them.

Under a flood the refusals must stay cheap, or answering them takes the core the hashes need:
a refusal here reads no body, runs no routing, validation or dependency, and sends a JSON 503
built once. An admitted request holds its place in the hashing queue until it ends (see
:meth:`usersvc.passwords.Hashing.admit`), so it is never refused later.

A burst of refusals is answered at once, but a steady stream of them is answered after a
short pause (``--hash-refusal-delay``, a tarpit): a client that ignores Retry-After and comes
straight back then sends a few refused requests a second per connection instead of thousands,
which would otherwise take the core from the hashes. Up to :data:`UNPAUSED_BURST` refusals,
refilled at :data:`UNPAUSED_RATE` a second, go out unpaused, so a one-off crowd of sign-ups
learns at once that it must come back. A paused refusal's Retry-After is read from the backlog
when the answer goes, so it stays true. At most :data:`HELD_CAP` refusals are paused at once;
any more are answered at once, so a flood of new connections cannot make the pause hold
unbounded memory.

Requests that hash: ``PUT /user/<name>`` (a sign-up, or an update that proves a password or sets
a new one), ``DELETE /user/<name>`` with Basic credentials, and ``POST /user/<name>/login``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

from envoymesh.limits import ASGIApp, Receive, Scope, Send
from usersvc.passwords import Hashing, HashingBusy

BUSY_MESSAGE = "busy: too many password checks at once; retry shortly"
# Refusals paused at once: a few MiB of waiting requests at most.
HELD_CAP = 1024
# Refusals answered at once before pausing starts, and how fast that allowance comes back: a
# burst this size costs the loop a few milliseconds, a flood of them would cost the core.
UNPAUSED_BURST = 256
UNPAUSED_RATE = 64.0

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


class RefusalPacing:
    """The pause before a refusal's answer: ``delay`` seconds, for at most ``cap`` at once,
    once more than ``burst`` refusals (refilled at ``rate`` a second) went out unpaused."""

    def __init__(
        self,
        delay: float,
        cap: int = HELD_CAP,
        burst: int = UNPAUSED_BURST,
        rate: float = UNPAUSED_RATE,
    ) -> None:
        self.delay = delay
        self.cap = cap
        self.burst = burst
        self.rate = rate
        self._allowance = float(burst)
        self._stamp = time.monotonic()
        # Refusals paused now and paused in all; answered at once within the allowance; and
        # answered at once because ``cap`` were paused.
        self.held = 0
        self.paused = 0
        self.unpaused = 0
        self.unpaced = 0

    def _within_allowance(self) -> bool:
        now = time.monotonic()
        self._allowance = min(self.burst, self._allowance + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    async def pause(self) -> bool:
        """Wait ``delay`` seconds unless none is set, the refusal is within the unpaused
        allowance, or ``cap`` refusals are waiting; True if it waited."""
        if not self.delay:
            return False
        if self._within_allowance():
            self.unpaused += 1
            return False
        if self.held >= self.cap:
            self.unpaced += 1
            return False
        self.held += 1
        self.paused += 1
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.held -= 1
        return True


class HashingGate:
    """Admit a hashing request into ``hashing``'s queue, or answer 503 after ``pacing``'s pause.

    ``extra_fields`` returns what every error body carries besides ``ok`` and ``error``; it is
    read once, at the first refusal (after start-up, when the identity is known).
    """

    def __init__(
        self,
        app: ASGIApp,
        hashing: Hashing,
        extra_fields: Callable[[], dict[str, Any]],
        pacing: RefusalPacing,
    ) -> None:
        self.app = app
        self.hashing = hashing
        self.extra_fields = extra_fields
        self.pacing = pacing
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
            retry_after = busy.retry_after
            if await self.pacing.pause():
                # The backlog as it is now, when the answer goes.
                retry_after = self.hashing.retry_after()
            await send(self._response_start(retry_after))
            await send({"type": "http.response.body", "body": self._body})
            return
        with place:
            await self.app(scope, receive, send)
