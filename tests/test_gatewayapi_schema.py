"""sds.gatewayapi.schema: Gateway API and Service documents checked and defaulted as the API
server would, with whichever Gateway API schemas are in use (``schema.source()``): the v1.6.1
CRDs when they are in sds/gatewayapi/crds/, our own built-in ones otherwise. When the CRDs are
there, the two are also checked to agree on every document here."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from sds.gatewayapi import schema
from sds.gatewayapi.schema import (
    BUILT_IN_SOURCE,
    CRD_SOURCE,
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_ERRORS,
    SUPPORTED,
    SchemaError,
    validate,
    with_defaults,
)

V1 = "gateway.networking.k8s.io/v1"
needs_crds = pytest.mark.skipif(
    schema.source() != CRD_SOURCE,
    reason="compares with the Gateway API CRDs, which are not in sds/gatewayapi/crds/ "
    "(they arrive through shared/, see its README.md)",
)


def http_route() -> dict[str, Any]:
    return {
        "apiVersion": V1,
        "kind": "HTTPRoute",
        "metadata": {"name": "users", "namespace": "default", "labels": {"app": "users"}},
        "spec": {
            "parentRefs": [{"name": "edge", "sectionName": "http"}],
            "hostnames": ["users.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/user"}}],
                    "backendRefs": [{"name": "usersvc", "port": 80}],
                },
                {
                    "matches": [
                        {
                            "path": {"type": "Exact", "value": "/health"},
                            "headers": [{"name": "x-env", "value": "prod"}],
                        }
                    ],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-a", "value": "b"}]},
                        }
                    ],
                    "backendRefs": [{"name": "usersvc", "port": 80, "weight": 5}],
                },
            ],
        },
    }


def grpc_route() -> dict[str, Any]:
    return {
        "apiVersion": V1,
        "kind": "GRPCRoute",
        "metadata": {"name": "greeter"},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "rules": [
                {
                    "matches": [{"method": {"service": "helloworld.Greeter", "method": "Hi"}}],
                    "backendRefs": [{"name": "greeter", "port": 50051}],
                }
            ],
        },
    }


def gateway() -> dict[str, Any]:
    return {
        "apiVersion": V1,
        "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": "infra"},
        "spec": {
            "gatewayClassName": "envoymesh",
            "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {
                    "name": "https",
                    "port": 443,
                    "protocol": "HTTPS",
                    "hostname": "*.example.com",
                    "tls": {"certificateRefs": [{"name": "edge-cert"}]},
                },
            ],
        },
    }


def gateway_class() -> dict[str, Any]:
    return {
        "apiVersion": V1,
        "kind": "GatewayClass",
        "metadata": {"name": "envoymesh"},
        "spec": {"controllerName": "envoymesh.dev/gateway-controller"},
    }


def reference_grant(version: str = "v1beta1") -> dict[str, Any]:
    return {
        "apiVersion": f"gateway.networking.k8s.io/{version}",
        "kind": "ReferenceGrant",
        "metadata": {"name": "from-default", "namespace": "backends"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "a"}],
            "to": [{"group": "", "kind": "Service"}],
        },
    }


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "usersvc", "namespace": "default"},
        "spec": {
            "selector": {"app": "usersvc"},
            "clusterIP": "10.0.0.7",  # a field we do not check, let through
            "ports": [
                {"name": "http", "port": 80, "targetPort": 5000, "appProtocol": "http"},
                {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"},
            ],
        },
    }


def full_http_route() -> dict[str, Any]:
    """An HTTPRoute with most of the fields the specification has."""
    mirror = {"backendRef": {"name": "shadow", "port": 80}, "fraction": {"numerator": 1}}
    return {
        "apiVersion": V1,
        "kind": "HTTPRoute",
        "metadata": {"name": "full", "namespace": "default"},
        "spec": {
            "parentRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
                {"name": "edge", "namespace": "infra", "sectionName": "https", "port": 443},
            ],
            "hostnames": ["*.example.com", "a.example.com"],
            "rules": [
                {
                    "name": "api",
                    "matches": [
                        {
                            "path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"},
                            "headers": [{"type": "RegularExpression", "name": "x-v", "value": "1"}],
                            "queryParams": [{"name": "debug", "value": "1"}],
                            "method": "POST",
                        }
                    ],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "x-a", "value": "1"}],
                                "add": [{"name": "x-b", "value": "2"}],
                                "remove": ["x-c"],
                            },
                        },
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {"remove": ["server"]},
                        },
                        {"type": "RequestMirror", "requestMirror": mirror},
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "hostname": "internal.example.com",
                                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"},
                            },
                        },
                        {
                            "type": "CORS",
                            "cors": {
                                "allowOrigins": ["https://*.example.com", "http://a.b:8080"],
                                "allowCredentials": True,
                                "allowMethods": ["GET", "POST"],
                                "allowHeaders": ["x-a"],
                                "exposeHeaders": ["x-b"],
                            },
                        },
                        {
                            "type": "ExtensionRef",
                            "extensionRef": {"group": "example.com", "kind": "Auth", "name": "a"},
                        },
                    ],
                    "backendRefs": [
                        {
                            "name": "api",
                            "namespace": "backends",
                            "port": 8080,
                            "weight": 1_000_000,
                            "filters": [
                                {
                                    "type": "ResponseHeaderModifier",
                                    "responseHeaderModifier": {
                                        "set": [{"name": "x", "value": "y"}]
                                    },
                                }
                            ],
                        },
                        {"name": "api-canary", "port": 8080, "weight": 0},
                    ],
                    "timeouts": {"request": "10s", "backendRequest": "1m500ms"},
                },
                {
                    "matches": [{"path": {"type": "Exact", "value": "/old"}}],
                    "filters": [
                        {
                            "type": "RequestRedirect",
                            "requestRedirect": {
                                "scheme": "https",
                                "hostname": "new.example.com",
                                "port": 8443,
                                "statusCode": 301,
                                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"},
                            },
                        }
                    ],
                },
            ],
        },
    }


def full_grpc_route() -> dict[str, Any]:
    """A GRPCRoute with most of the fields the specification has."""
    route = grpc_route()
    route["spec"]["hostnames"] = ["grpc.example.com"]
    route["spec"]["rules"].append(
        {
            "name": "regex",
            "matches": [
                {
                    "method": {"type": "RegularExpression", "service": "a\\..*"},
                    "headers": [{"name": "x-tenant", "value": "t1"}],
                },
                {"headers": [{"type": "RegularExpression", "name": "x-a", "value": "b.*"}]},
            ],
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {"add": [{"name": "x-a", "value": "1"}]},
                },
                {
                    "type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "m", "port": 1}},
                },
            ],
            "backendRefs": [{"name": "greeter-v2", "port": 50051, "weight": 3}],
        }
    )
    return route


def full_gateway() -> dict[str, Any]:
    """A Gateway with most of the fields the specification has."""
    edge = gateway()
    edge["spec"]["addresses"] = [
        {"value": "2001:db8::1"},
        {"type": "NamedAddress", "value": "edge-pool"},
        {"type": "example.com/custom", "value": "anything"},
    ]
    edge["spec"]["infrastructure"] = {
        "labels": {"team": "edge"},
        "annotations": {"note": "x"},
        "parametersRef": {"group": "example.com", "kind": "Config", "name": "edge"},
    }
    edge["spec"]["listeners"].append(
        {
            "name": "tls",
            "port": 8443,
            "protocol": "TLS",
            "hostname": "tls.example.com",
            "tls": {"mode": "Passthrough", "options": {"example.com/opt": "1"}},
            "allowedRoutes": {
                "namespaces": {
                    "from": "Selector",
                    "selector": {
                        "matchLabels": {"edge": "yes"},
                        "matchExpressions": [
                            {"key": "team", "operator": "In", "values": ["a", "b"]}
                        ],
                    },
                },
                "kinds": [{"group": "gateway.networking.k8s.io", "kind": "TLSRoute"}],
            },
        }
    )
    edge["spec"]["listeners"].append(
        {"name": "custom", "port": 9000, "protocol": "example.com/Custom"}
    )
    return edge


def full_gateway_class() -> dict[str, Any]:
    """A GatewayClass with every field the specification has."""
    cls = gateway_class()
    cls["spec"]["description"] = "Envoy, configured by envoymesh"
    cls["spec"]["parametersRef"] = {
        "group": "",
        "kind": "ConfigMap",
        "name": "envoymesh",
        "namespace": "infra",
    }
    return cls


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``document`` copied with the dotted ``path`` (ints index lists) set, or deleted if ...."""
    out = copy.deepcopy(document)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


VALID = [
    pytest.param(http_route(), id="HTTPRoute"),
    pytest.param(grpc_route(), id="GRPCRoute"),
    pytest.param(gateway(), id="Gateway"),
    pytest.param(gateway_class(), id="GatewayClass"),
    pytest.param(reference_grant(), id="ReferenceGrant-v1beta1"),
    pytest.param(reference_grant("v1"), id="ReferenceGrant-v1"),
    pytest.param({**http_route(), "status": {"parents": "whatever"}}, id="status-ignored"),
    pytest.param(
        _set(
            http_route(), "spec.rules.0.matches.0.path", {"type": "RegularExpression", "value": "x"}
        ),
        id="regex-path-no-slash",
    ),
    pytest.param(_set(http_route(), "spec.rules.0.matches", ...), id="rule-without-matches"),
    pytest.param(_set(http_route(), "spec.hostnames", None), id="null-pruned"),
    pytest.param(
        _set(
            http_route(),
            "spec.rules.0.backendRefs.0",
            {"group": "example.com", "kind": "Bucket", "name": "b"},
        ),
        id="non-service-backend-without-port",
    ),
    pytest.param(
        _set(
            gateway(),
            "spec.addresses",
            [{"type": "IPAddress", "value": "10.0.0.1"}, {"type": "Hostname", "value": "a.b"}],
        ),
        id="gateway-addresses",
    ),
    pytest.param(
        _set(http_route(), "metadata", {"name": "a.b-c", "resourceVersion": "7", "uid": "u"}),
        id="kubectl-get-metadata",
    ),
    pytest.param(full_http_route(), id="HTTPRoute-full"),
    pytest.param(full_grpc_route(), id="GRPCRoute-full"),
    pytest.param(full_gateway(), id="Gateway-full"),
    pytest.param(full_gateway_class(), id="GatewayClass-full"),
]


@pytest.mark.parametrize("document", VALID)
def test_valid(document: dict[str, Any]) -> None:
    assert validate(document) == []


def test_valid_service() -> None:
    assert validate(service()) == []


INVALID = [
    # (document, error path, a piece of the message)
    (_set(http_route(), "metadata.name", ...), "metadata.name", "Required value"),
    (_set(http_route(), "metadata", ...), "metadata", "Required value"),
    (_set(http_route(), "metadata.name", "Users"), "metadata.name", "DNS-1123 subdomain"),
    (_set(http_route(), "metadata.name", "a" * 254), "metadata.name", "longer than 253"),
    (_set(http_route(), "metadata.name", "users\n"), "metadata.name", "DNS-1123 subdomain"),
    (_set(http_route(), "metadata.namespace", "a.b"), "metadata.namespace", "DNS-1123 label"),
    (_set(http_route(), "metadata.labels", {"app": 1}), "metadata.labels.app", "type string"),
    (_set(http_route(), "metadata.annotations", ["x"]), "metadata.annotations", "type object"),
    (_set(http_route(), "metadata.nmae", "x"), "metadata.nmae", "unknown field"),
    (_set(http_route(), "spec", ...), "spec", "Required value"),
    (_set(http_route(), "spek", {}), "spek", "unknown field"),
    (
        _set(http_route(), "spec.rules.0.backendRef", []),
        "spec.rules[0].backendRef",
        "unknown field",
    ),
    (
        _set(http_route(), "spec.rules.1.matches.0.path.type", "Glob"),
        "spec.rules[1].matches[0].path.type",
        "unsupported value 'Glob'",
    ),
    (
        _set(http_route(), "spec.rules.0.backendRefs.0.port", 70000),
        "spec.rules[0].backendRefs[0].port",
        "at most 65535",
    ),
    (
        _set(http_route(), "spec.rules.0.backendRefs.0.port", "80"),
        "spec.rules[0].backendRefs[0].port",
        "type integer",
    ),
    (
        _set(http_route(), "spec.rules.0.backendRefs.0.name", ...),
        "spec.rules[0].backendRefs[0].name",
        "Required value",
    ),
    (
        _set(http_route(), "spec.hostnames", ["users.example.com\n"]),
        "spec.hostnames[0]",
        "users.example.com\\n",
    ),
    (_set(http_route(), "spec.rules", [{}] * 17), "spec.rules", "at most 16 items"),
    (
        _set(http_route(), "spec.rules.0.matches", [{}] * 65),
        "spec.rules[0].matches",
        "at most 64 items",
    ),
    (_set(http_route(), "spec.hostnames", ["a.b"] * 17), "spec.hostnames", "at most 16"),
    (
        _set(gateway(), "spec.addresses", [{"type": "IPAddress", "value": "10.0.0.300"}]),
        "spec.addresses[0].value",
        "not a valid ipv",
    ),
    (
        _set(gateway(), "spec.listeners.0.protocol", ""),
        "spec.listeners[0].protocol",
        "",
    ),
    (_set(grpc_route(), "spec.rules.0.matches.0.method.type", "Prefix"), "spec.rules[0]", "Prefix"),
    (_set(gateway_class(), "spec.controllerName", "no-slash"), "spec.controllerName", ""),
    (_set(reference_grant(), "spec.to", []), "spec.to", "at least 1 item"),
    (_set(service(), "metadata.name", "1usersvc"), "metadata.name", "DNS-1035 label"),
    (_set(service(), "spec.ports.0.port", 0), "spec.ports[0].port", "at least 1"),
    (_set(service(), "spec.ports.0.port", ...), "spec.ports[0].port", "Required value"),
    (_set(service(), "spec.ports.0.protocol", "HTTP"), "spec.ports[0].protocol", "'TCP'"),
    (_set(service(), "spec.ports.0.targetPort", "-x"), "spec.ports[0].targetPort", "IANA"),
    (_set(service(), "spec.ports.0.targetPort", 0), "spec.ports[0].targetPort", "port number"),
    (_set(service(), "spec.ports.0.targetPort", "1234"), "spec.ports[0].targetPort", "IANA"),
    (_set(service(), "spec.ports.1.name", ...), "spec.ports[1].name", "Required value"),
    (_set(service(), "spec.ports.1.name", "http"), "spec.ports[1].name", "Duplicate value"),
    (_set(service(), "spec.ports", []), "spec.ports", "Required value"),
    (_set(service(), "spec.type", "Magic"), "spec.type", "unsupported value"),
    (_set(service(), "spec.selector", {"a": None}), "spec.selector.a", "type string"),
    # Fields of the full documents.
    (
        _set(full_http_route(), "spec.rules.0.timeouts.request", "10"),
        "spec.rules[0].timeouts.request",
        "must match",
    ),
    (
        _set(full_http_route(), "spec.rules.0.timeouts.request", "1h2m3s4ms5s"),
        "spec.rules[0].timeouts.request",
        "must match",
    ),
    (
        _set(full_http_route(), "spec.rules.0.backendRefs.0.weight", 1_000_001),
        "spec.rules[0].backendRefs[0].weight",
        "at most 1000000",
    ),
    (
        _set(full_http_route(), "spec.rules.0.backendRefs.1.weight", -1),
        "spec.rules[0].backendRefs[1].weight",
        "at least 0",
    ),
    (
        _set(full_http_route(), "spec.rules.0.matches.0.method", "get"),
        "spec.rules[0].matches[0].method",
        "unsupported value",
    ),
    (
        _set(full_http_route(), "spec.rules.0.matches.0.queryParams.0.type", "Prefix"),
        "spec.rules[0].matches[0].queryParams[0].type",
        "unsupported value",
    ),
    (
        _set(full_http_route(), "spec.rules.0.matches.0.headers.0.name", "x a"),
        "spec.rules[0].matches[0].headers[0].name",
        "must match",
    ),
    (
        _set(full_http_route(), "spec.rules.0.matches.0.headers.0.value", "v" * 4097),
        "spec.rules[0].matches[0].headers[0].value",
        "longer than 4096",
    ),
    (
        _set(full_http_route(), "spec.rules.0.matches.0.path.value", "/" * 1025),
        "spec.rules[0].matches[0].path.value",
        "longer than 1024",
    ),
    (
        _set(full_http_route(), "spec.rules.1.filters.0.requestRedirect.statusCode", 200),
        "spec.rules[1].filters[0].requestRedirect.statusCode",
        "unsupported value 200",
    ),
    (
        _set(full_http_route(), "spec.rules.1.filters.0.requestRedirect.path.type", "Prefix"),
        "spec.rules[1].filters[0].requestRedirect.path.type",
        "unsupported value",
    ),
    (
        _set(full_http_route(), "spec.rules.0.filters.2.requestMirror.percent", 101),
        "spec.rules[0].filters[2].requestMirror.percent",
        "at most 100",
    ),
    (
        _set(full_http_route(), "spec.rules.0.filters.4.cors.allowOrigins", ["ftp://a"]),
        "spec.rules[0].filters[4].cors.allowOrigins[0]",
        "",
    ),
    (
        _set(full_http_route(), "spec.rules.0.filters.4.cors.maxAge", 0),
        "spec.rules[0].filters[4].cors.maxAge",
        "at least 1",
    ),
    (
        _set(full_http_route(), "spec.rules.0.filters.5.extensionRef.group", ...),
        "spec.rules[0].filters[5].extensionRef.group",
        "Required value",
    ),
    (
        _set(full_http_route(), "spec.rules.0.filters.0.requestHeaderModifier.set", [{}] * 17),
        "spec.rules[0].filters[0].requestHeaderModifier.set",
        "at most 16 items",
    ),
    (
        _set(full_http_route(), "spec.rules.0.name", "API"),
        "spec.rules[0].name",
        "must match",
    ),
    (
        _set(full_http_route(), "spec.parentRefs", [{"name": "g"}] * 33),
        "spec.parentRefs",
        "at most 32 items",
    ),
    (
        _set(full_http_route(), "spec.parentRefs.1.kind", "1Gateway"),
        "spec.parentRefs[1].kind",
        "must match",
    ),
    (
        _set(full_http_route(), "spec.parentRefs.1.port", 0),
        "spec.parentRefs[1].port",
        "at least 1",
    ),
    (_set(full_http_route(), "spec.rules", []), "spec.rules", "at least 1 item"),
    (
        _set(full_http_route(), "spec.rules.0.filters.0.type", "RequestHeaderModifer"),
        "spec.rules[0].filters[0].type",
        "unsupported value",
    ),
    (
        _set(full_grpc_route(), "spec.rules.1.filters.0.type", "URLRewrite"),
        "spec.rules[1].filters[0].type",
        "unsupported value",
    ),
    (
        _set(full_grpc_route(), "spec.rules.1.matches.0.method.service", "s" * 1025),
        "spec.rules[1].matches[0].method.service",
        "longer than 1024",
    ),
    (
        _set(full_grpc_route(), "spec.rules.1.timeouts", {"request": "1s"}),
        "spec.rules[1].timeouts",
        "unknown field",
    ),
    (_set(full_gateway(), "spec.listeners", []), "spec.listeners", "at least 1 item"),
    (
        _set(full_gateway(), "spec.listeners", [{"name": "a", "port": 1, "protocol": "HTTP"}] * 65),
        "spec.listeners",
        "at most 64 items",
    ),
    (
        _set(full_gateway(), "spec.listeners.0.port", 65536),
        "spec.listeners[0].port",
        "at most 65535",
    ),
    (
        _set(full_gateway(), "spec.listeners.0.hostname", "*.*.example.com"),
        "spec.listeners[0].hostname",
        "must match",
    ),
    (
        _set(full_gateway(), "spec.listeners.1.tls.mode", "Mutual"),
        "spec.listeners[1].tls.mode",
        "unsupported value",
    ),
    (
        _set(full_gateway(), "spec.listeners.2.allowedRoutes.namespaces.from", "None"),
        "spec.listeners[2].allowedRoutes.namespaces.from",
        "unsupported value",
    ),
    (
        _set(full_gateway(), "spec.listeners.2.allowedRoutes.kinds", [{"kind": "A"}] * 9),
        "spec.listeners[2].allowedRoutes.kinds",
        "at most 8 items",
    ),
    (
        _set(full_gateway(), "spec.listeners.2.allowedRoutes.namespaces.selector.matchLabels", []),
        "spec.listeners[2].allowedRoutes.namespaces.selector.matchLabels",
        "type object",
    ),
    (
        _set(full_gateway(), "spec.addresses.0.value", "edge.example.com"),
        "spec.addresses[0].value",
        "not a valid ipv",
    ),
    (
        _set(full_gateway(), "spec.addresses.1.type", "Named Address"),
        "spec.addresses[1].type",
        "",
    ),
    (
        _set(full_gateway(), "spec.addresses", [{"value": "10.0.0.1"}] * 17),
        "spec.addresses",
        "at most 16 items",
    ),
    (
        _set(full_gateway(), "spec.infrastructure.labels.team", "-x"),
        "spec.infrastructure.labels.team",
        "must match",
    ),
    (_set(full_gateway(), "spec.gatewayClassName", ""), "spec.gatewayClassName", "empty"),
    (_set(full_gateway(), "spec.gatewayClassName", ...), "spec.gatewayClassName", "Required"),
    (
        _set(full_gateway(), "spec.listeners.0.allowedRoutes", {"namespace": {}}),
        "spec.listeners[0].allowedRoutes.namespace",
        "unknown field",
    ),
    (
        _set(full_gateway_class(), "spec.description", "d" * 65),
        "spec.description",
        "longer than 64",
    ),
    (
        _set(full_gateway_class(), "spec.parametersRef.namespace", "Infra"),
        "spec.parametersRef.namespace",
        "must match",
    ),
    (
        _set(reference_grant(), "spec.from.0.namespace", ...),
        "spec.from[0].namespace",
        "Required value",
    ),
    (
        _set(reference_grant("v1"), "spec.to", [{"group": "", "kind": "Service"}] * 17),
        "spec.to",
        "at most 16 items",
    ),
    (
        _set(reference_grant("v1"), "spec.to.0.name", ""),
        "spec.to[0].name",
        "empty",
    ),
]


@pytest.mark.parametrize(
    ("document", "path", "message"),
    [pytest.param(*case, id=f"{case[0]['kind']}:{case[1]}") for case in INVALID],
)
def test_invalid(document: dict[str, Any], path: str, message: str) -> None:
    errors = validate(document)
    assert any(e.path.startswith(path) and message in e.message for e in errors), errors


def _rule(**fields: Any) -> dict[str, Any]:
    route = http_route()
    route["spec"]["rules"] = [fields]
    return route


def _grpc_rule(**fields: Any) -> dict[str, Any]:
    route = grpc_route()
    route["spec"]["rules"] = [fields]
    return route


_REDIRECT = {"type": "RequestRedirect", "requestRedirect": {"hostname": "example.org"}}
_REWRITE = {"type": "URLRewrite", "urlRewrite": {"hostname": "example.org"}}
_MIRROR_NO_PORT = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "m"}}}

CEL = [
    # The CRDs' CEL rules, written out by hand in schema.py: (document, path, message).
    (
        _rule(backendRefs=[{"name": "usersvc"}]),
        "spec.rules[0].backendRefs[0].port",
        "Must have port for Service reference",
    ),
    (
        _rule(backendRefs=[{"name": "usersvc", "group": "", "kind": "Service"}]),
        "spec.rules[0].backendRefs[0].port",
        "Must have port for Service reference",
    ),
    (
        _rule(filters=[_MIRROR_NO_PORT]),
        "spec.rules[0].filters[0].requestMirror.backendRef.port",
        "Must have port",
    ),
    (
        _rule(backendRefs=[{"name": "b", "port": 80, "filters": [_MIRROR_NO_PORT]}]),
        "spec.rules[0].backendRefs[0].filters[0].requestMirror.backendRef.port",
        "Must have port",
    ),
    (
        _grpc_rule(backendRefs=[{"name": "greeter"}]),
        "spec.rules[0].backendRefs[0].port",
        "Must have port",
    ),
    (
        _rule(matches=[{"path": {"type": "PathPrefix", "value": "user"}}]),
        "spec.rules[0].matches[0].path.value",
        "start with '/'",
    ),
    (
        _rule(matches=[{"path": {"value": "user"}}]),  # type defaults to PathPrefix
        "spec.rules[0].matches[0].path.value",
        "start with '/'",
    ),
    (
        _rule(matches=[{}, {"path": {"type": "Exact", "value": "/a//b"}}]),
        "spec.rules[0].matches[1].path.value",
        "must not contain '//'",
    ),
    (
        _rule(matches=[{"path": {"type": "Exact", "value": "/a/../b"}}]),
        "spec.rules[0].matches[0].path.value",
        "'/../'",
    ),
    (
        _rule(matches=[{"path": {"type": "Exact", "value": "/a%2Fb"}}]),
        "spec.rules[0].matches[0].path.value",
        "'%2F'",
    ),
    (
        _rule(matches=[{"path": {"type": "PathPrefix", "value": "/a/."}}]),
        "spec.rules[0].matches[0].path.value",
        "end with '/.'",
    ),
    (
        _rule(matches=[{"path": {"type": "PathPrefix", "value": "/a b"}}]),
        "spec.rules[0].matches[0].path.value",
        "valid characters",
    ),
    (
        _rule(matches=[{"path": {"type": "PathPrefix", "value": "/a\x00"}}]),
        "spec.rules[0].matches[0].path.value",
        "valid characters",
    ),
    (
        _rule(filters=[_REDIRECT, _REWRITE]),
        "spec.rules[0].filters",
        "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite",
    ),
    (
        _rule(backendRefs=[{"name": "b", "port": 80, "filters": [_REDIRECT, _REWRITE]}]),
        "spec.rules[0].backendRefs[0].filters",
        "but not both",
    ),
    (
        _rule(filters=[{"type": "URLRewrite"}]),
        "spec.rules[0].filters[0].urlRewrite",
        "filter.urlRewrite must be specified for URLRewrite filter.type",
    ),
    (
        _rule(filters=[{"type": "CORS"}]),
        "spec.rules[0].filters[0].cors",
        "filter.cors must be specified for CORS filter.type",
    ),
    (
        _rule(filters=[{"type": "RequestHeaderModifier", "urlRewrite": {}}]),
        "spec.rules[0].filters[0].urlRewrite",
        "filter.urlRewrite must be nil if the filter.type is not URLRewrite",
    ),
    (
        _grpc_rule(filters=[{"type": "RequestMirror"}]),
        "spec.rules[0].filters[0].requestMirror",
        "must be specified for RequestMirror",
    ),
    (
        _rule(filters=[_REWRITE, _REWRITE]),
        "spec.rules[0].filters",
        "URLRewrite filter cannot be repeated",
    ),
    (
        _rule(filters=[_REDIRECT], backendRefs=[{"name": "b", "port": 80}]),
        "spec.rules[0].filters",
        "RequestRedirect filter must not be used together with backendRefs",
    ),
    (
        _set(http_route(), "spec.rules", [{"matches": [{}] * 64}] * 2 + [{}]),
        "spec.rules",
        "less than 128 (it has 129)",
    ),
    (
        _set(gateway(), "spec.listeners.1.name", "http"),
        "spec.listeners[1].name",
        "Listener name must be unique",
    ),
    (
        _set(gateway(), "spec.listeners.1", {"name": "other", "port": 80, "protocol": "HTTP"}),
        "spec.listeners[1]",
        "Combination of port, protocol and hostname must be unique",
    ),
]


@pytest.mark.parametrize(("document", "path", "message"), CEL)
def test_cel_rules(document: dict[str, Any], path: str, message: str) -> None:
    assert SchemaError(path, message) in validate(document) or any(
        e.path == path and message in e.message for e in validate(document)
    ), validate(document)


def test_total_matches_at_the_limit() -> None:
    assert validate(_set(http_route(), "spec.rules", [{"matches": [{}] * 64}] * 2)) == []


def test_cel_rules_wait_for_the_schema() -> None:
    # A filter of unknown type is a schema error; the hand-written rules do not run on it.
    errors = validate(_rule(filters=[{"type": "Teleport"}]))
    assert [e.path for e in errors] == ["spec.rules[0].filters[0].type"]


DEFAULTS = [
    # (document, where in with_defaults(document), what is there)
    (
        _rule(backendRefs=[{"name": "b", "port": 80}]),
        "spec.rules.0.matches",
        [{"path": {"type": "PathPrefix", "value": "/"}}],
    ),
    (
        _set(http_route(), "spec.rules", ...),
        "spec.rules",
        [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}],
    ),
    (
        _rule(matches=[{"headers": [{"name": "x", "value": "y"}]}]),
        "spec.rules.0.matches.0",
        {
            "headers": [{"name": "x", "value": "y", "type": "Exact"}],
            "path": {"type": "PathPrefix", "value": "/"},
        },
    ),
    (
        _rule(matches=[{"path": {"value": "/x"}}]),
        "spec.rules.0.matches.0.path",
        {"type": "PathPrefix", "value": "/x"},
    ),
    (
        http_route(),
        "spec.rules.0.backendRefs.0",
        {"name": "usersvc", "port": 80, "group": "", "kind": "Service", "weight": 1},
    ),
    (http_route(), "spec.rules.1.backendRefs.0.weight", 5),
    (
        http_route(),
        "spec.parentRefs.0",
        {
            "name": "edge",
            "sectionName": "http",
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
        },
    ),
    (
        _rule(filters=[{"type": "RequestRedirect", "requestRedirect": {}}]),
        "spec.rules.0.filters.0.requestRedirect.statusCode",
        302,
    ),
    (grpc_route(), "spec.rules.0.matches.0.method.type", "Exact"),
    (grpc_route(), "spec.rules.0.backendRefs.0.weight", 1),
    (gateway(), "spec.listeners.0.allowedRoutes", {"namespaces": {"from": "Same"}}),
    (
        gateway(),
        "spec.listeners.1.tls",
        {
            "mode": "Terminate",
            "certificateRefs": [{"name": "edge-cert", "group": "", "kind": "Secret"}],
        },
    ),
    (
        _set(gateway(), "spec.listeners.0.allowedRoutes", {"kinds": [{"kind": "HTTPRoute"}]}),
        "spec.listeners.0.allowedRoutes",
        {
            "kinds": [{"kind": "HTTPRoute", "group": "gateway.networking.k8s.io"}],
            "namespaces": {"from": "Same"},
        },
    ),
    (
        _set(gateway(), "spec.listeners.0.allowedRoutes", None),
        "spec.listeners.0.allowedRoutes",
        {"namespaces": {"from": "Same"}},
    ),
    (service(), "spec.ports.0.protocol", "TCP"),
    (service(), "spec.type", "ClusterIP"),
]


def _get(document: Any, path: str) -> Any:
    for part in path.split("."):
        document = document[int(part) if part.isdigit() else part]
    return document


@pytest.mark.parametrize(
    ("document", "path", "expected"),
    [pytest.param(*case, id=f"{case[0]['kind']}:{case[1]}") for case in DEFAULTS],
)
def test_defaults(document: dict[str, Any], path: str, expected: Any) -> None:
    assert validate(document) == []
    assert _get(with_defaults(document), path) == expected


def test_with_defaults_copies_and_drops_status() -> None:
    route = {**http_route(), "status": {"parents": []}}
    before = copy.deepcopy(route)
    defaulted = with_defaults(route)
    assert route == before
    assert "status" not in defaulted
    defaulted["spec"]["rules"][0]["matches"].append({})
    assert route == before


def test_with_defaults_refuses_unsupported() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        with_defaults({"apiVersion": "v1", "kind": "Pod"})


def test_with_defaults_refuses_hostile_input() -> None:
    with pytest.raises(ValueError, match="nested deeper"):
        with_defaults(_set(service(), "metadata.annotations", _nested(10_000)))


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {"a": [node]}
    return node


HOSTILE = [
    (_set(service(), "metadata.annotations", _nested(10_000)), "nested deeper than 64"),
    (_set(service(), "metadata.annotations", {"a": "x" * MAX_DOCUMENT_BYTES}), "larger than"),
    (_set(service(), "metadata.annotations", {"a": ["x" * 100] * 20_000}), "larger than"),
    (_set(service(), "metadata.name", "a\ud800"), "not valid UTF-8"),
    (_set(service(), "metadata.annotations", {"\udfff": "x"}), "not UTF-8"),
    (_set(service(), "metadata.annotations", {1: "x"}), "field names must be strings"),
    (_set(service(), "metadata.annotations", {"a": float("nan")}), "finite"),
    (_set(service(), "spec.ports.0.port", 10**5000), "64-bit"),
    (_set(service(), "metadata.annotations", {"a": datetime.date(2026, 1, 1)}), "not a JSON"),
    (_set(service(), "metadata.annotations", {"a": b"bytes"}), "not a JSON value"),
    (_set(service(), "spec.ports", ({"port": 80},)), "not a JSON value: tuple"),
]


@pytest.mark.parametrize(("document", "message"), HOSTILE)
def test_hostile(document: dict[str, Any], message: str) -> None:
    errors = validate(document)
    assert len(errors) == 1
    assert message in errors[0].message
    assert len(errors[0].path) < 1000


def test_deep_nesting_just_allowed() -> None:
    # metadata.annotations.a is at depth 3; MAX_DEPTH levels in total are fine, as far as
    # nesting goes (the annotation is still not a string).
    errors = validate(_set(service(), "metadata.annotations", _nested((MAX_DEPTH - 2) // 2)))
    assert errors
    assert "deeper" not in errors[0].message


def test_untrusted_input_is_quoted_short() -> None:
    bad = "\x00\x1b[31m" + "A" * 10_000
    for document in (
        _set(service(), "metadata.name", bad),
        _set(service(), "spec.type", bad),
        _set(service(), "spec.ports.0.name", bad),
        {"apiVersion": "v1", "kind": bad},
    ):
        errors = validate(document)
        assert errors
        for error in errors:
            assert len(error.message) < 400, error
            assert error.message.isprintable(), error


def test_unknown_field_name_is_quoted() -> None:
    errors = validate(_set(service(), "weird\nkey" + "k" * 500, 1))
    assert len(errors) == 1
    assert errors[0].message == "unknown field"
    assert errors[0].path.isprintable()
    assert len(errors[0].path) < 200


@pytest.mark.parametrize(
    "document",
    [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
        {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute"},
        {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "HTTPRoute"},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Service"},
        {"kind": "HTTPRoute"},
        {"apiVersion": 1, "kind": ["HTTPRoute"]},
        {},
    ],
)
def test_unsupported(document: dict[str, Any]) -> None:
    errors = validate(document)
    assert len(errors) == 1
    assert "supported: " in errors[0].message
    assert "; v1 Service" in errors[0].message
    assert "gateway.networking.k8s.io/v1 GRPCRoute, Gateway, GatewayClass, HTTPRoute" in (
        errors[0].message
    )


@pytest.mark.parametrize("document", [[], "HTTPRoute", None, 3])
def test_not_an_object(document: Any) -> None:
    assert validate(document) == [SchemaError("", f"must be an object, not {_kind_of(document)}")]


def _kind_of(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", int: "an integer"}[type(value)]


def test_errors_are_capped() -> None:
    route = service()
    route["spec"]["ports"] = [{"port": 0, "name": f"p{i}"} for i in range(200)]
    assert len(validate(route)) == MAX_ERRORS


def test_supported_kinds() -> None:
    assert {kind for _, kind in SUPPORTED} == {
        "GatewayClass",
        "Gateway",
        "HTTPRoute",
        "GRPCRoute",
        "ReferenceGrant",
        "Service",
    }


def test_source() -> None:
    assert schema.source() in (CRD_SOURCE, BUILT_IN_SOURCE)
    assert CRD_SOURCE == "crd v1.6.1"
    assert BUILT_IN_SOURCE == "envoymesh built-in"


def _corpus() -> list[Any]:
    """Every Gateway API document of this file, valid or not."""
    documents: list[dict[str, Any]] = [param.values[0] for param in VALID]  # type: ignore[misc]
    documents += [case[0] for case in (*INVALID, *CEL, *DEFAULTS)]
    return [
        pytest.param(document, id=f"{i}-{document['kind']}")
        for i, document in enumerate(documents)
        if document["kind"] != "Service"
    ]


def _checked_with(
    source: str, document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[SchemaError], dict[str, Any] | None]:
    monkeypatch.setattr(schema, "source", lambda: source)
    errors = validate(document)
    # The order of several errors on one field follows the schema's keyword order.
    errors.sort(key=lambda error: (error.path, error.message))
    return errors, None if errors else with_defaults(document)


@needs_crds
@pytest.mark.parametrize("document", _corpus())
def test_built_in_schemas_agree_with_the_crds(
    document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    crd = _checked_with(CRD_SOURCE, document, monkeypatch)
    built_in = _checked_with(BUILT_IN_SOURCE, document, monkeypatch)
    assert built_in == crd
