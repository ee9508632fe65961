"""One xDS gRPC stream, state-of-the-world or delta, independent of the gRPC plumbing.

A stream reacts to two kinds of event, handled one at a time in arrival order: a request from
the proxy (subscribe, ACK, NACK) and a wake-up from the cache (one of the names it watches
changed). Responses go out only when what the proxy subscribed to changed, and are written as
bytes the cache serialised once for every stream with the same resources.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from sds import metrics
from sds.gatewayapi.model import ObjectKey
from sds.xds.cache import Items, XdsCache
from sds.xds.node import gateway_of
from sds.xds.proxies import ProxyStatus, ProxyTracker, listed
from sds.xds.resources import (
    CDS_TYPE_URL,
    CONFIG_TYPE_URLS,
    EDS_TYPE_URL,
    LDS_TYPE_URL,
    RDS_TYPE_URL,
    SHORT_TYPE_NAMES,
    WILDCARD_TYPE_URLS,
    Resource,
)
from sds.xds.subscription import DEFAULT_MAX_NAMES, Subscription, SubscriptionError

log = logging.getLogger("sds.xds")

# Requests read ahead of handling at most; a client that floods is slowed by flow control.
_MAX_QUEUED_REQUESTS = 16
# Delta: nonces whose version is remembered for the ACK (older ones are long superseded).
_REMEMBERED_NONCES = 64
# Make before break, in the order Envoy needs them: a cluster before its endpoints, both
# before a route that sends to it; listeners before their routes.
_PUSH_ORDER = (CDS_TYPE_URL, EDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL)
# Proxyless gRPC targets: Listeners and RouteConfigurations named for them (Clusters are
# a function of their name alone, so nothing to watch).
_MESH_WATCHED = frozenset({LDS_TYPE_URL, RDS_TYPE_URL})


class XdsProtocolError(Exception):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT."""


class XdsResourceExhausted(Exception):
    """The client went over a cap; the stream ends with RESOURCE_EXHAUSTED."""


@dataclass(slots=True)
class _TypeState:
    """Per type URL: what the proxy subscribed to and what we sent it."""

    subscription: Subscription
    sent: dict[str, str] = field(default_factory=dict)  # name -> resource version
    answered: bool = False
    nonce: str = ""
    version: str = ""
    pending_change: float | None = None  # when the change behind the unACKed push happened
    # What the proxy showed it had when the stream opened: while sources sync, these names get
    # no new answer (a reconnect after an sds restart keeps its endpoints); others go at once.
    had: frozenset[str] = frozenset()
    # What the subscription covers (cache.items), kept until a name or a target moves.
    items: Items | None = None
    # Gateway streams: what the proxy acknowledged, and the resources last sent and last
    # acknowledged (make before break needs to know what the proxy really has).
    acked: dict[str, str] = field(default_factory=dict)
    sent_resources: dict[str, Resource] = field(default_factory=dict)
    acked_resources: dict[str, Resource] = field(default_factory=dict)
    nack: str = ""
    nonce_pending: bool = False


@dataclass(frozen=True, slots=True)
class _Meters:
    """The metric children of one transport, bound once (``labels()`` costs a lock each)."""

    pushes: Any
    push_time: Any
    convergence: Any

    @classmethod
    def of(cls, transport: str) -> _Meters:
        return cls(
            metrics.XDS_PUSHES.labels(transport),
            metrics.XDS_PUSH_TIME.labels(transport),
            metrics.XDS_CONVERGENCE.labels(transport),
        )


def _nonce_field(nonce: str) -> bytes:
    """``nonce`` serialised as field 5, where both DiscoveryResponse types keep it."""
    data = nonce.encode()
    if len(data) < 128:
        return b"\x2a" + bytes((len(data),)) + data
    encoded: bytes = discovery_pb2.DiscoveryResponse(nonce=nonce).SerializeToString()
    return encoded


def _set_version(sent: dict[str, str]) -> str:
    """The version of a set of (name, version) pairs, as ``combined_version`` computes it."""
    digest = hashlib.sha256()
    for name, version in sorted(sent.items()):
        digest.update(f"{name}={version};".encode())
    return digest.hexdigest()[:16]


class XdsStream:
    """Shared machinery: the event loop, subscriptions, watches and bookkeeping."""

    transport = "sotw"
    _meters: _Meters

    def __init__(
        self,
        cache: XdsCache,
        tracker: ProxyTracker,
        *,
        service: str,
        max_names: int = DEFAULT_MAX_NAMES,
    ) -> None:
        self._cache = cache
        self._tracker = tracker
        self._service = service  # "ads" or "eds": which gRPC service the stream came in on
        self._max_names = max_names
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        self._requests: deque[Any] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._ended = False
        self._idle = False
        self._writing = False
        self._changed: frozenset[str] | None = frozenset()
        self._changed_at: float | None = None
        self._config_dirty = False
        self.gateway: ObjectKey | None = None
        # Serves Listeners, RouteConfigurations or Clusters: a Gateway's, or a gRPC client's.
        self._config_stream = False
        self.status: ProxyStatus | None = None
        self.peer = ""

    # ----- the event loop ------------------------------------------------------------------

    async def run(
        self, requests: AsyncIterator[Any], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """Serve the stream until the proxy closes it (or it is cancelled)."""
        self._send = send
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                if self._requests:
                    request = self._requests.popleft()
                    self._room.set()
                    await self.on_request(request)
                elif self._changed_at is not None:
                    changed, changed_at = self._changed, self._changed_at
                    self._changed, self._changed_at = frozenset(), None
                    await self.on_change(changed, changed_at)
                elif self._ended:
                    break
                else:
                    self._wake.clear()
                    self._idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._idle = False
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            for type_url, state in self._types.items():
                if type_url == EDS_TYPE_URL:
                    self._cache.unwatch(self, state.subscription.names, wildcard=True)
                elif type_url in _MESH_WATCHED and self.gateway is None:
                    self._cache.watch_mesh(self, state.subscription.names, on=False)
            if self.gateway is not None:
                self._cache.watch_gateway(self, self.gateway, on=False)
            if self.status is not None:
                self._tracker.disconnect(self.status)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                if (
                    (self._idle or self._writing)
                    and not self._requests
                    and self.gateway is None  # a Gateway's ACKs may release held pushes
                    and self.acknowledged(request)
                ):
                    continue  # an ACK, handled here: one task switch less per push
                self._requests.append(request)
                self._wake.set()
                while len(self._requests) >= _MAX_QUEUED_REQUESTS:
                    self._room.clear()
                    await self._room.wait()
        except grpc.RpcError as exc:
            log.info("xds stream broke", extra={"error": str(exc)[:200]})
        finally:
            self._ended = True
            self._wake.set()

    async def _write(self, message: bytes) -> None:
        """Send ``message``; what it carries is recorded before, so its ACK may overtake us.

        The write completes on the event loop after the proxy may already have ACKed it; the
        reader may then take that ACK as it does while the stream is idle.
        """
        self._writing = True
        try:
            await self._send(message)
        finally:
            self._writing = False

    def changed(self, names: frozenset[str] | None, changed_at: float) -> None:
        """Called by the cache: ``names`` changed (None: anything may have)."""
        if names is None or self._changed is None:
            self._changed = None
        elif self._changed:
            self._changed = self._changed | names
        else:
            self._changed = names  # the cache's own set, shared by every stream it wakes
        if self._changed_at is None:
            self._changed_at = changed_at
        self._wake.set()

    def config_changed(self, changed_at: float) -> None:
        """Called by the cache: this proxy's Gateway has new resources."""
        self._config_dirty = True
        if self._changed_at is None:
            self._changed_at = changed_at
        self._wake.set()

    # ----- helpers for the two variants ----------------------------------------------------

    def _connect(self, node: base_pb2.Node) -> None:
        if self.status is None:
            self.status = self._tracker.connect(node, self.transport, self._service, self.peer)
            self.status.detail = self._detail
            self.status.type_states = self._type_states
            self.gateway = gateway_of(node)
            if self.gateway is not None:
                self._cache.watch_gateway(self, self.gateway)
                self._config_stream = True
        self.status.last_seen = time.time()

    def _type_states(self) -> dict[str, dict[str, Any]]:
        """Per type: SYNCED, STALE (sent, not yet acknowledged) or NACKED, and the error."""
        shown = {}
        for type_url, state in self._types.items():
            if state.nack:
                kind = "NACKED"
            elif state.answered and not state.nonce_pending:
                kind = "SYNCED"
            else:
                kind = "STALE"
            shown[SHORT_TYPE_NAMES.get(type_url, type_url)] = {
                "state": kind,
                "error": state.nack,
                "version_sent": state.version,
                "resources": len(state.sent),
            }
        return shown

    def _detail(self) -> dict[str, Any]:
        return {
            type_url: {
                "subscribed": state.subscription.listed(),
                "resolved": {
                    name: target
                    for name, target in sorted(state.subscription.targets.items())
                    if name != target
                },
                "sent": dict(sorted(state.sent.items())),
                "version_sent": state.version,
                "nonce_sent": state.nonce,
                "awaiting_ack": state.pending_change is not None,
            }
            for type_url, state in self._types.items()
        }

    def _config_resources(self, type_url: str, state: _TypeState) -> list[Resource] | None:
        """What a Gateway proxy may have of one config type now; None to send nothing yet.

        Make before break: a RouteConfiguration goes out only once every cluster it sends to
        is acknowledged with its endpoints (until then the proxy keeps the version it has);
        a cluster stays while a route the proxy acknowledged still sends to it. While sources
        sync, a proxy that showed it had resources gets none of this type (the answer is the
        whole set, and it would shrink).
        """
        if self.gateway is None:
            return self._mesh_resources(type_url, state)
        if state.had and not self._cache.registry.ready:
            return None
        desired = self._cache.translator.resources(self.gateway, type_url)
        subscription = state.subscription
        chosen = (
            dict(desired)
            if subscription.wildcard
            else {n: r for n, r in desired.items() if n in subscription.names}
        )
        if type_url == CDS_TYPE_URL:
            routes = self._types.get(RDS_TYPE_URL)
            if routes is not None:
                for route in routes.acked_resources.values():
                    for name in route.refs:
                        if name not in chosen and name in state.sent_resources:
                            chosen[name] = state.sent_resources[name]
        elif type_url == RDS_TYPE_URL:
            clusters, endpoints = self._types.get(CDS_TYPE_URL), self._types.get(EDS_TYPE_URL)
            ready = (
                clusters.acked.keys() & endpoints.acked.keys()
                if clusters is not None and endpoints is not None
                else set()
            )
            for name, resource in list(chosen.items()):
                if not resource.refs <= ready:
                    previous = state.acked_resources.get(name)
                    if previous is not None:
                        chosen[name] = previous
                    else:
                        del chosen[name]
        return [chosen[name] for name in sorted(chosen)]

    def _mesh_resources(self, type_url: str, state: _TypeState) -> list[Resource] | None:
        """What a proxyless gRPC client (a node of no Gateway) gets for the names it asked.

        While sources sync, a client that showed it had resources gets no Listener or Cluster
        answer that lacks a name it asked for: that would delete what it has.
        """
        subscription = state.subscription
        if subscription.wildcard or not subscription.names:
            return []
        mesh = self._cache.translator.mesh
        found = [
            resource
            for name in sorted(subscription.names)
            if (resource := mesh.resource(type_url, name)) is not None
        ]
        if (
            state.had
            and type_url != RDS_TYPE_URL
            and len(found) < len(subscription.names)
            and not self._cache.registry.ready
        ):
            return None
        return found

    def _type_url(self, type_url: str) -> str:
        if self._service == "eds":
            if type_url not in ("", EDS_TYPE_URL):
                raise XdsProtocolError(f"EndpointDiscoveryService serves only {EDS_TYPE_URL}")
            return EDS_TYPE_URL
        if not type_url:
            raise XdsProtocolError("type_url is required on an aggregated (ADS) stream")
        return type_url

    def _state(self, type_url: str) -> _TypeState:
        state = self._types.get(type_url)
        if state is None:
            subscription = Subscription(
                self._max_names, legacy_wildcard=type_url in WILDCARD_TYPE_URLS
            )
            state = self._types[type_url] = _TypeState(subscription)
        return state

    async def _push_config(self, changed_at: float | None) -> None:
        """Send every config type that moved, in make-before-break order."""
        for type_url in _PUSH_ORDER:
            state = self._types.get(type_url)
            if state is not None and type_url != EDS_TYPE_URL and state.answered:
                await self._send_type(type_url, state, changed_at)

    async def _send_type(self, type_url: str, state: _TypeState, changed_at: float | None) -> None:
        """Send one type if what the proxy should have of it moved."""
        raise NotImplementedError

    def _subscribe(
        self, type_url: str, state: _TypeState, update: Callable[[Subscription], set[str]]
    ) -> set[str]:
        """Apply ``update`` to the subscription, keep the watches in step; the names dropped."""
        subscription = state.subscription
        before, was_wildcard = set(subscription.names), subscription.wildcard
        try:
            dropped = update(subscription)
        except SubscriptionError as exc:
            metrics.XDS_REFUSED.labels("too_many_names" if exc.exhausted else "invalid_name").inc()
            if exc.exhausted:
                raise XdsResourceExhausted(str(exc)) from None
            raise XdsProtocolError(str(exc)) from None
        added = subscription.names - before
        subscription.resolve(self._cache.resolve, only=added)
        state.items = None
        if type_url == EDS_TYPE_URL:
            self._cache.unwatch(self, dropped, wildcard=was_wildcard and not subscription.wildcard)
            self._cache.watch(self, added, wildcard=subscription.wildcard and not was_wildcard)
        elif type_url in _MESH_WATCHED and self.gateway is None:
            self._cache.watch_mesh(self, dropped, on=False)
            self._cache.watch_mesh(self, added)
            self._config_stream = self._config_stream or bool(added)
        if self.status is not None:
            self.status.subscribed = listed(subscription.listed())
        return dropped

    def _refresh_targets(self, state: _TypeState, changed: frozenset[str] | None) -> None:
        """Re-resolve the names a change may have moved (``changed`` holds short names too)."""
        subscription = state.subscription
        only = None if changed is None else [n for n in subscription.names if n in changed]
        if subscription.resolve(self._cache.resolve, only=only) or subscription.wildcard:
            state.items = None  # a wildcard covers whatever services there are now

    def _items(self, state: _TypeState) -> Items:
        if state.items is None or state.subscription.wildcard:
            state.items = self._cache.items(state.subscription)
        return state.items

    def _next_nonce(self) -> str:
        return str(next(self._nonces))

    def _record_sent(
        self, state: _TypeState, nonce: str, version: str, changed_at: float | None
    ) -> None:
        state.nonce = nonce
        state.version = version
        state.nonce_pending = True
        if changed_at is not None and state.pending_change is None:
            state.pending_change = changed_at
        if self.status is not None:
            self.status.last_nonce_sent = nonce
            self.status.last_version_sent = version
            self.status.responses_sent += 1
            self._tracker.touch(self.status)
        self._meters.pushes.inc()

    def _record_ack(self, state: _TypeState, version: str) -> None:
        state.nack = ""
        state.nonce_pending = False
        if self.gateway is not None:
            state.acked = dict(state.sent)
            state.acked_resources = dict(state.sent_resources)
        latency = None
        if state.pending_change is not None:
            latency = time.monotonic() - state.pending_change
            self._meters.convergence.observe(latency)
            state.pending_change = None
        if self.status is not None:
            self.status.last_version_acked = version
            if latency is not None:
                self.status.last_convergence = latency
            self._tracker.touch(self.status)

    def _record_nack(self, state: _TypeState, nonce: str, error: str) -> None:
        state.pending_change = None
        state.nonce_pending = False
        state.nack = error[:1000] or "rejected"
        metrics.XDS_NACKS.labels(self.transport).inc()
        if self.status is not None:
            self.status.last_nack = error
            self.status.last_nack_nonce = nonce
            self.status.nacks += 1
            self._tracker.touch(self.status)
        log.warning(
            "proxy rejected a response",
            extra={
                "node_id": self.status.node_id if self.status else "",
                "nonce": nonce,
                "error": error[:500],
            },
        )

    def _held_back(self, sendable: int, withheld: int) -> bool:
        """Whether an answer is held back entirely while sources sync (see the cache)."""
        if withheld:
            metrics.XDS_WITHHELD.labels(self.transport).inc(withheld)
        return withheld > 0 and not sendable

    def acknowledged(self, request: Any) -> bool:
        """Record ``request`` if it is a plain ACK of the last response; else False.

        Only called while the stream is idle or waiting for a write (whose bookkeeping is
        done), so it sees the state ``on_request`` would.
        """
        return False

    async def on_request(self, request: Any) -> None:
        """Handle one request from the proxy."""
        raise NotImplementedError

    async def on_change(self, changed: frozenset[str] | None, changed_at: float) -> None:
        """Push what changed in the registry to this proxy."""
        raise NotImplementedError


class SotwStream(XdsStream):
    """State of the world: every response carries all the proxy's subscribed resources."""

    transport = "sotw"
    _meters = _Meters.of(transport)

    def acknowledged(self, request: discovery_pb2.DiscoveryRequest) -> bool:
        """A SotW ACK: the last nonce, no error, the same subscription."""
        if not request.response_nonce or request.HasField("error_detail"):
            return False
        state = self._types.get(request.type_url)
        if (
            state is None
            or self.status is None
            or request.response_nonce != state.nonce
            or not state.subscription.same_as(request.resource_names)
        ):
            return False
        self.status.last_seen = time.time()
        self._record_ack(state, request.version_info)
        return True

    async def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Subscribe, ACK or NACK; answer when the subscription is new or changed."""
        self._connect(request.node)
        type_url = self._type_url(request.type_url)
        first = type_url not in self._types
        state = self._state(type_url)
        if request.response_nonce and request.response_nonce != state.nonce:
            return  # stale: answers a response that a newer one superseded
        names = list(request.resource_names)
        if request.response_nonce:
            if request.HasField("error_detail"):
                self._record_nack(state, request.response_nonce, request.error_detail.message)
            else:
                self._record_ack(state, request.version_info)
            if state.subscription.same_as(names):
                if self.gateway is not None and not request.HasField("error_detail"):
                    await self._push_config(None)  # an ACK may release a held route
                return
        self._subscribe(type_url, state, lambda s: s.replace(names))
        if first:
            # A reconnecting proxy repeats the version it last accepted; a fresh one sends none.
            if type_url in CONFIG_TYPE_URLS:
                issued = self._cache.issued(request.version_info)
                state.had = frozenset({"*"}) if request.version_info and not issued else frozenset()
            else:
                state.had = self._cache.had(type_url, self._items(state), request.version_info)
        await self._answer(type_url, state, None, force=True)

    async def on_change(self, changed: frozenset[str] | None, changed_at: float) -> None:
        """Send a fresh state of the world when the subscribed resources changed."""
        config = self._config_dirty or changed is None
        self._config_dirty = False
        if config and self._config_stream:
            state = self._types.get(CDS_TYPE_URL)
            if state is not None and state.answered:
                await self._send_type(CDS_TYPE_URL, state, changed_at)
        state = self._types.get(EDS_TYPE_URL)
        if state is not None:
            self._refresh_targets(state, changed)
            await self._answer(EDS_TYPE_URL, state, changed_at, force=False)
        if config and self._config_stream:
            await self._push_config(changed_at)

    async def _send_type(self, type_url: str, state: _TypeState, changed_at: float | None) -> None:
        await self._answer(type_url, state, changed_at, force=False)

    async def _answer(
        self, type_url: str, state: _TypeState, changed_at: float | None, *, force: bool
    ) -> None:
        started = time.perf_counter()
        if type_url in CONFIG_TYPE_URLS:
            resources = self._config_resources(type_url, state)
            if resources is None:
                metrics.XDS_WITHHELD.labels(self.transport).inc()
                return
            answer = self._cache.shared_answer(type_url, resources)
        else:
            answer, withheld = self._cache.answer(type_url, self._items(state), state.had)
            if self._held_back(len(answer.resources), withheld):
                return
        # The answer's version is a hash of every (name, version) it carries.
        if not force and state.answered and answer.version == state.version:
            return
        nonce = self._next_nonce()
        state.sent, state.answered = answer.sent, True
        if self.gateway is not None:
            state.sent_resources = {r.name: r for r in answer.resources}
        self._record_sent(state, nonce, answer.version, changed_at)
        await self._write(answer.body + _nonce_field(nonce))
        self._meters.push_time.observe(time.perf_counter() - started)


class DeltaStream(XdsStream):
    """Incremental: only changed resources are sent, each with its own version.

    Names that leave the subscription, and services a wildcard subscriber had that are gone,
    are listed in ``removed_resources``.
    """

    transport = "delta"
    _meters = _Meters.of(transport)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._versions_by_nonce: dict[str, str] = {}
        # Gateway streams: what each unacknowledged response left the proxy with.
        self._state_by_nonce: dict[str, tuple[dict[str, str], dict[str, Resource]]] = {}

    async def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Apply subscription changes, record ACK/NACK, send what the proxy lacks."""
        self._connect(request.node)
        type_url = self._type_url(request.type_url)
        first = type_url not in self._types
        state = self._state(type_url)
        if first:
            # What the proxy already has (after a reconnect) need not be sent again, and while
            # sources sync it is not replaced by what sds has learned so far.
            state.sent.update(request.initial_resource_versions)
            state.had = frozenset(request.initial_resource_versions)
        acked = False
        if request.response_nonce:
            version = self._versions_by_nonce.pop(request.response_nonce, None)
            had = self._state_by_nonce.pop(request.response_nonce, None)
            if request.HasField("error_detail"):
                self._record_nack(state, request.response_nonce, request.error_detail.message)
            elif version is not None:
                self._record_ack(state, version)
                if had is not None:
                    state.acked, state.acked_resources = had
                acked = True
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        if first and type_url in WILDCARD_TYPE_URLS and not subscribe:
            subscribe = ["*"]  # the legacy wildcard: an empty first request asks for all
        if subscribe or unsubscribe:
            self._subscribe(type_url, state, lambda s: s.change(subscribe, unsubscribe))
        await self._push(type_url, state, None, force_empty=first and type_url != EDS_TYPE_URL)
        if acked and self.gateway is not None:
            await self._push_config(None)  # an ACK may release a held route

    async def on_change(self, changed: frozenset[str] | None, changed_at: float) -> None:
        """Send the subscribed resources whose version moved, and what is gone."""
        config = self._config_dirty or changed is None
        self._config_dirty = False
        if config and self._config_stream:
            state = self._types.get(CDS_TYPE_URL)
            if state is not None and state.answered:
                await self._push(CDS_TYPE_URL, state, changed_at)
        state = self._types.get(EDS_TYPE_URL)
        if state is not None:
            self._refresh_targets(state, changed)
            await self._push(EDS_TYPE_URL, state, changed_at)
        if config and self._config_stream:
            await self._push_config(changed_at)

    async def _send_type(self, type_url: str, state: _TypeState, changed_at: float | None) -> None:
        await self._push(type_url, state, changed_at)

    async def _push(
        self,
        type_url: str,
        state: _TypeState,
        changed_at: float | None,
        *,
        force_empty: bool = False,
    ) -> None:
        started = time.perf_counter()
        if type_url in CONFIG_TYPE_URLS:
            chosen = self._config_resources(type_url, state)
            if chosen is None:
                metrics.XDS_WITHHELD.labels(self.transport).inc()
                return
            resources = chosen
            covered = {r.name for r in resources}
        else:
            items = self._items(state) if type_url == EDS_TYPE_URL else ()
            covered = {name for name, _ in items}
            resources, withheld = self._cache.resources(items, state.had)
            if withheld:
                metrics.XDS_WITHHELD.labels(self.transport).inc(withheld)
        removed = sorted(name for name in state.sent if name not in covered)
        for name in removed:
            del state.sent[name]
            state.sent_resources.pop(name, None)
        changed = [r for r in resources if state.sent.get(r.name) != r.version]
        if not changed and not removed and not force_empty:
            return
        for resource in changed:
            state.sent[resource.name] = resource.version
            if self.gateway is not None:
                state.sent_resources[resource.name] = resource
        nonce = self._next_nonce()
        state.answered = True
        version = _set_version(state.sent)
        self._versions_by_nonce[nonce] = version
        if len(self._versions_by_nonce) > _REMEMBERED_NONCES:
            self._versions_by_nonce.pop(next(iter(self._versions_by_nonce)))
        if self.gateway is not None:
            self._state_by_nonce[nonce] = (dict(state.sent), dict(state.sent_resources))
            if len(self._state_by_nonce) > _REMEMBERED_NONCES:
                self._state_by_nonce.pop(next(iter(self._state_by_nonce)))
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=nonce,
            removed_resources=removed,
            control_plane=self._cache.control_plane,
        ).SerializeToString()
        self._record_sent(state, nonce, version, changed_at)
        await self._write(header + b"".join(r.delta_chunk for r in changed))
        self._meters.push_time.observe(time.perf_counter() - started)


def stream_factory(
    cache: XdsCache, tracker: ProxyTracker, max_names: int = DEFAULT_MAX_NAMES
) -> Callable[[type[XdsStream], str], XdsStream]:
    """Build streams sharing one cache and tracker."""

    def make(kind: type[XdsStream], service: str) -> XdsStream:
        return kind(cache, tracker, service=service, max_names=max_names)

    return make
