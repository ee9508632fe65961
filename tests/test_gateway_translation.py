"""The Gateway API rules, as pure functions: hostnames, precedence, attachment and status,
and what each rule becomes in Envoy's terms."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2

from sds.gatewayapi.model import GATEWAY, GatewayConfig, ObjectKey, parse
from sds.translate.gateways import ConfigIndex, bind, intersect
from sds.translate.routes import route_configurations, seconds

GROUP = "gateway.networking.k8s.io"


class Known:
    """Backends that exist: a set of (namespace, name)."""

    def __init__(self, *services: tuple[str, str]) -> None:
        self.services = set(services)

    def service_exists(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self.services


def gateway(listeners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": "default"},
        "spec": {
            "gatewayClassName": "envoymesh",
            "listeners": listeners
            or [
                {
                    "name": "http",
                    "port": 8080,
                    "protocol": "HTTP",
                    "allowedRoutes": {"namespaces": {"from": "Same"}},
                }
            ],
        },
    }


def http_route(name: str, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    namespace = spec.pop("namespace", "default")
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, **spec.pop("metadata", {})},
        "spec": {"parentRefs": [{"name": "edge", "namespace": "default"}], "rules": rules, **spec},
    }


def bound(*documents: dict[str, Any], known: Known | None = None) -> Any:
    index = ConfigIndex()
    objects = [parse(d) for d in documents]
    index.update(GatewayConfig({o.meta.key: o for o in objects}))
    edge = index.config.get(ObjectKey(GATEWAY, "default", "edge"))
    return bind(index, edge, known or Known(("default", "a"), ("default", "b")))  # type: ignore[arg-type]


def conditions(binding: Any, route: str, namespace: str = "default") -> dict[str, tuple[str, str]]:
    (status,) = binding.route_status[ObjectKey("HTTPRoute", namespace, route)]
    return {c.type: ("True" if c.status else "False", c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("listener", "route", "expected"),
    [
        (None, "a.example.com", "a.example.com"),
        ("a.example.com", "a.example.com", "a.example.com"),
        ("a.example.com", "b.example.com", None),
        ("*.example.com", "a.example.com", "a.example.com"),
        ("*.example.com", "a.b.example.com", "a.b.example.com"),
        ("*.example.com", "example.com", None),
        ("a.example.com", "*.example.com", "a.example.com"),
        ("*.example.com", "*.a.example.com", "*.a.example.com"),
        ("*.a.example.com", "*.example.com", "*.a.example.com"),
        ("*.example.com", "*.example.org", None),
    ],
)
def test_listener_and_route_hostnames_intersect_as_the_spec_says(
    listener: str | None, route: str, expected: str | None
) -> None:
    assert intersect(listener, route) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1s", 1.0), ("500ms", 0.5), ("1h30m", 5400.0), ("2m5s", 125.0), ("0s", 0.0)],
)
def test_gateway_api_durations_become_seconds(text: str, expected: float) -> None:
    assert seconds(text) == expected


def _paths(binding: Any) -> list[str]:
    (port,) = binding.plan.ports
    (host,) = port.virtual_hosts
    shown = []
    for rule in host.rules:
        path = rule.match.path
        label = f"{path.type}:{path.value}" if path else "any"
        if rule.match.method:
            label += f" {rule.match.method}"
        if rule.match.headers:
            label += f" +{len(rule.match.headers)}h"
        shown.append(f"{rule.route.name}/{label}")
    return shown


def test_rules_are_ordered_exact_then_longest_prefix_then_method_headers_and_age() -> None:
    older = http_route(
        "older",
        [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
                "backendRefs": [{"name": "a", "port": 80}],
            }
        ],
        metadata={"creationTimestamp": "2020-01-01T00:00:00Z"},
    )
    newer = http_route(
        "newer",
        [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
                "backendRefs": [{"name": "b", "port": 80}],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/a/b"}}],
                "backendRefs": [{"name": "b", "port": 80}],
            },
            {
                "matches": [{"path": {"type": "Exact", "value": "/a"}}],
                "backendRefs": [{"name": "b", "port": 80}],
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/a"}, "method": "GET"}],
                "backendRefs": [{"name": "b", "port": 80}],
            },
            {
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/a"},
                        "headers": [{"type": "Exact", "name": "x", "value": "1"}],
                    }
                ],
                "backendRefs": [{"name": "b", "port": 80}],
            },
        ],
        metadata={"creationTimestamp": "2024-01-01T00:00:00Z"},
    )
    assert _paths(bound(gateway(), newer, older)) == [
        "newer/Exact:/a",
        "newer/PathPrefix:/a/b",
        "newer/PathPrefix:/a GET",
        "newer/PathPrefix:/a +1h",
        "older/PathPrefix:/a",
        "newer/PathPrefix:/a",
    ]


@pytest.mark.parametrize(
    ("parent", "reason"),
    [
        ({"name": "edge", "namespace": "default", "sectionName": "nope"}, "NoMatchingParent"),
        ({"name": "edge", "namespace": "default", "port": 9999}, "NoMatchingParent"),
    ],
)
def test_a_parent_ref_that_matches_no_listener_is_not_accepted(
    parent: dict[str, Any], reason: str
) -> None:
    route = http_route("r", [{"backendRefs": [{"name": "a", "port": 80}]}], parentRefs=[parent])
    assert conditions(bound(gateway(), route), "r")["Accepted"] == ("False", reason)


def test_a_route_from_another_namespace_is_not_allowed_by_a_same_namespace_listener() -> None:
    route = http_route("r", [{"backendRefs": [{"name": "a", "port": 80}]}], namespace="team")
    assert conditions(bound(gateway(), route), "r", "team")["Accepted"] == (
        "False",
        "NotAllowedByListeners",
    )


def test_a_route_whose_hostnames_miss_the_listener_is_not_accepted() -> None:
    listener = {
        "name": "http",
        "port": 8080,
        "protocol": "HTTP",
        "hostname": "a.example.com",
        "allowedRoutes": {"namespaces": {"from": "Same"}},
    }
    route = http_route(
        "r", [{"backendRefs": [{"name": "a", "port": 80}]}], hostnames=["b.example.com"]
    )
    assert conditions(bound(gateway([listener]), route), "r")["Accepted"] == (
        "False",
        "NoMatchingListenerHostname",
    )


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ({"name": "ghost", "port": 80}, "BackendNotFound"),
        ({"group": "example.com", "kind": "Bucket", "name": "a"}, "InvalidKind"),
        ({"name": "a", "namespace": "other", "port": 80}, "RefNotPermitted"),
    ],
)
def test_invalid_backends_are_reported_and_answer_500(ref: dict[str, Any], reason: str) -> None:
    route = http_route("r", [{"backendRefs": [ref]}])
    binding = bound(gateway(), route, known=Known(("default", "a"), ("other", "a")))
    assert conditions(binding, "r") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", reason),
    }
    config = route_pb2.RouteConfiguration()
    route_configurations(binding.plan)["default/edge/8080"].packed.Unpack(config)
    assert config.virtual_hosts[0].routes[0].direct_response.status == 500


def test_cluster_names_are_the_service_port_whatever_the_rule_order() -> None:
    rules = [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/x"}}],
            "backendRefs": [{"name": "a", "port": 80}],
        },
        {"backendRefs": [{"name": "b", "port": 81}]},
    ]
    forward = bound(gateway(), http_route("r", rules))
    backward = bound(gateway(), http_route("r", list(reversed(rules))))
    names = [c.name for c in forward.plan.clusters]
    assert names == ["default/a/80", "default/b/81"]
    assert names == [c.name for c in backward.plan.clusters]


def test_a_regex_envoy_refuses_makes_the_route_not_accepted() -> None:
    route = http_route(
        "r",
        [
            {
                "matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}],
                "backendRefs": [{"name": "a", "port": 80}],
            }
        ],
    )
    binding = bound(gateway(), route)
    assert conditions(binding, "r")["Accepted"] == ("False", "UnsupportedValue")
    assert binding.plan.ports[0].virtual_hosts == ()


def test_listeners_on_one_port_with_the_same_hostname_conflict() -> None:
    listeners = [
        {"name": "one", "port": 8080, "protocol": "HTTP", "hostname": "a.example.com"},
        {"name": "two", "port": 8080, "protocol": "HTTP", "hostname": "a.example.com"},
        {"name": "tcp", "port": 9000, "protocol": "TCP"},
    ]
    status = bound(gateway(listeners)).gateway_status
    by_name = {
        ls.name: {c.type: (c.status, c.reason) for c in ls.conditions} for ls in status.listeners
    }
    assert by_name["one"]["Conflicted"] == (False, "NoConflicts")
    assert by_name["two"]["Conflicted"] == (True, "HostnameConflict")
    assert by_name["tcp"]["Accepted"] == (False, "UnsupportedProtocol")


@pytest.mark.parametrize("value", ["a\x00b", "a\r\nX-Injected: 1", "line\n"])
def test_a_header_value_envoy_would_refuse_makes_the_route_not_accepted(value: str) -> None:
    route = http_route(
        "r",
        [
            {
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"set": [{"name": "x-a", "value": value}]},
                    }
                ],
                "backendRefs": [{"name": "a", "port": 80}],
            }
        ],
    )
    assert conditions(bound(gateway(), route), "r")["Accepted"] == ("False", "UnsupportedValue")
