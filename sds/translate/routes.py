"""RouteConfigurations: one per Gateway port, a virtual host per hostname, rules in spec order.

Each rule's Envoy route is built once per bound rule and reused (a change of one HTTPRoute
rebuilds only its own routes); a RouteConfiguration is then assembled from them.

Invalid backends keep their share of the weight and answer 500: they become a weighted entry
to a cluster that never exists, with ``cluster_not_found_response_code`` 500. A rule whose
backends are all invalid answers 500 directly.
"""

from __future__ import annotations

import re
from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2

# Registers the retry predicate's type for the Any in retry_host_predicate.
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from google.protobuf import json_format

from sds.caching import Lru
from sds.gatewayapi.model import HeaderChange, ObjectKey, PathChange, RouteMatch, Rule, StringMatch
from sds.translate.gateways import BoundRule, GatewayPlan, PortPlan, Target, normalized_prefix
from sds.xds.resources import Resource, pack

# The weighted entry of an invalid backend: no cluster has this name (names hold a port).
INVALID_BACKEND = "envoymesh/invalid-backend"
_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}
_DURATION = re.compile(r"([0-9]+)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# Requests that never reached a backend are safe to retry on another host for every method:
# no connection, a refused stream, or an envoymesh sidecar's answer that it could not reach
# its app (it marks that answer x-envoymesh-unreachable). Idempotent methods are retried
# after a reset too (a replica that died mid-request). Answers of the app itself, 503s
# included, are never retried: when backends shed load, retries would multiply it.
UNREACHABLE_HEADER = "x-envoymesh-unreachable"
IDEMPOTENT_METHODS = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
_RETRY_JSON = {
    "retry_on": "connect-failure,refused-stream,retriable-headers",
    "retriable_headers": [{"name": UNREACHABLE_HEADER, "present_match": True}],
    "num_retries": 3,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
}
_RETRY = json_format.ParseDict(_RETRY_JSON, route_components_pb2.RetryPolicy())
_RETRY_IDEMPOTENT = json_format.ParseDict(
    {**_RETRY_JSON, "retry_on": f"{_RETRY_JSON['retry_on']},reset"},
    route_components_pb2.RetryPolicy(),
)
_IDEMPOTENT_MATCH = route_components_pb2.HeaderMatcher(
    name=":method", string_match={"safe_regex": {"regex": "|".join(IDEMPOTENT_METHODS)}}
)


def route_config_name(plan: GatewayPlan, port: PortPlan) -> str:
    """The RouteConfiguration (and Listener) name of a Gateway port."""
    return f"{plan.key.namespace}/{plan.key.name}/{port.port}"


def seconds(duration: str) -> float:
    """A Gateway API duration (``1h30m``, ``500ms``) in seconds."""
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(duration))


def _string(match: StringMatch) -> dict[str, Any]:
    if match.type == "RegularExpression":
        return {"safe_regex": {"regex": match.value}}
    return {"exact": match.value}


def _path(match: StringMatch, proxyless: bool) -> dict[str, Any]:
    if match.type == "Exact":
        return {"path": match.value}
    if match.type == "RegularExpression":
        return {"safe_regex": {"regex": match.value}}
    prefix = normalized_prefix(match.value)
    if prefix == "/":
        return {"prefix": "/"}
    if proxyless:
        # gRPC's client has no path_separated_prefix: the same whole-segment rule as a regex.
        return {"safe_regex": {"regex": f"{re.escape(prefix)}(/.*)?"}}
    return {"path_separated_prefix": prefix}


def _match(match: RouteMatch, proxyless: bool) -> dict[str, Any]:
    built: dict[str, Any] = _path(match.path, proxyless) if match.path else {"prefix": "/"}
    headers = []
    seen: set[str] = set()
    for header in match.headers:
        name = header.name.lower()
        if name in seen:
            continue  # the spec: only the first match of a header name counts
        seen.add(name)
        headers.append({"name": name, "string_match": _string(header)})
    if match.method:
        headers.append({"name": ":method", "string_match": {"exact": match.method}})
    if headers:
        built["headers"] = headers
    query = []
    seen = set()
    for param in match.query:
        if param.name in seen:
            continue
        seen.add(param.name)
        query.append({"name": param.name, "string_match": _string(param)})
    if query:
        built["query_parameters"] = query
    return built


def _header_options(change: HeaderChange) -> tuple[list[dict[str, Any]], list[str]]:
    added = [
        {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for name, value in change.set
    ] + [
        {"header": {"key": name, "value": value}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for name, value in change.add
    ]
    return added, [name.lower() for name in change.remove]


def _prefix_of(bound: BoundRule) -> str:
    path = bound.match.path
    if path is None or path.type != "PathPrefix":
        return ""
    return normalized_prefix(path.value)


def _rewrite_path(
    bound: BoundRule, change: PathChange, into: dict[str, Any], redirect: bool
) -> None:
    if change.type == "ReplaceFullPath":
        if redirect:
            into["path_redirect"] = change.value
        else:
            into["regex_rewrite"] = {"pattern": {"regex": "^.*$"}, "substitution": change.value}
        return
    prefix = _prefix_of(bound)
    replacement = change.value
    if prefix in ("", "/"):
        if replacement in ("", "/"):
            return
        # The whole path is the matched prefix: put the replacement in front of it.
        into["regex_rewrite"] = {
            "pattern": {"regex": "^/"},
            "substitution": replacement.rstrip("/") + "/",
        }
        return
    if replacement in ("", "/"):
        # /prefix/rest -> /rest, and /prefix -> / (never an empty path or a double slash).
        into["regex_rewrite"] = {
            "pattern": {"regex": f"^{re.escape(prefix)}/*"},
            "substitution": "/",
        }
        return
    into["prefix_rewrite"] = replacement.rstrip("/") if replacement != "/" else "/"


def _action(bound: BoundRule, proxyless: bool) -> dict[str, Any]:
    rule = bound.rule
    filters = rule.filters
    route: dict[str, Any] = {"match": _match(bound.match, proxyless)}
    for side, change in (
        ("request", filters.request_headers),
        ("response", filters.response_headers),
    ):
        if change is not None and not proxyless:
            added, removed = _header_options(change)
            if added:
                route[f"{side}_headers_to_add"] = added
            if removed:
                route[f"{side}_headers_to_remove"] = removed
    if filters.redirect is not None:
        redirect = filters.redirect
        action: dict[str, Any] = {
            "response_code": _REDIRECT_CODES.get(redirect.status_code, "FOUND")
        }
        if redirect.scheme:
            action["scheme_redirect"] = redirect.scheme
        if redirect.hostname:
            action["host_redirect"] = redirect.hostname
        if redirect.port:
            action["port_redirect"] = redirect.port
        if redirect.path is not None:
            _rewrite_path(bound, redirect.path, action, redirect=True)
        route["redirect"] = action
        return route
    valid = [t for t in bound.targets if t.weight > 0]
    if not valid or all(t.cluster is None for t in valid):
        route["direct_response"] = {"status": 500}
        return route
    forward: dict[str, Any] = {}
    if len(valid) == 1:
        forward["cluster"] = valid[0].cluster.name if valid[0].cluster else INVALID_BACKEND
    else:
        forward["weighted_clusters"] = {
            "clusters": [
                {
                    "name": t.cluster.name if t.cluster else INVALID_BACKEND,
                    "weight": {"value": t.weight},
                }
                for t in valid
            ]
        }
    if any(t.cluster is None for t in valid):
        forward["cluster_not_found_response_code"] = "INTERNAL_SERVER_ERROR"
    if rule.timeout is not None:
        whole, fraction = divmod(seconds(rule.timeout), 1.0)
        forward["timeout"] = {"seconds": int(whole), "nanos": round(fraction * 1e9)}
    if filters.rewrite is not None:
        if filters.rewrite.hostname:
            forward["host_rewrite_literal"] = filters.rewrite.hostname
        if filters.rewrite.path is not None:
            _rewrite_path(bound, filters.rewrite.path, forward, redirect=False)
    if not proxyless:
        forward["retry_policy"] = _RETRY
    route["route"] = forward
    return route


# (route, rule index, match index, proxyless) -> what the routes were built from, and them.
# Validated by identity: the config source keeps an unchanged route the same object, so a
# lookup costs no deep hashing or comparison of the rule.
_built: Lru[
    tuple[ObjectKey, int, int, bool],
    tuple[Rule, RouteMatch, tuple[Target, ...], tuple[route_components_pb2.Route, ...]],
] = Lru(200_000)


def envoy_route(bound: BoundRule, proxyless: bool = False) -> route_components_pb2.Route:
    """The Envoy route of one bound rule.

    Message constructors take nested dicts, at a fraction of json_format's cost.
    """
    return route_components_pb2.Route(**_action(bound, proxyless))


def _cached_routes(bound: BoundRule, proxyless: bool) -> tuple[route_components_pb2.Route, ...]:
    key = (bound.route, bound.rule_index, bound.match_index, proxyless)
    found = _built.get(key)
    if (
        found is not None
        and found[0] is bound.rule
        and found[1] is bound.match
        and found[2] == bound.targets
    ):
        return found[3]
    built = envoy_routes(bound, proxyless)
    _built.put(key, (bound.rule, bound.match, bound.targets, built))
    return built


def envoy_routes(
    bound: BoundRule, proxyless: bool = False
) -> tuple[route_components_pb2.Route, ...]:
    """The Envoy routes of one bound rule: for Envoy, idempotent methods get their own copy
    that retries resets too (a retry policy cannot depend on the method)."""
    route = envoy_route(bound, proxyless)
    if proxyless or not route.route.HasField("retry_policy"):
        return (route,)
    method = bound.match.method
    if method is not None:
        if method in IDEMPOTENT_METHODS:
            only = route_components_pb2.Route()
            only.CopyFrom(route)
            only.route.retry_policy.CopyFrom(_RETRY_IDEMPOTENT)
            split: tuple[route_components_pb2.Route, ...] = (only,)
        else:
            split = (route,)
    else:
        idempotent = route_components_pb2.Route()
        idempotent.CopyFrom(route)
        idempotent.match.headers.append(_IDEMPOTENT_MATCH)
        idempotent.route.retry_policy.CopyFrom(_RETRY_IDEMPOTENT)
        split = (idempotent, route)
    return split


def domains(hostname: str) -> list[str]:
    """Envoy domains for a hostname: the port in Host is ignored."""
    if hostname == "*":
        return ["*"]
    return [hostname, f"{hostname}:*"]


def route_configuration(name: str, port: PortPlan, proxyless: bool = False) -> Resource:
    """The RouteConfiguration of one port."""
    virtual_hosts = []
    refs: set[str] = set()
    for host in port.virtual_hosts:
        routes = [r for bound in host.rules for r in _cached_routes(bound, proxyless)]
        for bound in host.rules:
            if bound.rule.filters.redirect is None:
                refs.update(t.cluster.name for t in bound.targets if t.cluster and t.weight)
        virtual_hosts.append(
            route_components_pb2.VirtualHost(
                name=host.hostname, domains=domains(host.hostname), routes=routes
            )
        )
    message = route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=virtual_hosts,
        # Internal to the mesh (see the retries); clients need not see it.
        response_headers_to_remove=[] if proxyless else [UNREACHABLE_HEADER],
    )
    return pack(name, message, frozenset(refs))


def route_configurations(plan: GatewayPlan) -> dict[str, Resource]:
    """Every RouteConfiguration of a Gateway, by name."""
    return {
        (name := route_config_name(plan, port)): route_configuration(name, port)
        for port in plan.ports
    }
