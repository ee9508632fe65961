"""Clusters: one per (Service, port), fed by EDS over ADS, named for what they stand for.

A proxyless gRPC client's Clusters can ask it to secure its calls to the backends (gRFC A29):
an ``UpstreamTlsContext`` naming the certificate provider instance :data:`CERTIFICATE_PROVIDER`
of the client's bootstrap (``sds bootstrap --grpc --ca-file ...``) for the CA that checks the
backend and, for mutual TLS, the certificate the client presents.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from sds.caching import Lru
from sds.translate.gateways import ClusterRef, GatewayPlan
from sds.xds.resources import Resource, pack

# Service appProtocol values that mean HTTP/2 in clear text to the backend.
HTTP2_PROTOCOLS = frozenset({"kubernetes.io/h2c", "h2c", "http2", "grpc"})
_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# The certificate provider instance every proxyless client's bootstrap names (sds bootstrap).
CERTIFICATE_PROVIDER = "envoymesh"


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How proxyless clients secure their calls to backends (``--proxyless-tls``).

    ``client_certificate``: they present their certificate too (mutual TLS).
    ``subject_alt_names``: a backend's certificate must carry one of them (exact; ``*.``
    followed by a domain matches every name under it); empty: any the CA signed.
    """

    client_certificate: bool
    subject_alt_names: tuple[str, ...] = ()


_built: Lru[tuple[ClusterRef, bool, UpstreamTls | None], Resource] = Lru(100_000)
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


def _san_matcher(name: str) -> dict[str, str]:
    if name.startswith("*."):
        return {"suffix": name[1:]}
    return {"exact": name}


@functools.cache
def transport_socket(tls: UpstreamTls) -> base_pb2.TransportSocket:
    """The ``envoy.transport_sockets.tls`` socket of a proxyless Cluster, as gRPC reads it."""
    provider = {"instance_name": CERTIFICATE_PROVIDER, "certificate_name": "default"}
    validation: dict[str, Any] = {"ca_certificate_provider_instance": provider}
    if tls.subject_alt_names:
        validation["match_subject_alt_names"] = [_san_matcher(n) for n in tls.subject_alt_names]
    common: dict[str, Any] = {"validation_context": validation}
    if tls.client_certificate:
        common["tls_certificate_provider_instance"] = provider
    context = json_format.ParseDict({"common_tls_context": common}, tls_pb2.UpstreamTlsContext())
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(context)
    return socket


def cluster(ref: ClusterRef, proxyless: bool = False, tls: UpstreamTls | None = None) -> Resource:
    """The Cluster of one Service port, built once; ``tls`` only for proxyless clients."""
    key = (ref, proxyless, tls)
    built = _built.get(key)
    if built is None:
        message = cluster_pb2.Cluster()
        message.CopyFrom(_template(ref.app_protocol in HTTP2_PROTOCOLS, proxyless))
        message.name = ref.name
        if tls is not None:
            message.transport_socket.CopyFrom(transport_socket(tls))
        built = pack(ref.name, message)
        _built.put(key, built)
    return built


def clusters(plan: GatewayPlan) -> dict[str, Resource]:
    """Every Cluster a Gateway's routes send to, by name."""
    return {ref.name: cluster(ref) for ref in plan.clusters}
