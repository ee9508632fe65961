"""Listeners: one per Gateway port, bound to that port, its routes from RDS over ADS."""

from __future__ import annotations

from typing import Any

from envoy.config.listener.v3 import listener_pb2

# Register the filter types the Anys below name.
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,  # noqa: F401
)
from google.protobuf import json_format

from sds.translate.gateways import GatewayPlan
from sds.translate.routes import route_config_name
from sds.xds.resources import Resource, pack

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def http_connection_manager(route_name: str, stat_prefix: str) -> dict[str, Any]:
    """An HttpConnectionManager whose routes come over ADS, ending with the Router."""
    return {
        "@type": f"{_HCM}.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "rds": {
            "route_config_name": route_name,
            "config_source": {"ads": {}, "resource_api_version": "V3"},
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }


def listeners(plan: GatewayPlan) -> dict[str, Resource]:
    """Every Listener of a Gateway, by name (the name of its RouteConfiguration too)."""
    found: dict[str, Resource] = {}
    for port in plan.ports:
        name = route_config_name(plan, port)
        manager = http_connection_manager(name, f"{plan.key.name}_{port.port}")
        # Clients reach the edge directly: it appends their address to X-Forwarded-For, and
        # paths are normalised before they are matched.
        manager.update({"use_remote_address": True, "normalize_path": True, "merge_slashes": True})
        listener = {
            "name": name,
            "address": {"socket_address": {"address": plan.address, "port_value": port.port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": manager,
                        }
                    ]
                }
            ],
        }
        found[name] = pack(name, json_format.ParseDict(listener, listener_pb2.Listener()))
    return found
