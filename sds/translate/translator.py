"""Keeps every Gateway's Listeners, RouteConfigurations and Clusters current, incrementally.

The cache calls :meth:`Translator.refresh` with what changed in the store. Only the Gateways
a change can alter are bound again: a route's own Gateways, a Gateway itself, and the
Gateways that looked up a Service whose existence flipped. ReferenceGrants, GatewayClasses
and Service declarations are rare and rebind everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from sds.gatewayapi.model import GATEWAY, GRPC_ROUTE, HTTP_ROUTE, ObjectKey, Route
from sds.registry import Registry
from sds.translate.clusters import UpstreamTls, clusters
from sds.translate.gateways import (
    Binding,
    ConfigIndex,
    ParentStatus,
    affected_gateways,
    bind,
    unattached_status,
)
from sds.translate.listeners import listeners
from sds.translate.mesh import MeshTranslator
from sds.translate.routes import route_configurations
from sds.xds.resources import CDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL, Resource

log = logging.getLogger("sds.translate")

# type URL -> name -> resource
TypedResources = Mapping[str, Mapping[str, Resource]]
_EMPTY: dict[str, Resource] = {}


class Translator:
    """The translated resources of every Gateway, and the status of every route."""

    def __init__(
        self,
        registry: Registry,
        registration_namespace: str = "default",
        proxyless_tls: UpstreamTls | None = None,
    ) -> None:
        self.registry = registry
        self.registration_namespace = registration_namespace
        # What proxyless gRPC clients' Clusters ask of their calls to backends (None: nothing).
        self.proxyless_tls = proxyless_tls
        self.index = ConfigIndex()
        self.bindings: dict[ObjectKey, Binding] = {}
        self._resources: dict[ObjectKey, dict[str, dict[str, Resource]]] = {}
        self._gateways_by_service: dict[tuple[str, str], set[ObjectKey]] = {}
        self._exists: dict[tuple[str, str], bool] = {}
        self.last_duration = 0.0
        # Proxyless gRPC targets and GRPCRoutes attached to Services (GAMMA), over this index.
        self.mesh = MeshTranslator(self)

    # ----- the backends the routes name -------------------------------------------------------

    def registry_names(self, namespace: str, name: str) -> tuple[str, ...]:
        """The registry services a Service ``namespace/name`` stands for.

        Registered services live in the registration namespace under their plain name;
        Kubernetes Services are ``name.namespace``.
        """
        kubernetes = f"{name}.{namespace}"
        if namespace == self.registration_namespace:
            return (name, kubernetes)
        return (kubernetes,)

    def service_of(self, registry_name: str) -> tuple[str, str]:
        """The (namespace, name) of a registry service name."""
        if "." in registry_name:
            name, namespace = registry_name.split(".", 1)
            return (namespace, name)
        return (self.registration_namespace, registry_name)

    def service_exists(self, namespace: str, name: str) -> bool:
        """A Service exists when a document declares it or it has endpoints."""
        if (namespace, name) in self.index.services:
            return True
        return any(self.registry.has(n) for n in self.registry_names(namespace, name))

    # ----- reading ----------------------------------------------------------------------------

    def resources(self, gateway: ObjectKey, type_url: str) -> Mapping[str, Resource]:
        """One type's resources for a Gateway's proxies, by name (empty for an unknown one)."""
        return self._resources.get(gateway, {}).get(type_url, _EMPTY)

    def route_status(self, route: ObjectKey) -> list[ParentStatus]:
        """The route's status under each parent we decide for."""
        found: list[ParentStatus] = []
        for binding in self.bindings.values():
            found.extend(binding.route_status.get(route, ()))
        obj = self.index.config.get(route)
        if isinstance(obj, Route):
            found.extend(unattached_status(self.index, obj))
        found.extend(self.mesh.route_status(route))
        return found

    def routes(self) -> list[Route]:
        """Every HTTPRoute and GRPCRoute."""
        config = self.index.config
        return [*config.of_kind(HTTP_ROUTE), *config.of_kind(GRPC_ROUTE)]

    # ----- keeping current --------------------------------------------------------------------

    def refresh(
        self, keys: frozenset[ObjectKey] | None, services: Iterable[str] | None
    ) -> set[ObjectKey]:
        """Take what changed (None: anything may have); the Gateways whose resources moved.

        ``keys`` are the Gateway API objects changed, ``services`` the registry services
        whose endpoints changed (their existence may have flipped).
        """
        started = time.perf_counter()
        old = self.index.config
        affected: set[ObjectKey] | None = set()
        if keys is None or self.registry.config is not old:
            changed = self.index.update(self.registry.config, keys)
            affected = None if keys is None else affected_gateways(self.index, changed, old)
        if affected is not None:
            candidates = (
                {self.service_of(name) for name in services}
                if services is not None
                else set(self._exists)
            )
            for service in candidates:
                known = self._exists.get(service)
                if known is not None and known != self.service_exists(*service):
                    affected |= self._gateways_by_service.get(service, set())
        if affected is None:
            affected = set(self.bindings) | {g.meta.key for g in self.index.gateways()}
        moved = {key for key in affected if self._rebind(key)}
        if affected:
            self.last_duration = time.perf_counter() - started
            log.debug(
                "translated",
                extra={
                    "gateways": len(affected),
                    "changed": len(moved),
                    "ms": round(self.last_duration * 1000, 2),
                },
            )
        return moved

    def _rebind(self, key: ObjectKey) -> bool:
        """Bind one Gateway again; True when any of its resources changed."""
        previous = self._resources.get(key)
        old = self.bindings.pop(key, None)
        if old is not None:
            for service in old.services:
                gateways = self._gateways_by_service.get(service)
                if gateways is not None:
                    gateways.discard(key)
                    if not gateways:
                        del self._gateways_by_service[service]
                        self._exists.pop(service, None)
        gateway = self.index.config.get(key)
        if (
            key.kind != GATEWAY
            or gateway is None
            or not self.index.gateway_class_ours(getattr(gateway, "class_name", ""))
        ):
            self._resources.pop(key, None)
            return previous is not None
        binding = bind(self.index, gateway, self)  # type: ignore[arg-type]
        self.bindings[key] = binding
        for service in binding.services:
            self._gateways_by_service.setdefault(service, set()).add(key)
            self._exists[service] = self.service_exists(*service)
        resources = {
            LDS_TYPE_URL: listeners(binding.plan),
            RDS_TYPE_URL: route_configurations(binding.plan),
            CDS_TYPE_URL: clusters(binding.plan),
        }
        self._resources[key] = resources
        return previous is None or any(
            _versions(previous.get(t, {})) != _versions(resources[t]) for t in resources
        )

    def debug(self) -> dict[str, Any]:
        """Every Gateway and route with its status, for ``/debug/config``."""
        gateways = []
        for key, binding in sorted(self.bindings.items()):
            gateway = self.index.config.get(key)
            generation = gateway.meta.generation if gateway is not None else 0
            status = binding.gateway_status
            gateways.append(
                {
                    "namespace": key.namespace,
                    "name": key.name,
                    "conditions": [c.as_json(generation) for c in status.conditions],
                    "listeners": [
                        {
                            "name": listener.name,
                            "supportedKinds": [
                                {"group": "gateway.networking.k8s.io", "kind": k}
                                for k in listener.supported_kinds
                            ],
                            "attachedRoutes": listener.attached_routes,
                            "conditions": [c.as_json(generation) for c in listener.conditions],
                        }
                        for listener in status.listeners
                    ],
                    "clusters": [ref.name for ref in binding.plan.clusters],
                }
            )
        routes = []
        for route in self.routes():
            key = route.meta.key
            routes.append(
                {
                    "kind": key.kind,
                    "namespace": key.namespace,
                    "name": key.name,
                    "parents": [
                        {
                            "parentRef": status.parent.as_json(),
                            "controllerName": "envoymesh.io/gateway-controller",
                            "conditions": [
                                c.as_json(route.meta.generation) for c in status.conditions
                            ],
                        }
                        for status in self.route_status(key)
                    ],
                    "rules": [
                        {
                            "backends": [
                                {
                                    "cluster": t.cluster.name if t.cluster else None,
                                    "weight": t.weight,
                                }
                                for t in _targets(self, key, index)
                            ]
                        }
                        for index, _ in enumerate(route.rules)
                    ],
                }
            )
        return {"gateways": gateways, "routes": routes, "grpc_targets": self.mesh.watched()}


def _targets(translator: Translator, route: ObjectKey, rule_index: int) -> list[Any]:
    """The targets a rule was bound to (on the first Gateway, else Service, that bound it)."""
    for binding in translator.bindings.values():
        for port in binding.plan.ports:
            for host in port.virtual_hosts:
                for bound in host.rules:
                    if bound.route == route and bound.rule_index == rule_index:
                        return list(bound.targets)
    return translator.mesh.targets_of(route, rule_index)


def _versions(resources: Mapping[str, Resource]) -> dict[str, str]:
    return {name: r.version for name, r in resources.items()}
