"""Gateway API objects as typed, immutable values: what the translation reads.

Documents are validated against the CRD schemas and defaulted (:mod:`sds.gatewayapi.schema`)
before :func:`parse` sees them, so parsing trusts the shape and only picks the fields the
translation uses. Every value is hashable, so a config can be compared and diffed cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "gateway.networking.k8s.io"
CONTROLLER_NAME = "envoymesh.io/gateway-controller"

GATEWAY_CLASS = "GatewayClass"
GATEWAY = "Gateway"
HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"
REFERENCE_GRANT = "ReferenceGrant"
SERVICE = "Service"


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    """Which object: its kind, namespace (empty for cluster-scoped kinds) and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


@dataclass(frozen=True, slots=True)
class Meta:
    """The metadata the translation uses."""

    key: ObjectKey
    generation: int = 1
    created: str = ""  # RFC 3339 creationTimestamp; empty sorts first (files have none)
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayClass:
    """A class of Gateways, and the controller that implements it."""

    meta: Meta
    controller_name: str


@dataclass(frozen=True, slots=True)
class RouteKind:
    """A route kind a listener admits."""

    group: str
    kind: str


@dataclass(frozen=True, slots=True)
class Listener:
    """One listener of a Gateway."""

    name: str
    port: int
    protocol: str
    hostname: str | None
    namespaces_from: str = "Same"  # Same, All or Selector
    namespace_selector: tuple[tuple[str, str], ...] = ()  # matchLabels only
    kinds: tuple[RouteKind, ...] = ()  # empty: every kind the protocol supports


@dataclass(frozen=True, slots=True)
class Gateway:
    """A Gateway: its class, addresses and listeners."""

    meta: Meta
    class_name: str
    listeners: tuple[Listener, ...]
    addresses: tuple[str, ...] = ()  # IPAddress values asked for in spec.addresses


@dataclass(frozen=True, slots=True)
class ParentRef:
    """Where a route asks to attach."""

    group: str
    kind: str
    namespace: str
    name: str
    section_name: str | None = None
    port: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The reference as status echoes it."""
        shown: dict[str, Any] = {
            "group": self.group,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
        }
        if self.section_name is not None:
            shown["sectionName"] = self.section_name
        if self.port is not None:
            shown["port"] = self.port
        return shown


@dataclass(frozen=True, slots=True)
class StringMatch:
    """A header, query parameter or path match: its type, name (not for paths) and value."""

    type: str  # Exact, PathPrefix, RegularExpression
    value: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One match of a rule; every part must hold."""

    path: StringMatch | None = None
    headers: tuple[StringMatch, ...] = ()
    query: tuple[StringMatch, ...] = ()
    method: str | None = None
    # GRPCRoute: the service and method, each optional.
    grpc_service: str | None = None
    grpc_method: str | None = None
    grpc_type: str = "Exact"


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """RequestHeaderModifier / ResponseHeaderModifier."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathChange:
    """A redirect's or rewrite's path: ReplaceFullPath or ReplacePrefixMatch."""

    type: str
    value: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """RequestRedirect."""

    scheme: str | None = None
    hostname: str | None = None
    path: PathChange | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    """URLRewrite."""

    hostname: str | None = None
    path: PathChange | None = None


@dataclass(frozen=True, slots=True)
class Filters:
    """The filters of one rule, by type; ``unsupported`` names the types we do not implement."""

    request_headers: HeaderChange | None = None
    response_headers: HeaderChange | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendRef:
    """A backend of a rule, with its share of the weight."""

    group: str
    kind: str
    namespace: str
    name: str
    port: int | None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a route."""

    matches: tuple[RouteMatch, ...]
    filters: Filters
    backends: tuple[BackendRef, ...]
    timeout: str | None = None  # timeouts.request, a Gateway API duration
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTPRoute or a GRPCRoute (``meta.key.kind`` tells which)."""

    meta: Meta
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class GrantFrom:
    """Who a ReferenceGrant trusts."""

    group: str
    kind: str
    namespace: str


@dataclass(frozen=True, slots=True)
class GrantTo:
    """What a ReferenceGrant lets them reference (every name when ``name`` is None)."""

    group: str
    kind: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceGrant:
    """Lets objects of other namespaces reference objects of this one."""

    meta: Meta
    sources: tuple[GrantFrom, ...]
    targets: tuple[GrantTo, ...]


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a Service."""

    port: int
    name: str = ""
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    """A Service document: declares a backend that exists with or without endpoints."""

    meta: Meta
    ports: tuple[ServicePort, ...]


ConfigObject = GatewayClass | Gateway | Route | ReferenceGrant | Service


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Every Gateway API object a source delivered, by key."""

    objects: Mapping[ObjectKey, ConfigObject] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[Any]:
        """The objects of ``kind``, in key order."""
        return [self.objects[k] for k in sorted(self.objects) if k.kind == kind]

    def get(self, key: ObjectKey) -> ConfigObject | None:
        """One object, or None."""
        return self.objects.get(key)


def _meta(document: Mapping[str, Any], kind: str, default_namespace: str) -> Meta:
    metadata = document.get("metadata") or {}
    namespace = "" if kind == GATEWAY_CLASS else metadata.get("namespace") or default_namespace
    labels = metadata.get("labels") or {}
    return Meta(
        key=ObjectKey(kind, namespace, metadata["name"]),
        generation=int(metadata.get("generation") or 1),
        created=str(metadata.get("creationTimestamp") or ""),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )


def _string_match(data: Mapping[str, Any], default_type: str = "Exact") -> StringMatch:
    return StringMatch(
        type=data.get("type") or default_type,
        value=str(data.get("value", "")),
        name=str(data.get("name", "")),
    )


def _headers(data: Mapping[str, Any] | None) -> HeaderChange | None:
    if data is None:
        return None
    return HeaderChange(
        set=tuple((h["name"], h["value"]) for h in data.get("set") or ()),
        add=tuple((h["name"], h["value"]) for h in data.get("add") or ()),
        remove=tuple(data.get("remove") or ()),
    )


def _path_change(data: Mapping[str, Any] | None) -> PathChange | None:
    if not data:
        return None
    kind = data["type"]
    value = data.get("replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch")
    return PathChange(kind, str(value or "/"))


_SUPPORTED_FILTERS = {
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
}


def _filters(items: list[Mapping[str, Any]]) -> Filters:
    found: dict[str, Any] = {}
    unsupported = []
    for item in items:
        kind = item["type"]
        if kind not in _SUPPORTED_FILTERS:
            unsupported.append(kind)
            continue
        if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            key = (
                "requestHeaderModifier"
                if kind == "RequestHeaderModifier"
                else "responseHeaderModifier"
            )
            found[kind] = _headers(item.get(key) or {})
        elif kind == "RequestRedirect":
            data = item.get("requestRedirect") or {}
            found[kind] = Redirect(
                scheme=data.get("scheme"),
                hostname=data.get("hostname"),
                path=_path_change(data.get("path")),
                port=data.get("port"),
                status_code=int(data.get("statusCode") or 302),
            )
        else:
            data = item.get("urlRewrite") or {}
            found[kind] = Rewrite(
                hostname=data.get("hostname"), path=_path_change(data.get("path"))
            )
    return Filters(
        request_headers=found.get("RequestHeaderModifier"),
        response_headers=found.get("ResponseHeaderModifier"),
        redirect=found.get("RequestRedirect"),
        rewrite=found.get("URLRewrite"),
        unsupported=tuple(unsupported),
    )


def _backends(items: list[Mapping[str, Any]], namespace: str) -> tuple[BackendRef, ...]:
    return tuple(
        BackendRef(
            group=ref.get("group", ""),
            kind=ref.get("kind", SERVICE),
            namespace=ref.get("namespace") or namespace,
            name=ref["name"],
            port=ref.get("port"),
            weight=int(ref.get("weight", 1)),
        )
        for ref in items
    )


def _http_match(data: Mapping[str, Any]) -> RouteMatch:
    path = data.get("path")
    return RouteMatch(
        # The CRD defaults a match's path to PathPrefix "/": one without is that too.
        path=_string_match(path, "PathPrefix") if path else StringMatch("PathPrefix", "/"),
        headers=tuple(_string_match(h) for h in data.get("headers") or ()),
        query=tuple(_string_match(q) for q in data.get("queryParams") or ()),
        method=data.get("method"),
    )


def _grpc_match(data: Mapping[str, Any]) -> RouteMatch:
    method = data.get("method") or {}
    return RouteMatch(
        headers=tuple(_string_match(h) for h in data.get("headers") or ()),
        grpc_service=method.get("service"),
        grpc_method=method.get("method"),
        grpc_type=method.get("type") or "Exact",
    )


def _route(document: Mapping[str, Any], kind: str, meta: Meta) -> Route:
    spec = document.get("spec") or {}
    namespace = meta.key.namespace
    parents = tuple(
        ParentRef(
            group=ref.get("group", GROUP),
            kind=ref.get("kind", GATEWAY),
            namespace=ref.get("namespace") or namespace,
            name=ref["name"],
            section_name=ref.get("sectionName"),
            port=ref.get("port"),
        )
        for ref in spec.get("parentRefs") or ()
    )
    parse_match = _http_match if kind == HTTP_ROUTE else _grpc_match
    rules = []
    written: list[Mapping[str, Any]] = spec.get("rules") or [{}]
    for rule in written:
        matches = tuple(parse_match(m) for m in rule.get("matches") or ())
        if not matches:
            matches = (
                (RouteMatch(path=StringMatch("PathPrefix", "/")),)
                if kind == HTTP_ROUTE
                else (RouteMatch(),)
            )
        timeouts = rule.get("timeouts") or {}
        rules.append(
            Rule(
                matches=matches,
                filters=_filters(rule.get("filters") or []),
                backends=_backends(rule.get("backendRefs") or [], namespace),
                timeout=timeouts.get("request"),
                name=rule.get("name"),
            )
        )
    return Route(
        meta=meta,
        parents=parents,
        hostnames=tuple(spec.get("hostnames") or ()),
        rules=tuple(rules),
    )


def _gateway(document: Mapping[str, Any], meta: Meta) -> Gateway:
    spec = document.get("spec") or {}
    listeners = []
    for item in spec.get("listeners") or ():
        allowed = item.get("allowedRoutes") or {}
        namespaces = allowed.get("namespaces") or {}
        selector = (namespaces.get("selector") or {}).get("matchLabels") or {}
        listeners.append(
            Listener(
                name=item["name"],
                port=int(item["port"]),
                protocol=item["protocol"],
                hostname=item.get("hostname"),
                namespaces_from=namespaces.get("from") or "Same",
                namespace_selector=tuple(sorted(selector.items())),
                kinds=tuple(
                    RouteKind(k.get("group", GROUP), k["kind"]) for k in allowed.get("kinds") or ()
                ),
            )
        )
    addresses = tuple(
        a["value"]
        for a in spec.get("addresses") or ()
        if a.get("type", "IPAddress") == "IPAddress" and a.get("value")
    )
    return Gateway(meta, spec.get("gatewayClassName", ""), tuple(listeners), addresses)


def parse(document: Mapping[str, Any], default_namespace: str = "default") -> ConfigObject:
    """The typed object of one validated, defaulted document."""
    kind = document["kind"]
    meta = _meta(document, kind, default_namespace)
    spec = document.get("spec") or {}
    if kind == GATEWAY_CLASS:
        return GatewayClass(meta, spec.get("controllerName", ""))
    if kind == GATEWAY:
        return _gateway(document, meta)
    if kind in (HTTP_ROUTE, GRPC_ROUTE):
        return _route(document, kind, meta)
    if kind == REFERENCE_GRANT:
        return ReferenceGrant(
            meta,
            sources=tuple(
                GrantFrom(f.get("group", ""), f["kind"], f["namespace"])
                for f in spec.get("from") or ()
            ),
            targets=tuple(
                GrantTo(t.get("group", ""), t["kind"], t.get("name")) for t in spec.get("to") or ()
            ),
        )
    if kind == SERVICE:
        return Service(
            meta,
            ports=tuple(
                ServicePort(int(p["port"]), p.get("name", ""), p.get("appProtocol", ""))
                for p in spec.get("ports") or ()
            ),
        )
    raise ValueError(f"unsupported kind {kind!r}")
