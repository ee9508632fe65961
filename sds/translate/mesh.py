"""Proxyless gRPC: what an ``xds:///NAME[:PORT]`` client gets, from the same model as Gateways.

A gRPC client asks for the Listener named as its target. That name is a service sds knows:

- a registered service ``NAME`` (in the registration namespace); ``PORT`` is the port its
  hosts registered, and without one every host of it, whatever its port;
- a Kubernetes Service ``name``, ``name.namespace``, ``name.namespace.svc`` or
  ``name.namespace.svc.cluster.local``. The registry holds the endpoints on the one port the
  EndpointSlice source chose (the Service's only port, or the ``--port-name`` one), with the
  port the pods listen on. ``PORT`` reaches them when those endpoints listen on it, or when
  the Service's declared document has that one port; without ``PORT``, they are served as
  they are. Any other ``PORT`` is one the Service lacks: the target exists and has no
  endpoints (sds never guesses which pod port a Service port maps to).

The target's Listener is an ``api_listener`` whose routes come by RDS under the same name.
The RouteConfiguration holds the rules of every GRPCRoute attached to the Service (GAMMA:
a ``parentRef`` of group "" and kind Service, with ``port`` limiting it to targets on that
port), in the spec's precedence order, then a catch-all to the target's own cluster: a
client with no GRPCRoute sends every call to its service. Routes and Clusters are built by
the Gateway translation's builders in their proxyless flavour (only what gRPC reads).

Cluster names are EDS names: ``namespace/service/PORT`` (a Service port, as Gateway routes
use it), ``namespace/service/*`` (every port) and ``namespace/service/none`` (no
endpoints). Targets are translated only while a client watches them, and again only when a
change can alter them. With ``--proxyless-tls``, every Cluster carries the TLS its clients
use to reach the backends (:func:`sds.translate.clusters.transport_socket`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from sds.gatewayapi.model import (
    GRPC_ROUTE,
    REFERENCE_GRANT,
    SERVICE,
    Filters,
    ObjectKey,
    ParentRef,
    Route,
    RouteMatch,
    Rule,
    StringMatch,
)
from sds.model import Source
from sds.registry import short_name
from sds.translate.clusters import UpstreamTls, cluster
from sds.translate.gateways import (
    BoundRule,
    ClusterRef,
    Condition,
    ParentStatus,
    PortPlan,
    Target,
    VirtualHost,
    _resolve_backends,
    _rule_problem,
    grpc_path,
    precedence,
)
from sds.translate.listeners import http_connection_manager
from sds.translate.routes import route_configuration
from sds.xds.resources import CDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL, Resource, pack

if TYPE_CHECKING:
    from sds.translate.translator import Translator

ALL_PORTS = "*"
NO_PORT = "none"
_SUFFIXES = (".svc.cluster.local", ".svc")
_CATCH_ALL = RouteMatch(path=StringMatch("PathPrefix", "/"))
_NO_FILTERS = Filters()


@dataclass(frozen=True, slots=True)
class PortsRef(ClusterRef):
    """A cluster of every port of a Service (``*``) or of none (``none``)."""

    ports: str = ALL_PORTS

    @property
    def name(self) -> str:
        """``namespace/service/*`` or ``namespace/service/none``."""
        return f"{self.namespace}/{self.service}/{self.ports}"


@dataclass(frozen=True, slots=True)
class MeshTarget:
    """What a target name stands for: a Service, the port asked for, its own cluster."""

    namespace: str
    service: str
    port: int | None
    cluster: ClusterRef


@dataclass(frozen=True, slots=True)
class _Bound:
    """A GRPCRoute rule match bound under a Service parent (``port``: None for every port)."""

    port: int | None
    rule: BoundRule


def split_target(name: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a target name ``host[:port]``; None when it is not one."""
    host, sep, port_text = name.rpartition(":")
    if not sep:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not host:
        return None
    return host, int(port_text)


def mesh_cluster(name: str, tls: UpstreamTls | None = None) -> Resource | None:
    """The proxyless Cluster of an EDS name ``namespace/service/PORT|*|none``, or None."""
    parts = name.split("/")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    namespace, service, ports = parts
    if ports.isdigit() and 0 < int(ports) < 65536:
        return cluster(ClusterRef(namespace, service, int(ports)), proxyless=True, tls=tls)
    if ports in (ALL_PORTS, NO_PORT):
        return cluster(PortsRef(namespace, service, 0, ports=ports), proxyless=True, tls=tls)
    return None


def api_listener(name: str) -> Resource:
    """The Listener of a target: an HttpConnectionManager whose routes are RDS ``name``."""
    manager = http_connection_manager(name, "grpc")
    listener: dict[str, Any] = {"name": name, "api_listener": {"api_listener": manager}}
    return pack(name, json_format.ParseDict(listener, listener_pb2.Listener()))


class MeshTranslator:
    """The Listeners and RouteConfigurations of every watched target, and GAMMA route status."""

    def __init__(self, translator: Translator) -> None:
        self.translator = translator
        self.registry = translator.registry
        # Watched target -> (Listener, RouteConfiguration), or None for an unknown target.
        self._targets: dict[str, tuple[Resource, Resource] | None] = {}
        self._rules: dict[tuple[str, str], list[_Bound]] = {}
        self._status: dict[ObjectKey, list[ParentStatus]] = {}
        self._looked_up: dict[tuple[str, str], bool] = {}

    # ----- targets ----------------------------------------------------------------------------

    def target(self, name: str) -> MeshTarget | None:
        """The Service and cluster a target name stands for; None for an unknown one."""
        split = split_target(name)
        if split is None:
            return None
        host, port = split
        for suffix in _SUFFIXES:
            if host.endswith(suffix):
                host = host[: -len(suffix)]
                break
        labels = host.split(".")
        translator = self.translator
        if len(labels) == 1:
            namespace = translator.registration_namespace
            if not (self.registry.has(host) or (namespace, host) in translator.index.services):
                found = self.registry.qualified(host)
                if len(found) != 1:
                    return None
                namespace = next(iter(found)).split(".", 1)[1]
        elif len(labels) == 2:
            namespace = labels[1]
        else:
            return None
        service = labels[0]
        if not service or not translator.service_exists(namespace, service):
            return None
        return MeshTarget(namespace, service, port, self._own_cluster(namespace, service, port))

    def _own_cluster(self, namespace: str, service: str, port: int | None) -> ClusterRef:
        if port is None:
            return PortsRef(namespace, service, 0, ports=ALL_PORTS)
        kubernetes = [
            e
            for e in self.registry.snapshot(f"{service}.{namespace}").endpoints
            if e.source is Source.KUBERNETES
        ]
        declared = self.translator.index.services.get((namespace, service))
        lone = declared is not None and [p.port for p in declared.ports] == [port]
        if kubernetes and not lone and all(e.port != port for e in kubernetes):
            return PortsRef(namespace, service, 0, ports=NO_PORT)
        return ClusterRef(namespace, service, port)

    def _translate(self, name: str) -> tuple[Resource, Resource] | None:
        target = self.target(name)
        if target is None:
            return None
        rules = [
            bound.rule
            for bound in self._rules.get((target.namespace, target.service), ())
            if bound.port is None or bound.port == target.port
        ]
        rules.sort(key=lambda r: r.order)
        rules.append(
            BoundRule(
                ObjectKey(SERVICE, target.namespace, target.service),
                0,
                0,
                _CATCH_ALL,
                Rule((_CATCH_ALL,), _NO_FILTERS, ()),
                (Target(target.cluster, 1),),
            )
        )
        port = PortPlan(target.port or 0, (VirtualHost("*", tuple(rules)),))
        return api_listener(name), route_configuration(name, port, proxyless=True)

    def resource(self, type_url: str, name: str) -> Resource | None:
        """One resource a gRPC client asked for by name; None when sds has no such thing."""
        if type_url == CDS_TYPE_URL:
            return mesh_cluster(name, self.translator.proxyless_tls)
        if type_url not in (LDS_TYPE_URL, RDS_TYPE_URL):
            return None
        built = self._targets[name] if name in self._targets else self._translate(name)
        if built is None:
            return None
        return built[0] if type_url == LDS_TYPE_URL else built[1]

    def watch(self, name: str) -> None:
        """Keep target ``name`` translated (a client subscribed to it)."""
        if name not in self._targets:
            self._targets[name] = self._translate(name)

    def forget(self, name: str) -> None:
        """No client watches target ``name`` any more."""
        self._targets.pop(name, None)

    # ----- keeping current --------------------------------------------------------------------

    def refresh(
        self, keys: frozenset[ObjectKey] | None, services: Iterable[str] | None
    ) -> set[str]:
        """Take what changed (as :meth:`Translator.refresh` does); the targets that moved.

        Call it after the Gateway translator's refresh: it reads the same index.
        """
        rebind = keys is None or any(k.kind in (GRPC_ROUTE, SERVICE, REFERENCE_GRANT) for k in keys)
        if not rebind and self._looked_up:
            # A route's parent or backend that appeared or went away changes its status.
            exists = self.translator.service_exists
            looked = (
                set(self._looked_up)
                if services is None
                else {self.translator.service_of(name) for name in services}
            )
            rebind = any(s in self._looked_up and self._looked_up[s] != exists(*s) for s in looked)
        if rebind:
            self._bind()
        if not self._targets:
            return set()
        if rebind or services is None:
            candidates = set(self._targets)
        else:
            shorts = {short_name(name) for name in services}
            candidates = {t for t in self._targets if _first_label(t) in shorts}
        moved = set()
        for name in candidates:
            before = self._targets[name]
            after = self._translate(name)
            self._targets[name] = after
            if _versions(before) != _versions(after):
                moved.add(name)
        return moved

    def _bind(self) -> None:
        """Bind every GRPCRoute attached to a Service: its rules there, and its status."""
        index = self.translator.index
        self._rules, self._status = {}, {}
        looked_up: set[tuple[str, str]] = set()
        for parent_key, route_keys in sorted(index.routes_by_parent.items()):
            if parent_key.kind != SERVICE:
                continue
            for route_key in sorted(route_keys):
                route = index.config.get(route_key)
                if not isinstance(route, Route) or route_key.kind != GRPC_ROUTE:
                    continue
                for parent in route.parents:
                    if (parent.group, parent.kind, parent.namespace, parent.name) != (
                        "",
                        SERVICE,
                        parent_key.namespace,
                        parent_key.name,
                    ):
                        continue
                    conditions = self._attach(route, parent, looked_up)
                    self._status.setdefault(route_key, []).append(ParentStatus(parent, conditions))
        self._looked_up = {s: self.translator.service_exists(*s) for s in looked_up}

    def _attach(
        self, route: Route, parent: ParentRef, looked_up: set[tuple[str, str]]
    ) -> tuple[Condition, ...]:
        translator = self.translator
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs")
        looked_up.add((parent.namespace, parent.name))  # its existence decides attachment
        if not translator.service_exists(parent.namespace, parent.name):
            message = f"Service {parent.namespace}/{parent.name} does not exist"
            return (Condition("Accepted", False, "NoMatchingParent", message), resolved)
        for rule in route.rules:
            problem = _rule_problem(route, rule)
            if problem is not None:
                return (Condition("Accepted", False, "UnsupportedValue", problem), resolved)
        reason: str | None = None
        message = ""
        bound = self._rules.setdefault((parent.namespace, parent.name), [])
        for rule_index, rule in enumerate(route.rules):
            targets, problem, text = _resolve_backends(
                translator.index, translator, route, rule, looked_up
            )
            if problem is not None and reason is None:
                reason, message = problem, text
            for match_index, written in enumerate(rule.matches):
                match = RouteMatch(path=grpc_path(written), headers=written.headers)
                order = precedence(route, rule_index, match_index, match)
                rule_bound = BoundRule(
                    route.meta.key, rule_index, match_index, match, rule, targets, order=order
                )
                bound.append(_Bound(parent.port, rule_bound))
        if reason is not None:
            resolved = Condition("ResolvedRefs", False, reason, message)
        return (Condition("Accepted", True, "Accepted"), resolved)

    # ----- reading ----------------------------------------------------------------------------

    def route_status(self, route: ObjectKey) -> list[ParentStatus]:
        """The route's status under each Service parent."""
        return list(self._status.get(route, ()))

    def targets_of(self, route: ObjectKey, rule_index: int) -> list[Target]:
        """The targets a rule was bound to under its first Service parent."""
        for bound_rules in self._rules.values():
            for bound in bound_rules:
                if bound.rule.route == route and bound.rule.rule_index == rule_index:
                    return list(bound.rule.targets)
        return []

    def watched(self) -> list[str]:
        """The targets clients watch, for ``/debug/config``."""
        return sorted(self._targets)


def _first_label(target: str) -> str:
    return target.split(":", 1)[0].split(".", 1)[0]


def _versions(built: tuple[Resource, Resource] | None) -> tuple[str, str] | None:
    return None if built is None else (built[0].version, built[1].version)
