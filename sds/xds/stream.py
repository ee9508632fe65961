"""One xDS gRPC stream, state-of-the-world or delta, independent of the gRPC plumbing.

A stream reacts to two kinds of event, handled one at a time in arrival order: a request from
the proxy (subscribe, ACK, NACK) and a registry change (debounced, so a burst of changes
becomes one push). Responses go out only when a resource the proxy subscribed to changed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from sds import metrics
from sds.registry import Registry
from sds.xds.proxies import ProxyStatus, ProxyTracker, listed
from sds.xds.resources import EDS_TYPE_URL, Resource, ResourceCache, combined_version

log = logging.getLogger("sds.xds")

CONTROL_PLANE = base_pb2.ControlPlane(identifier="envoymesh-sds")

# How long the change watcher sleeps at most before re-checking; only bounds the wait.
_WATCH_TIMEOUT = 30.0


class XdsProtocolError(Exception):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT."""


@dataclass(slots=True)
class _TypeState:
    """Per type URL: what the proxy subscribed to and what we sent it."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> resource version
    nonce: str = ""
    version: str = ""
    pending_change: float | None = None  # when the change behind the unACKed push happened


class XdsStream:
    """Shared machinery: the event loop, the change watcher and the bookkeeping."""

    transport = "sotw"

    def __init__(
        self,
        registry: Registry,
        cache: ResourceCache,
        tracker: ProxyTracker,
        *,
        service: str,
        debounce: float,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._tracker = tracker
        self._service = service  # "ads" or "eds": which gRPC service the stream came in on
        self._debounce = debounce
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        # Bounded, so a client that floods requests is slowed down by gRPC flow control.
        self._inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=16)
        self._change_queued = False
        self.status: ProxyStatus | None = None

    # ----- the event loop ------------------------------------------------------------------

    async def run(
        self, requests: AsyncIterator[Any], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        """Serve the stream until the proxy closes it (or it is cancelled)."""
        self._send = send
        reader = asyncio.create_task(self._read(requests))
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                kind, payload = await self._inbox.get()
                if kind == "end":
                    break
                if kind == "request":
                    await self.on_request(payload)
                else:
                    self._change_queued = False
                    await self.on_change(payload)
        finally:
            for task in (reader, watcher):
                task.cancel()
            await asyncio.gather(reader, watcher, return_exceptions=True)
            if self.status is not None:
                self._tracker.disconnect(self.status)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                await self._inbox.put(("request", request))
        except grpc.RpcError as exc:
            log.info("xds stream broke", extra={"error": str(exc)[:200]})
        await self._inbox.put(("end", None))

    async def _watch(self) -> None:
        seen = self._registry.revision
        while True:
            revision = await self._registry.wait_for_change(seen, timeout=_WATCH_TIMEOUT)
            if revision <= seen:
                continue
            changed_at = time.monotonic()
            if self._debounce:
                await asyncio.sleep(self._debounce)
            seen = self._registry.revision
            if not self._change_queued:
                self._change_queued = True
                await self._inbox.put(("change", changed_at))

    # ----- helpers for the two variants ----------------------------------------------------

    def _connect(self, node: base_pb2.Node) -> None:
        if self.status is None:
            self.status = self._tracker.connect(node, self.transport, self._service)
            log.info(
                "proxy connected",
                extra={
                    "node_id": node.id,
                    "proxy_cluster": node.cluster,
                    "transport": self.transport,
                    "grpc_service": self._service,
                },
            )
        self.status.last_seen = time.time()

    def _type_url(self, type_url: str) -> str:
        if self._service == "eds":
            if type_url not in ("", EDS_TYPE_URL):
                raise XdsProtocolError(f"EndpointDiscoveryService serves only {EDS_TYPE_URL}")
            return EDS_TYPE_URL
        if not type_url:
            raise XdsProtocolError("type_url is required on an aggregated (ADS) stream")
        return type_url

    def _resources(self, state: _TypeState, type_url: str) -> list[Resource]:
        if type_url != EDS_TYPE_URL:
            return []  # we serve no other type; an empty answer keeps the proxy from waiting
        return self._cache.answerable(self._cache.known_names() if state.wildcard else state.names)

    def _show_subscription(self, state: _TypeState) -> None:
        if self.status is not None:
            self.status.subscribed = listed(sorted(state.names)) + (["*"] if state.wildcard else [])

    def _next_nonce(self) -> str:
        return str(next(self._nonces))

    def _record_sent(
        self, state: _TypeState, nonce: str, version: str, changed_at: float | None
    ) -> None:
        state.nonce = nonce
        state.version = version
        if changed_at is not None and state.pending_change is None:
            state.pending_change = changed_at
        if self.status is not None:
            self.status.last_nonce_sent = nonce
            self.status.last_version_sent = version
            self.status.responses_sent += 1
        metrics.XDS_PUSHES.labels(self.transport).inc()

    def _record_ack(self, state: _TypeState, version: str) -> None:
        if self.status is not None:
            self.status.last_version_acked = version
        if state.pending_change is not None:
            metrics.XDS_CONVERGENCE.labels(self.transport).observe(
                time.monotonic() - state.pending_change
            )
            state.pending_change = None

    def _record_nack(self, state: _TypeState, nonce: str, error: str) -> None:
        state.pending_change = None
        metrics.XDS_NACKS.labels(self.transport).inc()
        if self.status is not None:
            self.status.last_nack = error
            self.status.last_nack_nonce = nonce
            self.status.nacks += 1
        log.warning(
            "proxy rejected a response",
            extra={
                "node_id": self.status.node_id if self.status else "",
                "nonce": nonce,
                "error": error[:500],
            },
        )

    async def on_request(self, request: Any) -> None:
        """Handle one request from the proxy."""
        raise NotImplementedError

    async def on_change(self, changed_at: float) -> None:
        """Push what changed in the registry to this proxy."""
        raise NotImplementedError


class SotwStream(XdsStream):
    """State of the world: every response carries all the proxy's subscribed resources."""

    transport = "sotw"

    async def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Subscribe, ACK or NACK; answer when the subscription is new or changed."""
        self._connect(request.node)
        type_url = self._type_url(request.type_url)
        state = self._types.setdefault(type_url, _TypeState())
        if request.response_nonce and request.response_nonce != state.nonce:
            return  # stale: answers a response that a newer one superseded
        # An empty list means "nothing" (the spec's legacy wildcard is for LDS/CDS only);
        # "*" asks for every service.
        names = set(request.resource_names)
        wildcard = "*" in names
        names.discard("*")
        same_subscription = (wildcard, names) == (state.wildcard, state.names)
        if request.response_nonce:
            if request.HasField("error_detail"):
                self._record_nack(state, request.response_nonce, request.error_detail.message)
            else:
                self._record_ack(state, request.version_info)
            if same_subscription:
                return
        state.wildcard, state.names = wildcard, names
        self._show_subscription(state)
        resources = self._resources(state, type_url)
        if type_url == EDS_TYPE_URL and (names or wildcard) and not resources:
            return  # all withheld until the sources have synced; the change wakes us
        await self._respond(type_url, state, None, resources)

    async def on_change(self, changed_at: float) -> None:
        """Send a fresh state of the world for each type whose resources changed."""
        for type_url, state in self._types.items():
            if type_url != EDS_TYPE_URL or not (state.names or state.wildcard):
                continue
            resources = self._resources(state, type_url)
            if resources and {r.name: r.version for r in resources} != state.sent:
                await self._respond(type_url, state, changed_at, resources)

    async def _respond(
        self,
        type_url: str,
        state: _TypeState,
        changed_at: float | None,
        resources: list[Resource] | None = None,
    ) -> None:
        started = time.perf_counter()
        if resources is None:
            resources = self._resources(state, type_url)
        nonce = self._next_nonce()
        version = combined_version(resources)
        await self._send(
            discovery_pb2.DiscoveryResponse(
                version_info=version,
                resources=[r.packed for r in resources],
                type_url=type_url,
                nonce=nonce,
                control_plane=CONTROL_PLANE,
            )
        )
        state.sent = {r.name: r.version for r in resources}
        self._record_sent(state, nonce, version, changed_at)
        metrics.XDS_PUSH_TIME.labels(self.transport).observe(time.perf_counter() - started)


class DeltaStream(XdsStream):
    """Incremental: only changed resources are sent, each with its own version."""

    transport = "delta"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._versions_by_nonce: dict[str, str] = {}

    async def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Apply subscription changes, record ACK/NACK, send what the proxy lacks."""
        self._connect(request.node)
        type_url = self._type_url(request.type_url)
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = _TypeState()
            # What the proxy already has (after a reconnect) need not be sent again.
            state.sent.update(request.initial_resource_versions)
        if request.response_nonce:
            version = self._versions_by_nonce.pop(request.response_nonce, None)
            if request.HasField("error_detail"):
                self._record_nack(state, request.response_nonce, request.error_detail.message)
            elif version is not None:
                self._record_ack(state, version)
        for name in request.resource_names_subscribe:
            if name == "*":
                state.wildcard = True
            else:
                state.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
            else:
                state.names.discard(name)
                state.sent.pop(name, None)
        self._show_subscription(state)
        await self._push(type_url, state, None, force_empty=request.response_nonce == "")

    async def on_change(self, changed_at: float) -> None:
        """Send the subscribed resources whose version moved."""
        for type_url, state in self._types.items():
            if type_url == EDS_TYPE_URL:
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
        resources = self._resources(state, type_url)
        changed = [r for r in resources if state.sent.get(r.name) != r.version]
        if not changed and not (force_empty and type_url != EDS_TYPE_URL):
            return
        nonce = self._next_nonce()
        for resource in changed:
            state.sent[resource.name] = resource.version
        version = (
            combined_version(self._cache.get(n) for n in state.sent)
            if type_url == EDS_TYPE_URL
            else ""
        )
        self._versions_by_nonce[nonce] = version
        if len(self._versions_by_nonce) > 64:
            self._versions_by_nonce.pop(next(iter(self._versions_by_nonce)))
        await self._send(
            discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                resources=[
                    discovery_pb2.Resource(name=r.name, version=r.version, resource=r.packed)
                    for r in changed
                ],
                type_url=type_url,
                nonce=nonce,
                control_plane=CONTROL_PLANE,
            )
        )
        self._record_sent(state, nonce, version, changed_at)
        metrics.XDS_PUSH_TIME.labels(self.transport).observe(time.perf_counter() - started)


def stream_factory(
    registry: Registry, cache: ResourceCache, tracker: ProxyTracker, debounce: float
) -> Callable[[type[XdsStream], str], XdsStream]:
    """Build streams sharing one registry, cache and tracker."""

    def make(kind: type[XdsStream], service: str) -> XdsStream:
        return kind(registry, cache, tracker, service=service, debounce=debounce)

    return make
