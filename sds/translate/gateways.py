"""What each Gateway serves, as the Gateway API specifies it, before any Envoy type exists.

This is the rules layer of the translation: which routes attach to which listeners (section
names, ports, allowed namespaces and kinds, hostname intersection), which backends a rule may
send to (kinds, ReferenceGrants, existence), the precedence of rules, and the status
conditions with the spec's reasons. The per-type modules (:mod:`sds.translate.listeners`,
:mod:`~sds.translate.routes`, :mod:`~sds.translate.clusters`) turn a :class:`GatewayPlan`
into Envoy resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sds.gatewayapi import regex
from sds.gatewayapi.model import (
    CONTROLLER_NAME,
    GATEWAY,
    GATEWAY_CLASS,
    GROUP,
    GRPC_ROUTE,
    HTTP_ROUTE,
    REFERENCE_GRANT,
    SERVICE,
    Gateway,
    GatewayClass,
    GatewayConfig,
    Listener,
    ObjectKey,
    ParentRef,
    ReferenceGrant,
    Route,
    RouteMatch,
    Rule,
    Service,
    StringMatch,
)

ROUTE_KINDS = (HTTP_ROUTE, GRPC_ROUTE)
SUPPORTED_PROTOCOLS = frozenset({"HTTP"})


class Backends(Protocol):
    """What the translation asks of the endpoint side: does a backend Service exist."""

    def service_exists(self, namespace: str, name: str) -> bool:
        """True when ``namespace/name`` is a Service (declared, or with endpoints)."""


@dataclass(frozen=True, slots=True)
class Condition:
    """A status condition, as Gateway API writes them."""

    type: str
    status: bool
    reason: str
    message: str = ""

    def as_json(self, generation: int) -> dict[str, Any]:
        """The condition with the object's generation."""
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": generation,
        }


@dataclass(frozen=True, slots=True)
class ClusterRef:
    """One backend cluster: a Service port, named ``namespace/service/port``."""

    namespace: str
    service: str
    port: int
    app_protocol: str = ""

    @property
    def name(self) -> str:
        """The cluster's stable name: it never depends on a rule's position."""
        return f"{self.namespace}/{self.service}/{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    """A share of a rule's traffic: a cluster, or None for an invalid backend (500)."""

    cluster: ClusterRef | None
    weight: int


@dataclass(frozen=True, slots=True)
class BoundRule:
    """One match of one rule, bound to a virtual host, in precedence order."""

    route: ObjectKey
    rule_index: int
    match_index: int
    match: RouteMatch
    rule: Rule
    targets: tuple[Target, ...]
    order: tuple[Any, ...] = field(compare=False, default=())


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """Every rule for one hostname on one port."""

    hostname: str
    rules: tuple[BoundRule, ...]


@dataclass(frozen=True, slots=True)
class PortPlan:
    """What one port of a Gateway serves."""

    port: int
    virtual_hosts: tuple[VirtualHost, ...]


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    """What a Gateway's Envoys get: a listener per port, its hosts and rules, its clusters."""

    key: ObjectKey
    address: str
    ports: tuple[PortPlan, ...]
    clusters: tuple[ClusterRef, ...]


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    """One listener's status."""

    name: str
    supported_kinds: tuple[str, ...]
    attached_routes: int
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    """A Gateway's status."""

    conditions: tuple[Condition, ...]
    listeners: tuple[ListenerStatus, ...]
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ParentStatus:
    """A route's status under one parent."""

    parent: ParentRef
    conditions: tuple[Condition, ...]


# ----- hostnames -----------------------------------------------------------------------------


def _wildcard_covers(wildcard: str, host: str) -> bool:
    """``*.example.com`` covers ``a.example.com`` and ``a.b.example.com``, not ``example.com``."""
    return host.endswith(wildcard[1:]) and len(host) > len(wildcard) - 1


def intersect(listener: str | None, route: str) -> str | None:
    """The hostname both a listener and a route hostname accept, or None."""
    if listener is None or listener == route:
        return route
    if listener.startswith("*."):
        if route.startswith("*."):
            # Both wildcards: the narrower one, when one lies inside the other.
            if route[1:].endswith(listener[1:]):
                return route
            return listener if listener[1:].endswith(route[1:]) else None
        return route if _wildcard_covers(listener, route) else None
    if route.startswith("*.") and _wildcard_covers(route, listener):
        return listener
    return None


def hostnames_for(listener: Listener, route: Route) -> list[str]:
    """The hostnames a route serves on a listener (``*`` for any)."""
    if not route.hostnames:
        return [listener.hostname or "*"]
    found = [h for h in (intersect(listener.hostname, r) for r in route.hostnames) if h]
    return list(dict.fromkeys(found))


# ----- precedence ----------------------------------------------------------------------------


def normalized_prefix(value: str) -> str:
    """A PathPrefix without its trailing slash (``/`` stays ``/``)."""
    return value.rstrip("/") or "/"


def precedence(
    route: Route, rule_index: int, match_index: int, match: RouteMatch
) -> tuple[Any, ...]:
    """The sort key of a rule's match among every rule of a virtual host (spec order)."""
    path = match.path
    if path is None:
        kind, length = 3, 0
    elif path.type == "Exact":
        kind, length = 0, len(path.value)
    elif path.type == "RegularExpression":
        kind, length = 1, len(path.value)
    else:
        kind, length = 2, len(normalized_prefix(path.value))
    key = route.meta.key
    return (
        kind,
        -length,
        0 if match.method else 1,
        -len(match.headers),
        -len(match.query),
        route.meta.created,
        key.namespace,
        key.name,
        rule_index,
        match_index,
    )


def grpc_path(match: RouteMatch) -> StringMatch | None:
    """A GRPCRoute method match as an HTTP/2 path match (``/service/method``)."""
    service, method = match.grpc_service, match.grpc_method
    if match.grpc_type == "RegularExpression":
        return StringMatch("RegularExpression", f"/{service or '[^/]+'}/{method or '[^/]+'}")
    if service and method:
        return StringMatch("Exact", f"/{service}/{method}")
    if service:
        return StringMatch("PathPrefix", f"/{service}")
    if method:
        return StringMatch("RegularExpression", f"/[^/]+/{_re_escape(method)}")
    return None


def _re_escape(text: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "\\" + c for c in text)


# ----- the index over a config ---------------------------------------------------------------


class ConfigIndex:
    """A config with the lookups translation needs, updated by the keys that changed."""

    def __init__(self) -> None:
        self.config = GatewayConfig()
        self.routes_by_parent: dict[ObjectKey, set[ObjectKey]] = {}
        self._parents_of: dict[ObjectKey, set[ObjectKey]] = {}
        self.grants_by_namespace: dict[str, list[ReferenceGrant]] = {}
        self.services: dict[tuple[str, str], Service] = {}

    def update(
        self, config: GatewayConfig, touched: Iterable[ObjectKey] | None = None
    ) -> set[ObjectKey]:
        """Take ``config``; the keys of every object added, changed or removed.

        ``touched``, when the caller knows it (the store's change log), is where to look;
        otherwise every key is compared.
        """
        old = self.config.objects
        new = config.objects
        candidates = old.keys() | new.keys() if touched is None else touched
        changed = {
            k for k in candidates if old.get(k) is not new.get(k) and old.get(k) != new.get(k)
        }
        self.config = config
        for key in changed:
            if key.kind in ROUTE_KINDS:
                for parent_key in self._parents_of.pop(key, ()):
                    routes = self.routes_by_parent.get(parent_key)
                    if routes is not None:
                        routes.discard(key)
                        if not routes:
                            del self.routes_by_parent[parent_key]
                route = new.get(key)
                if isinstance(route, Route):
                    parents = {ObjectKey(p.kind, p.namespace, p.name) for p in route.parents}
                    self._parents_of[key] = parents
                    for parent_key in parents:
                        self.routes_by_parent.setdefault(parent_key, set()).add(key)
            elif key.kind == REFERENCE_GRANT:
                self.grants_by_namespace = {}
                for grant in config.of_kind(REFERENCE_GRANT):
                    self.grants_by_namespace.setdefault(grant.meta.key.namespace, []).append(grant)
            elif key.kind == SERVICE:
                service = new.get(key)
                if isinstance(service, Service):
                    self.services[(key.namespace, key.name)] = service
                else:
                    self.services.pop((key.namespace, key.name), None)
        return changed

    def gateway_class_ours(self, class_name: str) -> bool:
        """A class declared for our controller, or (in files) one no document declares."""
        declared = self.config.get(ObjectKey(GATEWAY_CLASS, "", class_name))
        if isinstance(declared, GatewayClass):
            return declared.controller_name == CONTROLLER_NAME
        return True

    def gateways(self) -> list[Gateway]:
        """Every Gateway of one of our classes."""
        return [g for g in self.config.of_kind(GATEWAY) if self.gateway_class_ours(g.class_name)]

    def permitted(self, route: Route, namespace: str, name: str) -> bool:
        """May ``route`` reference Service ``namespace/name``?"""
        if namespace == route.meta.key.namespace:
            return True
        for grant in self.grants_by_namespace.get(namespace, ()):
            trusts = any(
                s.group == GROUP
                and s.kind == route.meta.key.kind
                and s.namespace == route.meta.key.namespace
                for s in grant.sources
            )
            if trusts and any(
                t.group == "" and t.kind == SERVICE and t.name in (None, name)
                for t in grant.targets
            ):
                return True
        return False


# ----- binding -------------------------------------------------------------------------------


@dataclass(slots=True)
class Binding:
    """The result of binding one Gateway: its plan and statuses."""

    plan: GatewayPlan
    gateway_status: GatewayStatus
    route_status: dict[ObjectKey, list[ParentStatus]]
    services: set[tuple[str, str]]  # (namespace, name) of every backend looked up


def _listener_problem(listener: Listener, neighbours: list[Listener]) -> Condition | None:
    """Why a listener cannot be programmed (``neighbours`` share its port), or None."""
    if listener.protocol not in SUPPORTED_PROTOCOLS:
        return Condition(
            "Accepted",
            False,
            "UnsupportedProtocol",
            f"protocol {listener.protocol} is not supported (HTTP is)",
        )
    if len({n.protocol for n in neighbours}) > 1:
        return Condition(
            "Conflicted", True, "ProtocolConflict", "listeners on this port use other protocols"
        )
    if next(n for n in neighbours if n.hostname == listener.hostname) is not listener:
        return Condition(
            "Conflicted",
            True,
            "HostnameConflict",
            "an earlier listener on this port has the same hostname",
        )
    return None


def _listener_conditions(
    gateway: Gateway,
) -> tuple[dict[str, list[Condition]], dict[str, tuple[str, ...]], list[Listener]]:
    """Validate listeners: conditions per listener, supported kinds, and the usable ones.

    The first listener of a port and hostname wins; later ones are Conflicted and not
    programmed.
    """
    conditions: dict[str, list[Condition]] = {}
    kinds: dict[str, tuple[str, ...]] = {}
    usable: list[Listener] = []
    by_port: dict[int, list[Listener]] = {}
    for listener in gateway.listeners:
        by_port.setdefault(listener.port, []).append(listener)
    for listener in gateway.listeners:
        asked = listener.kinds
        supported = (
            tuple(k.kind for k in asked if k.group == GROUP and k.kind in ROUTE_KINDS)
            if asked
            else ROUTE_KINDS
        )
        kinds[listener.name] = supported
        resolved = (
            Condition(
                "ResolvedRefs",
                False,
                "InvalidRouteKinds",
                "only HTTPRoute and GRPCRoute are supported",
            )
            if asked and len(supported) < len(asked)
            else Condition("ResolvedRefs", True, "ResolvedRefs")
        )
        problem = _listener_problem(listener, by_port[listener.port])
        if problem is None:
            usable.append(listener)
            conditions[listener.name] = [
                Condition("Accepted", True, "Accepted"),
                Condition("Conflicted", False, "NoConflicts"),
                Condition("Programmed", True, "Programmed"),
                resolved,
            ]
        elif problem.type == "Accepted":
            conditions[listener.name] = [
                problem,
                Condition("Conflicted", False, "NoConflicts"),
                Condition("Programmed", False, "Invalid"),
                resolved,
            ]
        else:
            conditions[listener.name] = [
                Condition("Accepted", False, problem.reason, problem.message),
                problem,
                Condition("Programmed", False, "Invalid"),
                resolved,
            ]
    return conditions, kinds, usable


def _namespace_allowed(listener: Listener, gateway: Gateway, route: Route) -> bool:
    if listener.namespaces_from == "All":
        return True
    if listener.namespaces_from == "Same":
        return route.meta.key.namespace == gateway.meta.key.namespace
    return False  # Selector: namespaces and their labels are not part of the config here


def _rule_problem(route: Route, rule: Rule) -> str | None:
    """Why a rule cannot be implemented (an Envoy would refuse it), or None."""
    if rule.filters.unsupported:
        return f"filter {rule.filters.unsupported[0]} is not supported"
    for change in (rule.filters.request_headers, rule.filters.response_headers):
        if change is not None:
            for name, value in change.set + change.add:
                if any(c in value for c in "\0\r\n"):
                    # The CRD allows it, Envoy refuses it: never send a config it would NACK.
                    return f"header {name[:80]!r}: a value may not hold NUL, CR or LF"
    for match in rule.matches:
        patterns = [m.value for m in match.headers + match.query if m.type == "RegularExpression"]
        path = match.path if route.meta.key.kind == HTTP_ROUTE else grpc_path(match)
        if path is not None and path.type == "RegularExpression":
            patterns.append(path.value)
        for pattern in patterns:
            problem = regex.check(pattern)
            if problem is not None:
                return f"regular expression refused: {problem}"
    return None


def _resolve_backends(
    index: ConfigIndex,
    backends: Backends,
    route: Route,
    rule: Rule,
    looked_up: set[tuple[str, str]],
) -> tuple[tuple[Target, ...], str | None, str]:
    """A rule's targets, and the first reason (and message) a backend is invalid."""
    targets: list[Target] = []
    reason: str | None = None
    message = ""
    for ref in rule.backends:
        problem: tuple[str, str] | None = None
        if (ref.group, ref.kind) != ("", SERVICE):
            problem = ("InvalidKind", f"backend kind {ref.group}/{ref.kind} is not supported")
        elif not index.permitted(route, ref.namespace, ref.name):
            problem = (
                "RefNotPermitted",
                f"no ReferenceGrant in {ref.namespace} allows this reference",
            )
        elif ref.port is None:
            problem = ("UnsupportedValue", "a Service backend needs a port")
        else:
            looked_up.add((ref.namespace, ref.name))
            if not backends.service_exists(ref.namespace, ref.name):
                problem = ("BackendNotFound", f"Service {ref.namespace}/{ref.name} does not exist")
        if problem is not None:
            if reason is None:
                reason, message = problem
            if ref.weight:
                targets.append(Target(None, ref.weight))
            continue
        if not ref.weight:
            continue
        declared = index.services.get((ref.namespace, ref.name))
        app_protocol = (
            next((p.app_protocol for p in declared.ports if p.port == ref.port), "")
            if declared
            else ""
        )
        assert ref.port is not None
        targets.append(
            Target(ClusterRef(ref.namespace, ref.name, ref.port, app_protocol), ref.weight)
        )
    return tuple(targets), reason, message


def bind(index: ConfigIndex, gateway: Gateway, backends: Backends) -> Binding:
    """Bind every route attached to ``gateway``: its plan and every status it decides."""
    key = gateway.meta.key
    listener_conditions, supported_kinds, usable = _listener_conditions(gateway)
    attached: dict[str, int] = {listener.name: 0 for listener in gateway.listeners}
    hosts: dict[int, dict[str, list[BoundRule]]] = {}
    for listener in usable:
        hosts.setdefault(listener.port, {})
    route_status: dict[ObjectKey, list[ParentStatus]] = {}
    binder = _Binder(index, backends, gateway, usable, supported_kinds, attached, hosts)
    for route_key in sorted(index.routes_by_parent.get(key, ())):
        route = index.config.get(route_key)
        if not isinstance(route, Route):
            continue
        for parent in route.parents:
            if (parent.group, parent.kind, parent.namespace, parent.name) != (
                GROUP,
                GATEWAY,
                key.namespace,
                key.name,
            ):
                continue
            conditions = _attach(binder, route, parent)
            route_status.setdefault(route_key, []).append(ParentStatus(parent, conditions))
    looked_up, clusters = binder.looked_up, binder.clusters
    ports = tuple(
        PortPlan(
            port,
            tuple(
                VirtualHost(hostname, tuple(sorted(rules, key=lambda r: r.order)))
                for hostname, rules in sorted(by_host.items(), key=lambda kv: _host_order(kv[0]))
            ),
        )
        for port, by_host in sorted(hosts.items())
    )
    listeners = tuple(
        ListenerStatus(
            listener.name,
            supported_kinds[listener.name],
            attached[listener.name],
            tuple(listener_conditions[listener.name]),
        )
        for listener in gateway.listeners
    )
    # The spec: a Gateway is Accepted while one listener is valid; Programmed when its
    # configuration was generated (not when proxies acknowledged it).
    programmed = bool(usable)
    gateway_conditions = (
        Condition("Accepted", True, "Accepted")
        if programmed
        else Condition("Accepted", False, "ListenersNotValid", "no listener is valid"),
        Condition("Programmed", programmed, "Programmed" if programmed else "Invalid"),
    )
    address = gateway.addresses[0] if gateway.addresses else "0.0.0.0"
    return Binding(
        plan=GatewayPlan(key, address, ports, tuple(clusters[n] for n in sorted(clusters))),
        gateway_status=GatewayStatus(gateway_conditions, listeners, gateway.addresses),
        route_status=route_status,
        services=looked_up,
    )


def _host_order(hostname: str) -> tuple[int, int, str]:
    """Exact hostnames first, then wildcards by length, ``*`` last."""
    if hostname == "*":
        return (2, 0, hostname)
    return (1 if hostname.startswith("*.") else 0, -len(hostname), hostname)


@dataclass(slots=True)
class _Binder:
    """What binding one Gateway accumulates while its routes attach."""

    index: ConfigIndex
    backends: Backends
    gateway: Gateway
    usable: list[Listener]
    supported_kinds: Mapping[str, tuple[str, ...]]
    attached: dict[str, int]
    hosts: dict[int, dict[str, list[BoundRule]]]
    looked_up: set[tuple[str, str]] = field(default_factory=set)
    clusters: dict[str, ClusterRef] = field(default_factory=dict)


def _attach(binder: _Binder, route: Route, parent: ParentRef) -> tuple[Condition, ...]:
    """Attach ``route`` under ``parent``; its conditions there."""
    index, backends, gateway = binder.index, binder.backends, binder.gateway
    usable, supported_kinds, attached = binder.usable, binder.supported_kinds, binder.attached
    hosts, looked_up, clusters = binder.hosts, binder.looked_up, binder.clusters
    candidates = [
        listener
        for listener in gateway.listeners
        if (parent.section_name is None or listener.name == parent.section_name)
        and (parent.port is None or listener.port == parent.port)
    ]
    if not candidates:
        return (
            Condition(
                "Accepted",
                False,
                "NoMatchingParent",
                "no listener matches the sectionName and port",
            ),
            Condition("ResolvedRefs", True, "ResolvedRefs"),
        )
    allowed = [
        listener
        for listener in candidates
        if listener in usable
        and route.meta.key.kind in supported_kinds[listener.name]
        and _namespace_allowed(listener, gateway, route)
    ]
    if not allowed:
        return (
            Condition(
                "Accepted",
                False,
                "NotAllowedByListeners",
                "no listener allows routes of this kind from this namespace",
            ),
            Condition("ResolvedRefs", True, "ResolvedRefs"),
        )
    by_listener = {listener.name: hostnames_for(listener, route) for listener in allowed}
    if not any(by_listener.values()):
        return (
            Condition(
                "Accepted",
                False,
                "NoMatchingListenerHostname",
                "no hostname of the route matches a listener",
            ),
            Condition("ResolvedRefs", True, "ResolvedRefs"),
        )
    for rule in route.rules:
        problem = _rule_problem(route, rule)
        if problem is not None:
            return (
                Condition("Accepted", False, "UnsupportedValue", problem),
                Condition("ResolvedRefs", True, "ResolvedRefs"),
            )
    reason: str | None = None
    message = ""
    bound: list[tuple[int, int, RouteMatch, Rule, tuple[Target, ...]]] = []
    for rule_index, rule in enumerate(route.rules):
        targets, problem, text = _resolve_backends(index, backends, route, rule, looked_up)
        if problem is not None and reason is None:
            reason, message = problem, text
        for target in targets:
            if target.cluster is not None:
                clusters[target.cluster.name] = target.cluster
        for match_index, written in enumerate(rule.matches):
            match = (
                RouteMatch(path=grpc_path(written), headers=written.headers)
                if route.meta.key.kind == GRPC_ROUTE
                else written
            )
            bound.append((rule_index, match_index, match, rule, targets))
    for listener in allowed:
        names = by_listener[listener.name]
        if not names:
            continue
        attached[listener.name] += 1
        port_hosts = hosts.setdefault(listener.port, {})
        for hostname in names:
            rules = port_hosts.setdefault(hostname, [])
            for rule_index, match_index, match, rule, targets in bound:
                rules.append(
                    BoundRule(
                        route.meta.key,
                        rule_index,
                        match_index,
                        match,
                        rule,
                        targets,
                        order=precedence(route, rule_index, match_index, match),
                    )
                )
    resolved = (
        Condition("ResolvedRefs", True, "ResolvedRefs")
        if reason is None
        else Condition("ResolvedRefs", False, reason, message)
    )
    return (Condition("Accepted", True, "Accepted"), resolved)


def unattached_status(index: ConfigIndex, route: Route) -> list[ParentStatus]:
    """Status for parents that are not one of our Gateways' (missing ones: NoMatchingParent)."""
    found = []
    for parent in route.parents:
        if (parent.group, parent.kind) != (GROUP, GATEWAY):
            continue
        gateway = index.config.get(ObjectKey(GATEWAY, parent.namespace, parent.name))
        if gateway is None:
            found.append(
                ParentStatus(
                    parent,
                    (
                        Condition(
                            "Accepted",
                            False,
                            "NoMatchingParent",
                            f"Gateway {parent.namespace}/{parent.name} does not exist",
                        ),
                        Condition("ResolvedRefs", True, "ResolvedRefs"),
                    ),
                )
            )
    return found


def affected_gateways(
    index: ConfigIndex, changed: Iterable[ObjectKey], old: GatewayConfig
) -> set[ObjectKey] | None:
    """The Gateways a config change may alter; None when it may alter every one."""
    found: set[ObjectKey] = set()
    for key in changed:
        if key.kind == GATEWAY:
            found.add(key)
        elif key.kind in ROUTE_KINDS:
            for config in (old, index.config):
                route = config.get(key)
                if isinstance(route, Route):
                    found.update(
                        ObjectKey(GATEWAY, p.namespace, p.name)
                        for p in route.parents
                        if (p.group, p.kind) == (GROUP, GATEWAY)
                    )
        else:
            return None  # classes, grants, Services: rare, and may touch any Gateway
    return found
