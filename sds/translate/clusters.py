"""Clusters: one per (Service, port), fed by EDS over ADS, named for what they stand for."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from sds.caching import Lru
from sds.translate.gateways import ClusterRef, GatewayPlan
from sds.xds.resources import Resource, pack

# Service appProtocol values that mean HTTP/2 in clear text to the backend.
HTTP2_PROTOCOLS = frozenset({"kubernetes.io/h2c", "h2c", "http2", "grpc"})
_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_built: Lru[tuple[ClusterRef, bool], Resource] = Lru(100_000)
_templates: dict[tuple[bool, bool], cluster_pb2.Cluster] = {}


def _cluster(ref: ClusterRef, proxyless: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": ref.name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        "lb_policy": "ROUND_ROBIN",
    }
    if proxyless:
        return cluster  # gRPC reads only what it supports; the rest is Envoy's
    cluster["connect_timeout"] = "0.25s"
    # Retries (of requests that never reached a backend) go to the hosts that can serve:
    # allow a quarter of the requests in flight, not Envoy's default of 3 per cluster.
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 10},
            }
        ]
    }
    # A host whose connections fail is ejected without waiting for discovery; its answers,
    # 5xx included, never eject it.
    cluster["outlier_detection"] = {
        "consecutive_local_origin_failure": 2,
        "split_external_local_origin_errors": True,
        "enforcing_consecutive_5xx": 0,
        "interval": "1s",
        "base_ejection_time": "10s",
        "max_ejection_percent": 100,
    }
    if ref.app_protocol in HTTP2_PROTOCOLS:
        cluster["typed_extension_protocol_options"] = {
            _OPTIONS: {
                "@type": f"type.googleapis.com/{_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _template(http2: bool, proxyless: bool) -> cluster_pb2.Cluster:
    """The cluster every Service port of one kind shares, but for its name."""
    key = (http2, proxyless)
    template = _templates.get(key)
    if template is None:
        shape = ClusterRef("", "", 0, "h2c" if http2 else "")
        template = json_format.ParseDict(_cluster(shape, proxyless), cluster_pb2.Cluster())
        _templates[key] = template
    return template


def cluster(ref: ClusterRef, proxyless: bool = False) -> Resource:
    """The Cluster of one Service port, built once."""
    key = (ref, proxyless)
    built = _built.get(key)
    if built is None:
        message = cluster_pb2.Cluster()
        message.CopyFrom(_template(ref.app_protocol in HTTP2_PROTOCOLS, proxyless))
        message.name = ref.name
        built = pack(ref.name, message)
        _built.put(key, built)
    return built


def clusters(plan: GatewayPlan) -> dict[str, Resource]:
    """Every Cluster a Gateway's routes send to, by name."""
    return {ref.name: cluster(ref) for ref in plan.clusters}
