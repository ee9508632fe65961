"""Failed-login limits per (username, client address).

After ``limit`` failures within ``window`` seconds, a key is refused (429) until the oldest of
them leaves the window, whatever password comes next: a guesser gets at most ``limit`` tries
per window. A success clears the key. At most ``max_keys`` keys are tracked; past that the one
that failed least recently is forgotten first, so memory stays bounded under any flood.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TooManyFailures(Exception):
    """The key failed too often lately: answer 429 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed attempts")
        self.retry_after = retry_after


class FailureLimiter:
    """A sliding log of recent failures per key (see the module docstring)."""

    def __init__(
        self,
        limit: int,
        window: float,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        times = self._failures.get(key)
        if times is None:
            return []
        cutoff = now - self.window
        while times and times[0] <= cutoff:
            times.pop(0)
        if not times:
            del self._failures[key]
        return times

    def check(self, key: tuple[str, str]) -> None:
        """Raise :class:`TooManyFailures` while ``key`` is over the limit."""
        now = self._clock()
        times = self._recent(key, now)
        if len(times) >= self.limit:
            raise TooManyFailures(max(1, math.ceil(times[-self.limit] + self.window - now)))

    def failed(self, key: tuple[str, str]) -> None:
        """Count one failure for ``key``."""
        now = self._clock()
        times = self._recent(key, now)
        times.append(now)
        del times[: -self.limit]  # older entries can no longer matter
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, key: tuple[str, str]) -> None:
        """Forget ``key``'s failures."""
        self._failures.pop(key, None)
