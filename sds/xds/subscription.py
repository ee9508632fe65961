"""What a client subscribed to: one model for SotW, delta and REST.

The rules, written once:

- ``*`` subscribes to every service (the wildcard). In delta it is subscribed and
  unsubscribed like any name.
- An empty list of names (SotW, REST, ``FetchEndpoints``) means *no* resources, except for
  the xDS protocol's "legacy wildcard": for Listeners and Clusters (``legacy_wildcard``), a
  client that never named a resource asks for all of them with an empty list. For
  ClusterLoadAssignments an empty list is how a client drops its last subscription, so it
  cannot also mean "all".
- A name is 1 to MAX_NAME_LENGTH printable ASCII characters without spaces; anything else
  ends the stream with INVALID_ARGUMENT (REST: 400).
- At most ``max_names`` names per type on one stream; more ends that stream with
  RESOURCE_EXHAUSTED (REST: 400). Other streams are not affected.
- A plain name (``usersvc``) stands for the one Kubernetes service ``usersvc.<namespace>``
  when exactly one namespace has it. Once resolved, a subscription keeps its target while the
  name is ambiguous (a second namespace gained the name), instead of losing every endpoint;
  see :meth:`sds.xds.cache.XdsCache.resolve`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

WILDCARD = "*"
MAX_NAME_LENGTH = 256
DEFAULT_MAX_NAMES = 10_000
_NAME = re.compile(r"[\x21-\x7e]+")

# (name asked for, previously resolved target or None) -> the service it stands for now
Resolver = Callable[[str, str | None], str]


class SubscriptionError(Exception):
    """A request the subscription model refuses; ``exhausted`` for a cap, else invalid."""

    def __init__(self, message: str, *, exhausted: bool = False) -> None:
        super().__init__(message)
        self.exhausted = exhausted


def check_name(name: str) -> str:
    """``name`` when it may be subscribed to, else :class:`SubscriptionError`."""
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise SubscriptionError(
            f"invalid resource name {name[:80]!r}: 1 to {MAX_NAME_LENGTH} printable ASCII "
            "characters without spaces"
        )
    return name


class Subscription:
    """One client's subscription for one resource type, with the targets its names resolved to.

    The mutators return the explicit names that left the subscription, so the caller can
    unwatch them (and a delta stream can tell the client they were removed).
    """

    __slots__ = ("legacy_wildcard", "max_names", "named", "names", "targets", "wildcard")

    def __init__(
        self, max_names: int = DEFAULT_MAX_NAMES, *, legacy_wildcard: bool = False
    ) -> None:
        self.max_names = max_names
        self.legacy_wildcard = legacy_wildcard
        self.named = False  # a name was ever asked for: the legacy wildcard no longer applies
        self.wildcard = False
        self.names: set[str] = set()
        self.targets: dict[str, str] = {}

    def _legacy(self, names: Iterable[str]) -> Iterable[str]:
        """An empty SotW list as the legacy wildcard, where it still applies."""
        names = list(names)
        if self.legacy_wildcard and not names and not self.named:
            return [WILDCARD]
        return names

    @property
    def empty(self) -> bool:
        """True when nothing at all is subscribed."""
        return not self.wildcard and not self.names

    def _checked(self, names: Iterable[str]) -> tuple[bool, set[str]]:
        wildcard = False
        explicit: set[str] = set()
        for name in names:
            if name == WILDCARD:
                wildcard = True
            else:
                explicit.add(check_name(name))
            if len(explicit) > self.max_names:
                raise SubscriptionError(
                    f"more than {self.max_names} resource names on one stream",
                    exhausted=True,
                )
        return wildcard, explicit

    def same_as(self, names: Iterable[str]) -> bool:
        """Whether a SotW request for ``names`` asks for exactly this subscription.

        Cheap on purpose (every ACK asks): equal to what was accepted means valid too.
        """
        requested = set(self._legacy(names))
        if WILDCARD in requested:
            return self.wildcard and requested - {WILDCARD} == self.names
        return not self.wildcard and requested == self.names

    def replace(self, names: Iterable[str]) -> set[str]:
        """SotW and REST: ``names`` is the whole subscription (empty means nothing)."""
        wildcard, explicit = self._checked(self._legacy(names))
        self.named = self.named or bool(explicit)
        dropped = self.names - explicit
        self.wildcard, self.names = wildcard, explicit
        for name in dropped:
            self.targets.pop(name, None)
        return dropped

    def change(self, subscribe: Iterable[str], unsubscribe: Iterable[str]) -> set[str]:
        """Delta: add ``subscribe``, then remove ``unsubscribe``."""
        add_wildcard, added = self._checked(subscribe)
        drop_wildcard, removed = self._checked(unsubscribe)
        self.named = self.named or bool(added)
        if len(self.names | added) > self.max_names:
            raise SubscriptionError(
                f"more than {self.max_names} resource names on one stream", exhausted=True
            )
        self.wildcard = (self.wildcard or add_wildcard) and not drop_wildcard
        dropped = removed & self.names
        self.names = (self.names | added) - removed
        for name in dropped:
            self.targets.pop(name, None)
        return dropped

    def resolve(self, resolver: Resolver, only: Iterable[str] | None = None) -> bool:
        """(Re)resolve the targets of the explicit names (all of them, or ``only``).

        True when a name got another target than it had.
        """
        moved = False
        for name in self.names if only is None else only:
            if name in self.names:
                previous = self.targets.get(name)
                target = self.targets[name] = resolver(name, previous)
                moved = moved or target != previous
        return moved

    def listed(self) -> list[str]:
        """The subscription as shown to operators: names, then ``*`` for the wildcard."""
        return sorted(self.names) + ([WILDCARD] if self.wildcard else [])
