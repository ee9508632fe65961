"""The endpoint registry: the one place sources write to and surfaces read from.

Data flows one way. Sources (Kubernetes, self-registration) call the mutators; surfaces (the
v1 API, xDS) read immutable :class:`ServiceSnapshot` objects and wait for change
notifications. Everything runs on one event loop, so no locks are needed: a mutation and its
notification happen without an ``await`` in between.

Versions: the registry has a revision that increases by one for every real change of one
service; a service's version is the revision of its last real change. A change is "real" when
what a proxy routes on differs: a heartbeat that only refreshes ``last_check_in`` is not one.

Change sets: the registry remembers which service each recent revision changed, so a reader
that last looked at revision ``r`` asks :meth:`Registry.changes_since` for the names changed
since, instead of comparing every service.

Gateway API objects (Gateways, routes, ReferenceGrants, Service declarations) live here too,
under the same revision: each changed object is one entry of the change log, keyed by its
:class:`~sds.gatewayapi.model.ObjectKey`, and :meth:`Registry.config_changes_since` tells a
reader which ones moved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sds.gatewayapi.model import ConfigObject, GatewayConfig, ObjectKey
from sds.model import Endpoint, ServiceSnapshot, Source


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """What a source last said about itself (shown by ``/readyz``)."""

    ready: bool
    reason: str = ""
    until: float | None = None  # monotonic time the source expects to be ready (a warm-up)


# How many recent revisions remember their service; a reader further behind gets "everything".
CHANGE_LOG_SIZE = 100_000
# In the change log: a revision that concerns every service (readiness changed).
EVERYTHING = ""


def short_name(name: str) -> str:
    """``usersvc`` for ``usersvc.prod``; a name without a namespace is its own short name."""
    return name.split(".", 1)[0]


class Registry:
    """Endpoints per service and per source, with versions and change notification."""

    def __init__(self) -> None:
        self._endpoints: dict[str, dict[Source, dict[tuple[str, int], Endpoint]]] = {}
        self._versions: dict[str, int] = {}
        # short name -> the qualified services (name.namespace) it may stand for
        self._aliases: dict[str, set[str]] = {}
        self._log: deque[tuple[int, str | ObjectKey]] = deque(maxlen=CHANGE_LOG_SIZE)
        self._config = GatewayConfig()
        self._config_by_source: dict[str, GatewayConfig] = {}
        self._snapshots: dict[str, ServiceSnapshot] = {}
        self._revision = 0
        self._changed = asyncio.Event()
        self._statuses: dict[str, SourceStatus] = {}
        self._ready = False  # read on every push: kept, not recomputed
        self._pending_notify = False

    # ----- reading -------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Increases with every real change of any service, and when readiness changes."""
        return self._revision

    @property
    def ready(self) -> bool:
        """True once every source finished its initial sync (and there is a source)."""
        return self._ready

    def services(self) -> list[str]:
        """Canonical names of every service that has endpoints."""
        return sorted(self._versions)

    def has(self, name: str) -> bool:
        """True when ``name`` is a service with endpoints."""
        return name in self._versions

    def qualified(self, short: str) -> frozenset[str]:
        """The ``short.namespace`` services that have endpoints (an index lookup)."""
        return frozenset(self._aliases.get(short, ()))

    def resolve(self, name: str) -> str:
        """The canonical name for ``name``.

        Kubernetes services are named ``name.namespace``; a plain ``name`` reaches one when
        exactly one watched namespace has a service of that name.
        """
        if name in self._versions or "." in name:
            return name
        matches = self._aliases.get(name, ())
        return next(iter(matches)) if len(matches) == 1 else name

    def changes_since(self, revision: int) -> frozenset[str] | None:
        """The services changed after ``revision``; None when every service may have.

        None comes back when readiness changed meanwhile (withheld answers may now go out)
        or when ``revision`` is older than the change log remembers.
        """
        if revision >= self._revision:
            return frozenset()
        if not self._log or self._log[0][0] > revision + 1:
            return None
        names: set[str] = set()
        for number, name in reversed(self._log):
            if number <= revision:
                break
            if name == EVERYTHING:
                return None
            if isinstance(name, str):
                names.add(name)
        return frozenset(names)

    @property
    def config(self) -> GatewayConfig:
        """Every Gateway API object the sources delivered, merged."""
        return self._config

    def config_changes_since(self, revision: int) -> frozenset[ObjectKey] | None:
        """The Gateway API objects changed after ``revision``; None when any may have."""
        if revision >= self._revision:
            return frozenset()
        if not self._log or self._log[0][0] > revision + 1:
            return None
        keys: set[ObjectKey] = set()
        for number, key in reversed(self._log):
            if number <= revision:
                break
            if isinstance(key, ObjectKey):
                keys.add(key)
        return frozenset(keys)

    def snapshot(self, name: str) -> ServiceSnapshot:
        """The service as it is now; an unknown service is an empty snapshot at version 0."""
        cached = self._snapshots.get(name)
        if cached is not None:
            return cached
        per_source = self._endpoints.get(name, {})
        endpoints = tuple(
            sorted(
                (e for by_key in per_source.values() for e in by_key.values()),
                key=Endpoint.sort_key,
            )
        )
        snap = ServiceSnapshot(name=name, version=self._versions.get(name, 0), endpoints=endpoints)
        if name in self._versions:
            self._snapshots[name] = snap
        return snap

    def counts(self) -> tuple[int, int]:
        """(services with endpoints, endpoints) right now."""
        services = endpoints = 0
        for per_source in self._endpoints.values():
            n = sum(len(by_key) for by_key in per_source.values())
            if n:
                services += 1
                endpoints += n
        return services, endpoints

    async def wait_for_change(self, after: int, timeout: float) -> int:
        """Return the revision once it passes ``after``, or after ``timeout`` seconds."""
        while self._revision <= after:
            event = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
                continue
            break
        return self._revision

    # ----- source status -------------------------------------------------------------------

    def set_source_status(
        self, source: str, *, ready: bool, reason: str = "", until: float | None = None
    ) -> None:
        """Record whether a source finished its initial sync, and why not.

        Surfaces hold back empty answers until every source is ready, so a change of
        readiness wakes the waiters like a change of endpoints does.
        """
        was_ready = self._ready
        self._statuses[source] = SourceStatus(ready=ready, reason=reason, until=until)
        self._ready = all(s.ready for s in self._statuses.values())
        if self._ready != was_ready:
            self._revision += 1
            self._log.append((self._revision, EVERYTHING))
            self._pending_notify = True
            self._notify()

    def source_statuses(self) -> Mapping[str, SourceStatus]:
        """Every source's last reported status."""
        return dict(self._statuses)

    # ----- writing -------------------------------------------------------------------------

    def set_config(self, source: str, config: GatewayConfig) -> set[ObjectKey]:
        """Make ``config`` everything ``source`` says; the keys that changed.

        Sources merge in the order they first delivered: an object two sources both define
        is the first one's.
        """
        self._config_by_source[source] = config
        merged: dict[ObjectKey, ConfigObject] = {}
        for delivered in self._config_by_source.values():
            for key, obj in delivered.objects.items():
                merged.setdefault(key, obj)
        old = self._config.objects
        changed = {k for k in old.keys() | merged.keys() if old.get(k) != merged.get(k)}
        if not changed:
            return changed
        self._config = GatewayConfig(merged)
        for key in sorted(changed):
            self._revision += 1
            self._log.append((self._revision, key))
        self._pending_notify = True
        self._notify()
        return changed

    def replace(self, source: Source, name: str, endpoints: Iterable[Endpoint]) -> bool:
        """Make ``endpoints`` the whole set ``source`` knows for ``name``; True when changed."""
        changed = self._replace(source, name, endpoints)
        self._notify()
        return changed

    def replace_source(
        self, source: Source, services: Mapping[str, Iterable[Endpoint]]
    ) -> set[str]:
        """Make ``services`` everything ``source`` knows; its other services become empty.

        Used after a Kubernetes relist: services deleted while disconnected disappear. One
        notification for the whole batch.
        """
        changed = {name for name, eps in services.items() if self._replace(source, name, eps)}
        for name, per_source in list(self._endpoints.items()):
            if name not in services and per_source.get(source) and self._replace(source, name, ()):
                changed.add(name)
        self._notify()
        return changed

    def upsert(self, source: Source, name: str, endpoint: Endpoint) -> bool:
        """Add or refresh one endpoint; True when that was a real change (not a heartbeat)."""
        by_key = self._endpoints.setdefault(name, {}).setdefault(source, {})
        previous = by_key.get(endpoint.key)
        by_key[endpoint.key] = endpoint
        self._snapshots.pop(name, None)  # last_check_in is shown even when nothing else moved
        if previous == endpoint:
            return False
        self._bump(name)
        self._notify()
        return True

    def remove(self, source: Source, name: str, address: str, port: int | None = None) -> int:
        """Remove ``address`` (one port, or all of them) from ``name``; how many went."""
        by_key = self._endpoints.get(name, {}).get(source, {})
        doomed = [k for k in by_key if k[0] == address and (port is None or k[1] == port)]
        for key in doomed:
            del by_key[key]
        if doomed:
            self._bump(name)
            self._notify()
        return len(doomed)

    def _replace(self, source: Source, name: str, endpoints: Iterable[Endpoint]) -> bool:
        new = {e.key: e for e in endpoints}
        per_source = self._endpoints.get(name, {})
        old = per_source.get(source, {})
        if old == new:
            if new:
                per_source[source] = new  # fresh last_check_in values, same routing
                self._snapshots.pop(name, None)
            return False
        self._endpoints.setdefault(name, {})[source] = new
        self._bump(name)
        return True

    def _bump(self, name: str) -> None:
        self._revision += 1
        self._log.append((self._revision, name))
        self._snapshots.pop(name, None)
        self._pending_notify = True
        if any(self._endpoints.get(name, {}).values()):
            if name not in self._versions and "." in name:
                self._aliases.setdefault(short_name(name), set()).add(name)
            self._versions[name] = self._revision
            return
        # A service with no endpoints left is forgotten, so churn of names cannot grow the
        # registry; to every surface it is now an unknown, empty service.
        self._endpoints.pop(name, None)
        self._versions.pop(name, None)
        if "." in name:
            short = short_name(name)
            self._aliases.get(short, set()).discard(name)
            if not self._aliases.get(short):
                self._aliases.pop(short, None)

    def _notify(self) -> None:
        if self._pending_notify:
            self._pending_notify = False
            event, self._changed = self._changed, asyncio.Event()
            event.set()
