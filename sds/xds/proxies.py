"""Who is connected and how far each proxy got: the data behind ``/debug/proxies``.

The equivalent of ``istioctl proxy-status``: for every xDS client, what we last sent, what it
last acknowledged, and the last error it reported.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2

from sds import metrics
from sds.xds.subscription import DEFAULT_MAX_NAMES, Subscription

log = logging.getLogger("sds.xds")

# A REST client that has not polled for this long is no longer listed as connected.
REST_CLIENT_EXPIRY = 120.0
# REST clients are unauthenticated; bound what they can make us remember.
MAX_REST_CLIENTS = 10_000
MAX_LISTED_RESOURCES = 100


def listed(names: list[str]) -> list[str]:
    """Resource names as shown in a status: at most MAX_LISTED_RESOURCES of them."""
    if len(names) <= MAX_LISTED_RESOURCES:
        return names
    return [*names[:MAX_LISTED_RESOURCES], f"(+{len(names) - MAX_LISTED_RESOURCES} more)"]


_ids = itertools.count(1)


@dataclass(slots=True)
class ProxyStatus:
    """One xDS client connection (or one REST poller, keyed by node id)."""

    node_id: str
    cluster: str
    transport: str  # rest, sotw or delta
    service: str  # ads, eds or rest
    user_agent: str = ""
    peer: str = ""
    subscribed: list[str] = field(default_factory=list)
    last_version_sent: str = ""
    last_nonce_sent: str = ""
    last_version_acked: str = ""
    last_nack: str = ""
    last_nack_nonce: str = ""
    responses_sent: int = 0
    nacks: int = 0
    connected_since: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    # Seconds from the registry change behind the last ACKed push to its ACK.
    last_convergence: float | None = None
    id: int = field(default_factory=lambda: next(_ids))
    # Per type: what was subscribed and sent (names, versions, nonces); for one node's page.
    detail: Callable[[], dict[str, Any]] | None = None
    # Per type (cds, eds, lds, rds): SYNCED, STALE or NACKED and the error; for every listing.
    type_states: Callable[[], dict[str, Any]] | None = None

    @property
    def state(self) -> str:
        """SYNCED when the last response was ACKed, NACKED when rejected, else STALE."""
        if self.last_nack and self.last_nack_nonce == self.last_nonce_sent:
            return "NACKED"
        if self.last_version_sent and self.last_version_acked == self.last_version_sent:
            return "SYNCED"
        return "STALE"

    def as_json(self, *, detail: bool = False) -> dict[str, Any]:
        """The fields ``/debug/proxies`` shows; with ``detail``, what was sent, per type."""
        shown = {
            "id": self.id,
            "node_id": self.node_id,
            "cluster": self.cluster,
            "transport": self.transport,
            "service": self.service,
            "user_agent": self.user_agent,
            "peer": self.peer,
            "subscribed": sorted(self.subscribed),
            "last_version_sent": self.last_version_sent,
            "last_nonce_sent": self.last_nonce_sent,
            "last_version_acked": self.last_version_acked,
            "last_nack": self.last_nack,
            "responses_sent": self.responses_sent,
            "nacks": self.nacks,
            "state": self.state,
            "connected_since": self.connected_since,
            "last_seen": self.last_seen,
            "last_convergence": self.last_convergence,
        }
        if self.type_states is not None:
            shown["type_states"] = self.type_states()
        if detail and self.detail is not None:
            shown["types"] = self.detail()
        return shown


class ProxyTracker:
    """Every connected proxy; streams register on connect and leave on disconnect."""

    def __init__(self) -> None:
        self._streams: dict[int, ProxyStatus] = {}
        self._rest: dict[str, ProxyStatus] = {}
        self._rest_subscriptions: dict[str, Subscription] = {}
        # Ids of the statuses changed since a watcher (the UI) last took them; None while
        # nobody watches, so a push costs one attribute check then.
        self._touched: set[int] | None = None
        self.touched = asyncio.Event()

    def touch(self, status: ProxyStatus) -> None:
        """Note that ``status`` changed (connected, sent, ACKed, NACKed, gone): O(1)."""
        if self._touched is not None:
            self._touched.add(status.id)
            self.touched.set()

    def watch(self, on: bool) -> None:
        """Start (or stop) remembering which statuses :meth:`touch` reports."""
        self._touched = (self._touched or set()) if on else None

    def take_touched(self) -> set[int]:
        """The ids touched since the last call (the statuses may be gone since)."""
        touched = self._touched or set()
        if self._touched is not None:
            self._touched = set()
        self.touched.clear()
        return touched

    def get(self, status_id: int) -> ProxyStatus | None:
        """The connected stream or REST poller with this id, if it is still there."""
        found = self._streams.get(status_id)
        if found is not None:
            return found
        return next((s for s in self._rest.values() if s.id == status_id), None)

    def connect(
        self, node: base_pb2.Node, transport: str, service: str, peer: str = ""
    ) -> ProxyStatus:
        """Record a new stream from ``node`` (on its first request)."""
        status = ProxyStatus(
            node_id=node.id,
            cluster=node.cluster,
            transport=transport,
            service=service,
            user_agent=f"{node.user_agent_name}/{node.user_agent_version}".strip("/"),
            peer=peer,
        )
        self._streams[status.id] = status
        self.touch(status)
        metrics.XDS_STREAMS.labels(transport).inc()
        log.info(
            "proxy connected",
            extra={
                "node_id": node.id,
                "proxy_cluster": node.cluster,
                "transport": transport,
                "grpc_service": service,
                "peer": peer,
                "stream": status.id,
            },
        )
        return status

    def disconnect(self, status: ProxyStatus) -> None:
        """Forget a stream that ended."""
        if self._streams.pop(status.id, None) is not None:
            self.touch(status)
            metrics.XDS_STREAMS.labels(status.transport).dec()
            log.info(
                "proxy disconnected",
                extra={
                    "node_id": status.node_id,
                    "transport": status.transport,
                    "peer": status.peer,
                    "stream": status.id,
                    "seconds_connected": round(time.time() - status.connected_since, 3),
                    "responses_sent": status.responses_sent,
                },
            )

    def rest_subscription(
        self, node: base_pb2.Node, max_names: int = DEFAULT_MAX_NAMES
    ) -> Subscription:
        """A copy of the REST poller's subscription (new for a new poller), to update."""
        known = self._rest_subscriptions.get(f"{node.id}\0{node.cluster}")
        subscription = Subscription(max_names)
        if known is not None:
            subscription.names = set(known.names)
            subscription.wildcard = known.wildcard
            subscription.targets = dict(known.targets)
        return subscription

    def rest_client(self, node: base_pb2.Node, subscription: Subscription) -> ProxyStatus:
        """The status of a REST poller, created on its first poll; keeps its subscription."""
        key = f"{node.id}\0{node.cluster}"
        self._rest_subscriptions[key] = subscription
        status = self._rest.get(key)
        if status is None:
            self._forget_idle_rest_clients()
            if len(self._rest) >= MAX_REST_CLIENTS:
                oldest = min(self._rest, key=lambda k: self._rest[k].last_seen)
                del self._rest[oldest]
                self._rest_subscriptions.pop(oldest, None)
            status = ProxyStatus(
                node_id=node.id,
                cluster=node.cluster,
                transport="rest",
                service="rest",
                user_agent=f"{node.user_agent_name}/{node.user_agent_version}".strip("/"),
            )
            self._rest[key] = status
        status.last_seen = time.time()
        self.touch(status)
        return status

    def _forget_idle_rest_clients(self) -> None:
        cutoff = time.time() - REST_CLIENT_EXPIRY
        for key in [k for k, s in self._rest.items() if s.last_seen < cutoff]:
            self.touch(self._rest.pop(key))
            self._rest_subscriptions.pop(key, None)

    def all(self) -> list[ProxyStatus]:
        """Connected streams and recently seen REST pollers, oldest first."""
        self._forget_idle_rest_clients()
        return sorted([*self._streams.values(), *self._rest.values()], key=lambda s: s.id)
