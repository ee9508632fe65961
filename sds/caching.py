"""The one rule every answer cache follows, and the bounded LRU they keep entries in.

Every surface (v1 JSON, xDS resources and responses, REST-JSON) renders an answer from
:class:`~sds.model.ServiceSnapshot` objects and keeps it until the registry hands out a
snapshot with another version for that service. Versions change exactly when what a proxy
routes on changes, so a heartbeat never costs a re-render of what a proxy uses; answers that
show ``last_check_in`` (v1) re-render at most every ``refresh`` seconds for it.

Caches are bounded LRUs, so a client asking for ever new names cannot grow them, and a full
cache forgets its least recently used entry rather than everything.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from sds.model import ServiceSnapshot

K = TypeVar("K")
V = TypeVar("V")


def still_current(
    built_from: ServiceSnapshot,
    now: ServiceSnapshot,
    *,
    age: float = 0.0,
    refresh: float | None = None,
) -> bool:
    """Whether an answer built from ``built_from`` may still be served when ``now`` is current.

    Same snapshot object: yes. Same service and version (only check-in times moved): yes,
    unless the answer shows check-in times (``refresh`` given) and is ``refresh`` seconds old.
    """
    if built_from is now:
        return True
    if (built_from.name, built_from.version) != (now.name, now.version):
        return False
    return refresh is None or age < refresh


class Lru(Generic[K, V]):
    """A dictionary of at most ``capacity`` entries that forgets the least recently used."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an LRU needs room for at least one entry")
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The entry for ``key``, now the most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``; the least recently used entry goes when the cache is full."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        """Forget ``key`` if present."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
