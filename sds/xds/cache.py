"""The xDS cache between the registry and the streams.

- **Watches.** Streams watch the names they subscribed to (and the wildcard). One task waits
  for registry changes, lets a debounce window pass, asks the registry which services changed
  since it last looked, and wakes only the streams watching one of those names.
- **Resources** are built, packed and hashed once per (name, service version) and shared.
- **Answers**: a state-of-the-world response for a set of resources is serialised once and
  reused by every stream (and REST poller) with that set, until one of them changes; each
  stream only appends its nonce. REST-JSON is rendered once per set too.

- **Gateways.** Listeners, RouteConfigurations and Clusters are translated per Gateway
  (:mod:`sds.translate.translator`) when a change can alter them; the streams of that
  Gateway's proxies are woken with :meth:`Watcher.config_changed`.
- **Cluster names** (``namespace/service/port``, the clusters of Gateway routes) are
  ClusterLoadAssignments of one port of a Service: its registered hosts on that port (in the
  registration namespace) and its Kubernetes endpoints. ``namespace/service/*`` is every
  port (every registered host), and any other last segment (``none``) no endpoint.
- **Proxyless gRPC targets** (:mod:`sds.translate.mesh`) are translated while a stream
  watches them (:meth:`XdsCache.watch_mesh`); their streams are woken with
  :meth:`Watcher.config_changed` when their Listener or RouteConfiguration moves.

Everything is kept in bounded LRUs under the one rule of :mod:`sds.caching`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from sds import metrics
from sds.caching import Lru, still_current
from sds.gatewayapi.model import ObjectKey
from sds.model import Endpoint, ServiceSnapshot, Source
from sds.registry import Registry, short_name
from sds.translate.clusters import UpstreamTls
from sds.translate.mesh import ALL_PORTS
from sds.translate.translator import Translator
from sds.xds.resources import EDS_TYPE_URL, Resource, build_resource, combined_version
from sds.xds.subscription import Subscription

log = logging.getLogger("sds.xds")

# How long the change task sleeps at most before re-checking; only bounds the wait.
_WATCH_TIMEOUT = 30.0
RESOURCE_CACHE_SIZE = 200_000
ANSWER_CACHE_SIZE = 20_000

# (name, target) of each resource a subscription covers, by name.
Items = tuple[tuple[str, str], ...]


class Watcher(Protocol):
    """Something woken when a name it watches changes (a stream)."""

    def changed(self, names: frozenset[str] | None, changed_at: float) -> None:
        """``names`` changed (None: anything may have) at ``changed_at`` (monotonic).

        ``names`` includes the short name of every qualified name changed.
        """

    def config_changed(self, changed_at: float) -> None:
        """The Listeners, RouteConfigurations or Clusters of the watcher's Gateway moved."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A state-of-the-world answer for one set of resources, serialised once.

    ``body`` is a DiscoveryResponse without a nonce; a stream sends ``body`` followed by its
    own serialised nonce field (protobuf messages concatenate).
    """

    type_url: str
    resources: tuple[Resource, ...]
    version: str
    body: bytes

    @property
    def sent(self) -> dict[str, str]:
        """What the answer carries: the version of each resource, by name."""
        return {r.name: r.version for r in self.resources}


class XdsCache:
    """Watch index, shared resources and shared answers over one registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        debounce: float = 0.0,
        identifier: str = "envoymesh-sds",
        registration_namespace: str = "default",
        proxyless_tls: UpstreamTls | None = None,
    ) -> None:
        self.registry = registry
        self.translator = Translator(registry, registration_namespace, proxyless_tls)
        self._gateway_watches: dict[ObjectKey, set[Watcher]] = {}
        self._mesh_watches: dict[str, set[Watcher]] = {}
        self._ports: Lru[str, tuple[ServiceSnapshot, ServiceSnapshot, Resource]] = Lru(
            RESOURCE_CACHE_SIZE
        )
        self.debounce = debounce
        self.control_plane = base_pb2.ControlPlane(identifier=identifier)
        self._watches: dict[str, set[Watcher]] = {}
        self._wildcard: set[Watcher] = set()
        self._resources: Lru[tuple[str, str], tuple[ServiceSnapshot, Resource]] = Lru(
            RESOURCE_CACHE_SIZE
        )
        self._answers: Lru[tuple[str, tuple[tuple[str, str], ...]], Answer] = Lru(ANSWER_CACHE_SIZE)
        # The answers by what they cover, valid at one registry revision: during a fan-out,
        # every stream with the same subscription finds its answer with one lookup instead
        # of checking each resource against the registry again.
        self._by_items: dict[tuple[str, Items], Answer] = {}
        self._by_items_revision = -1
        # SotW versions this process has answered with: a client holding one has our state,
        # not an earlier sds's (see had()).
        self._issued: Lru[str, bool] = Lru(ANSWER_CACHE_SIZE)
        self._json: Lru[tuple[str, ...], bytes] = Lru(ANSWER_CACHE_SIZE)
        self._ambiguous: set[str] = set()

    # ----- watches -------------------------------------------------------------------------

    def _watched_as(self, names: Iterable[str]) -> Iterable[str]:
        """The registry names a watch of ``names`` is kept under (cluster names: theirs)."""
        for name in names:
            if "/" in name:
                yield from self.cluster_services(name)
            else:
                yield name

    def watch(self, watcher: Watcher, names: Iterable[str], *, wildcard: bool = False) -> None:
        """Wake ``watcher`` when one of ``names`` (or, with ``wildcard``, any name) changes."""
        for name in self._watched_as(names):
            self._watches.setdefault(name, set()).add(watcher)
        if wildcard:
            self._wildcard.add(watcher)

    def watch_gateway(self, watcher: Watcher, gateway: ObjectKey, *, on: bool = True) -> None:
        """Wake ``watcher`` (or stop) when the resources of ``gateway`` move."""
        if on:
            self._gateway_watches.setdefault(gateway, set()).add(watcher)
            return
        watchers = self._gateway_watches.get(gateway)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._gateway_watches[gateway]

    def watch_mesh(self, watcher: Watcher, names: Iterable[str], *, on: bool = True) -> None:
        """Wake ``watcher`` (or stop) when the proxyless gRPC targets ``names`` move."""
        mesh = self.translator.mesh
        for name in names:
            watchers = self._mesh_watches.get(name)
            if on:
                if watchers is None:
                    watchers = self._mesh_watches[name] = set()
                    mesh.watch(name)
                watchers.add(watcher)
            elif watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._mesh_watches[name]
                    mesh.forget(name)

    def unwatch(self, watcher: Watcher, names: Iterable[str], *, wildcard: bool = False) -> None:
        """Stop waking ``watcher`` for ``names`` (and, with ``wildcard``, for everything)."""
        for name in self._watched_as(names):
            watchers = self._watches.get(name)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watches[name]
        if wildcard:
            self._wildcard.discard(watcher)

    def watchers(self, changed: frozenset[str] | None) -> set[Watcher]:
        """Who a change of ``changed`` concerns (None: everyone).

        A change of ``usersvc.prod`` also concerns the watchers of ``usersvc``: which service
        that plain name stands for may have changed with it.
        """
        if changed is None:
            everyone = set(self._wildcard)
            for watchers in self._watches.values():
                everyone |= watchers
            return everyone
        woken: set[Watcher] = set(self._wildcard) if changed else set()
        for name in changed:
            woken |= self._watches.get(name, set())
            short = short_name(name)
            if short != name:
                woken |= self._watches.get(short, set())
        return woken

    async def run(self) -> None:
        """Wake the watchers of every change, one debounce window after it, until cancelled."""
        seen = self.registry.revision
        while True:
            revision = await self.registry.wait_for_change(seen, timeout=_WATCH_TIMEOUT)
            if revision <= seen:
                continue
            changed_at = time.monotonic()
            if self.debounce:
                await asyncio.sleep(self.debounce)
            revision = self.registry.revision
            changed = self.registry.changes_since(seen)
            keys = self.registry.config_changes_since(seen)
            seen = revision
            if keys is None or keys or changed is None or changed:
                for gateway in self.translator.refresh(keys, changed):
                    for watcher in self._gateway_watches.get(gateway, ()):
                        watcher.config_changed(changed_at)
                self._refresh_mesh(keys, changed, changed_at)
            if not changed and changed is not None:
                continue
            woken = self.watchers(changed)
            if changed is not None:
                # Watchers re-resolve the plain names among these (see ``watchers``).
                changed = changed | {short_name(name) for name in changed}
            metrics.XDS_WAKEUPS.inc(len(woken))
            for watcher in woken:
                watcher.changed(changed, changed_at)

    def _refresh_mesh(
        self, keys: frozenset[ObjectKey] | None, changed: frozenset[str] | None, changed_at: float
    ) -> None:
        """Wake the streams of the gRPC targets that moved (all of them when anything may have:
        an answer held back while sources synced may go out now)."""
        moved = self.translator.mesh.refresh(keys, changed)
        if changed is None:
            moved = set(self._mesh_watches)
        woken: set[Watcher] = set()
        for name in moved:
            woken |= self._mesh_watches.get(name, set())
        for watcher in woken:
            watcher.config_changed(changed_at)

    # ----- resolution ----------------------------------------------------------------------

    def resolve(self, name: str, previous: str | None = None) -> str:
        """The service ``name`` stands for, given what it stood for before (``previous``).

        A registered service of that exact name, or a qualified ``name.namespace``, is
        itself. A plain name stands for the one ``name.<namespace>`` service. When several
        namespaces have it, a subscriber that had resolved it keeps its target (as long as
        that service exists) instead of losing every endpoint, and the ambiguity is counted
        and logged; a new subscriber gets nothing until it is resolved.
        """
        registry = self.registry
        if "." in name or "/" in name or registry.has(name):
            return name
        candidates = registry.qualified(name)
        if len(candidates) == 1:
            self._ambiguity_ended(name)
            return next(iter(candidates))
        if not candidates:
            self._ambiguity_ended(name)
            return name
        if name not in self._ambiguous:
            self._ambiguous.add(name)
            metrics.XDS_AMBIGUOUS_NAMES.set(len(self._ambiguous))
            log.warning(
                "short name is ambiguous; subscribers keep the service they resolved",
                extra={"short_name": name, "services": sorted(candidates)},
            )
        if previous is not None and previous in candidates:
            metrics.XDS_AMBIGUOUS_KEPT.inc()
            return previous
        return name

    def _ambiguity_ended(self, name: str) -> None:
        if name in self._ambiguous:
            self._ambiguous.discard(name)
            metrics.XDS_AMBIGUOUS_NAMES.set(len(self._ambiguous))
            log.info("short name is unambiguous again", extra={"short_name": name})

    # ----- resources and answers -----------------------------------------------------------

    def cluster_services(self, name: str) -> tuple[str, ...]:
        """The registry services of a cluster name ``namespace/service/port``."""
        namespace, _, rest = name.partition("/")
        service = rest.partition("/")[0]
        return self.translator.registry_names(namespace, service)

    def _port_resource(self, name: str) -> Resource:
        """A cluster's assignment: one port of a Service, from every source."""
        services = self.cluster_services(name)
        registered = self.registry.snapshot(services[0]) if len(services) > 1 else None
        kubernetes = self.registry.snapshot(services[-1])
        empty = ServiceSnapshot(name, 0, ())
        cached = self._ports.get(name)
        if (
            cached is not None
            and still_current(cached[0], registered or empty)
            and still_current(cached[1], kubernetes)
        ):
            return cached[2]
        ports = name.rsplit("/", 1)[-1]
        endpoints: dict[tuple[str, int], Endpoint] = {}
        if ports.isdigit() or ports == ALL_PORTS:
            for endpoint in (registered or empty).endpoints:
                if ports == ALL_PORTS or endpoint.port == int(ports):
                    endpoints.setdefault(endpoint.key, endpoint)
            # A Kubernetes source already chose the Service's port for its endpoints.
            for endpoint in kubernetes.endpoints:
                if endpoint.source is Source.KUBERNETES:
                    # gRPC clients refuse an assignment listing an address twice.
                    endpoints.setdefault(endpoint.key, endpoint)
        resource = build_resource(name, kubernetes, endpoints.values())
        self._ports.put(name, (registered or empty, kubernetes, resource))
        return resource

    def resource(self, name: str, target: str | None = None) -> Resource:
        """The resource ``name`` with the endpoints of ``target`` (default: its resolution)."""
        if "/" in name:
            return self._port_resource(name)
        if target is None:
            target = self.resolve(name)
        snapshot = self.registry.snapshot(target)
        cached = self._resources.get((name, target))
        if cached is not None and still_current(cached[0], snapshot):
            return cached[1]
        resource = build_resource(name, snapshot)
        self._resources.put((name, target), (snapshot, resource))
        return resource

    def items(self, subscription: Subscription) -> Items:
        """(name, target) of everything ``subscription`` covers right now, by name."""
        items = {name: subscription.targets.get(name) or name for name in subscription.names}
        if subscription.wildcard:
            for service in self.registry.services():
                items.setdefault(service, service)
        return tuple(sorted(items.items()))

    def resources(
        self, items: Sequence[tuple[str, str]], had: Container[str]
    ) -> tuple[list[Resource], int]:
        """The resources for ``items`` that may be sent now, and how many were held back.

        Until every source has synced, what sds knows may be partial: after a restart,
        registrations come back one heartbeat at a time, and an empty assignment may only
        mean "not learned yet". So a client that showed it had a resource (``had``, see
        :meth:`had`) gets no new answer for it yet and keeps the endpoints it has, instead of
        dropping some or all of them. A client that had nothing, a proxy starting fresh, gets
        what is known at once: withholding would protect nothing and only make it wait.
        """
        resources = [self.resource(name, target) for name, target in items]
        if self.registry.ready:
            return resources, 0
        sendable = [r for r in resources if r.name not in had]
        return sendable, len(resources) - len(sendable)

    def had(self, type_url: str, items: Items, version: str) -> frozenset[str]:
        """What a SotW or REST client showed it has, from the ``version_info`` of its request.

        An empty version: nothing (a fresh proxy). A version this sds answered with (our
        current answer, or an earlier one to a client that started fresh): nothing we could
        take away, as what we know only grows while sources sync. Any other version was
        accepted from an earlier sds: everything it asks for may have had endpoints.
        """
        if not version or self.registry.ready:
            return frozenset()
        self.answer(type_url, items, had=())  # the current answer counts as ours
        if self._issued.get(version):
            return frozenset()
        return frozenset(name for name, _ in items)

    def issued(self, version: str) -> bool:
        """Whether this process answered with ``version`` (a SotW version of ours)."""
        return bool(self._issued.get(version))

    def answer(self, type_url: str, items: Items, had: Container[str]) -> tuple[Answer, int]:
        """The shared SotW answer for ``items``, and how many resources it withholds.

        A type we do not serve gets an empty answer, so the proxy does not wait for one.
        """
        registry = self.registry
        ready = registry.ready  # before that, what a client had decides (see resources())
        if ready:
            if registry.revision != self._by_items_revision:
                self._by_items.clear()
                self._by_items_revision = registry.revision
            found = self._by_items.get((type_url, items))
            if found is not None:
                return found, 0
        resources, withheld = self.resources(items, had) if type_url == EDS_TYPE_URL else ([], 0)
        key = (type_url, tuple((r.name, r.version) for r in resources))
        answer = self._answers.get(key)
        if answer is None:
            answer = self._serialise(type_url, resources)
            self._answers.put(key, answer)
            self._issued.put(answer.version, True)
        if ready and len(self._by_items) < ANSWER_CACHE_SIZE:  # emptied by the next change
            self._by_items[(type_url, items)] = answer
        return answer, withheld

    def shared_answer(self, type_url: str, resources: list[Resource]) -> Answer:
        """The SotW answer carrying exactly ``resources``, serialised once for every stream."""
        key = (type_url, tuple((r.name, r.version) for r in resources))
        answer = self._answers.get(key)
        if answer is None:
            answer = self._serialise(type_url, resources)
            self._answers.put(key, answer)
            self._issued.put(answer.version, True)
        return answer

    def _serialise(self, type_url: str, resources: list[Resource]) -> Answer:
        version = combined_version(resources)
        body = discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[r.packed for r in resources],
            type_url=type_url,
            control_plane=self.control_plane,
        ).SerializeToString()
        return Answer(type_url, tuple(resources), version, body)

    def answer_json(self, answer: Answer) -> bytes:
        """``answer`` as REST-JSON, rendered once per set of resource versions."""
        key = (answer.type_url, answer.version)
        cached = self._json.get(key)
        if cached is None:
            message = discovery_pb2.DiscoveryResponse.FromString(answer.body)
            cached = json_format.MessageToJson(
                message, preserving_proto_field_name=True, indent=None
            ).encode()
            self._json.put(key, cached)
        return cached
