"""What the page shows of services and proxies: bounded, filtered and paged on the server."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from sds.model import Health, ServiceSnapshot
from sds.registry import Registry
from sds.xds.proxies import ProxyStatus, ProxyTracker

# A service's endpoints shown at most (the count says how many there are).
MAX_ENDPOINTS_SHOWN = 50
# Subscribed resource names shown per proxy at most.
MAX_SUBSCRIBED_SHOWN = 10
MAX_PAGE = 200
PROXY_STATES = ("SYNCED", "STALE", "NACKED")


class EndpointView(BaseModel):
    """One endpoint of a service."""

    address: str
    port: int
    health: str = Field(description="HEALTHY, DRAINING or UNHEALTHY")
    zone: str
    region: str
    weight: int
    canary: bool
    tags: dict[str, str]
    source: str = Field(description="where sds learned it: kubernetes or registration")
    last_heartbeat: float | None = Field(
        description="registered hosts: Unix time of the last heartbeat"
    )


class ServiceView(BaseModel):
    """One service and its endpoints."""

    name: str
    version: int = Field(description="registry revision of its last real change")
    endpoints_total: int
    health: dict[str, int] = Field(description="endpoints per health state")
    endpoints: list[EndpointView] = Field(
        description=f"the first {MAX_ENDPOINTS_SHOWN} endpoints, in address order"
    )


class ServiceTotals(BaseModel):
    """Counts over every service."""

    services: int
    endpoints: int
    health: dict[str, int] = Field(description="endpoints per health state")


class ServicesPage(BaseModel):
    """One page of the services that match a filter."""

    seq: int = Field(description="the last stream event this answer already reflects")
    total: int = Field(description="services matching the filter")
    offset: int
    limit: int
    services: list[ServiceView]
    totals: ServiceTotals


class TypeView(BaseModel):
    """How far one resource type of a proxy is in sync."""

    state: str = Field(description="SYNCED, STALE or NACKED")
    error: str = Field("", description="the proxy's error text when NACKED")


class ProxyView(BaseModel):
    """One connected xDS client (an Envoy, a gRPC client, a REST poller)."""

    id: int
    node_id: str
    cluster: str = Field(description="the node's cluster: its Gateway or service")
    transport: str = Field(description="sotw, delta or rest")
    service: str = Field(description="ads, eds or rest")
    user_agent: str
    peer: str
    subscribed: list[str] = Field(description=f"the first {MAX_SUBSCRIBED_SHOWN} names")
    subscribed_total: int
    state: str = Field(description="SYNCED, STALE (sent, not yet ACKed) or NACKED")
    types: dict[str, TypeView] = Field(
        description="per resource type, when sds tracks it per type (else only `state`)"
    )
    last_nack: str = Field(description="the error text of the last NACK")
    nacks: int
    responses_sent: int
    last_version_sent: str
    last_version_acked: str
    last_convergence: float | None = Field(
        description="seconds from the change behind the last ACKed push to its ACK"
    )
    connected_since: float = Field(description="Unix time")
    last_seen: float = Field(description="Unix time")


class ProxyTotals(BaseModel):
    """Counts over every connected proxy."""

    proxies: int
    by_state: dict[str, int]
    by_transport: dict[str, int]


class ProxiesPage(BaseModel):
    """One page of the proxies that match a filter."""

    seq: int = Field(description="the last stream event this answer already reflects")
    total: int = Field(description="proxies matching the filter")
    offset: int
    limit: int
    proxies: list[ProxyView]
    totals: ProxyTotals


def service_view(snapshot: ServiceSnapshot) -> ServiceView:
    """The page's view of one service."""
    health = Counter(e.health.value for e in snapshot.endpoints)
    return ServiceView(
        name=snapshot.name,
        version=snapshot.version,
        endpoints_total=len(snapshot.endpoints),
        health={h.value: health.get(h.value, 0) for h in Health},
        endpoints=[
            EndpointView(
                address=e.address,
                port=e.port,
                health=e.health.value,
                zone=e.zone,
                region=e.region,
                weight=e.weight,
                canary=e.canary,
                tags=dict(e.tags),
                source=e.source.value,
                last_heartbeat=e.last_check_in,
            )
            for e in snapshot.endpoints[:MAX_ENDPOINTS_SHOWN]
        ],
    )


def service_totals(registry: Registry) -> ServiceTotals:
    """Services, endpoints and endpoints per health over the whole registry."""
    health: Counter[str] = Counter()
    names = registry.services()
    for name in names:
        health.update(e.health.value for e in registry.snapshot(name).endpoints)
    return ServiceTotals(
        services=len(names),
        endpoints=sum(health.values()),
        health={h.value: health.get(h.value, 0) for h in Health},
    )


def services_page(registry: Registry, seq: int, text: str, offset: int, limit: int) -> ServicesPage:
    """The services whose name or an endpoint address holds ``text``, one page of them."""
    needle = text.casefold()
    names = registry.services()
    if needle:
        names = [
            n
            for n in names
            if needle in n.casefold()
            or any(needle in e.address for e in registry.snapshot(n).endpoints)
        ]
    return ServicesPage(
        seq=seq,
        total=len(names),
        offset=offset,
        limit=limit,
        services=[service_view(registry.snapshot(n)) for n in names[offset : offset + limit]],
        totals=service_totals(registry),
    )


def _types(shown: dict[str, Any]) -> dict[str, TypeView]:
    """Per-type states from a status's JSON, where the tracker gives them."""
    types = shown.get("type_states")
    if not isinstance(types, dict):
        return {}
    return {
        str(url): TypeView(state=value["state"], error=str(value.get("error") or ""))
        for url, value in types.items()
        if isinstance(value, dict) and isinstance(value.get("state"), str)
    }


def proxy_view(status: ProxyStatus) -> ProxyView:
    """The page's view of one proxy (nothing secret: ``/debug/proxies`` shows the same)."""
    shown = status.as_json()
    return ProxyView(
        id=status.id,
        node_id=status.node_id,
        cluster=status.cluster,
        transport=status.transport,
        service=status.service,
        user_agent=status.user_agent,
        peer=status.peer,
        subscribed=sorted(status.subscribed)[:MAX_SUBSCRIBED_SHOWN],
        subscribed_total=len(status.subscribed),
        state=status.state,
        types=_types(shown),
        last_nack=status.last_nack,
        nacks=status.nacks,
        responses_sent=status.responses_sent,
        last_version_sent=status.last_version_sent,
        last_version_acked=status.last_version_acked,
        last_convergence=status.last_convergence,
        connected_since=status.connected_since,
        last_seen=status.last_seen,
    )


def proxy_totals(statuses: Iterable[ProxyStatus]) -> ProxyTotals:
    """Proxies per state and per transport."""
    states: Counter[str] = Counter()
    transports: Counter[str] = Counter()
    for status in statuses:
        states[status.state] += 1
        transports[status.transport] += 1
    return ProxyTotals(
        proxies=sum(states.values()),
        by_state={s: states.get(s, 0) for s in PROXY_STATES},
        by_transport=dict(sorted(transports.items())),
    )


def _matches(status: ProxyStatus, needle: str) -> bool:
    return any(
        needle in field.casefold()
        for field in (status.node_id, status.cluster, status.peer, status.user_agent)
    )


def proxies_page(
    tracker: ProxyTracker,
    seq: int,
    *,
    text: str,
    node: str | None,
    state: str | None,
    offset: int,
    limit: int,
) -> ProxiesPage:
    """The proxies that match every filter given, one page of them (oldest first)."""
    everyone = tracker.all()
    needle = text.casefold()
    chosen = [
        s
        for s in everyone
        if (node is None or s.node_id == node)
        and (state is None or s.state == state)
        and (not needle or _matches(s, needle))
    ]
    return ProxiesPage(
        seq=seq,
        total=len(chosen),
        offset=offset,
        limit=limit,
        proxies=[proxy_view(s) for s in chosen[offset : offset + limit]],
        totals=proxy_totals(everyone),
    )
