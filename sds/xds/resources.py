"""ClusterLoadAssignments built from registry snapshots, with content-hash versions.

A resource's version is a hash of its serialized bytes, not a counter: after an sds restart
the same endpoints get the same version, and different endpoints can never reuse an old one,
so a proxy reconnecting with its last version is answered correctly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from sds.model import Endpoint, Health, ServiceSnapshot

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CDS_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS_TYPE_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# Served from the Gateway translation; EDS comes from the endpoints.
CONFIG_TYPE_URLS = (CDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL)
# For Listeners and Clusters an empty first request is a wildcard (the xDS "legacy wildcard").
WILDCARD_TYPE_URLS = frozenset({CDS_TYPE_URL, LDS_TYPE_URL})
SHORT_TYPE_NAMES = {
    EDS_TYPE_URL: "eds",
    CDS_TYPE_URL: "cds",
    LDS_TYPE_URL: "lds",
    RDS_TYPE_URL: "rds",
}

_HEALTH = {
    Health.HEALTHY: health_check_pb2.HEALTHY,
    Health.DRAINING: health_check_pb2.DRAINING,
    Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
}


def _lb_endpoint(endpoint: Endpoint) -> endpoint_components_pb2.LbEndpoint:
    lb = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=endpoint.address, port_value=endpoint.port
                )
            )
        ),
        health_status=_HEALTH[endpoint.health],
        load_balancing_weight=wrappers_pb2.UInt32Value(value=endpoint.weight),
    )
    if endpoint.canary:
        canary = struct_pb2.Struct()
        canary.update({"canary": True})
        lb.metadata.CopyFrom(base_pb2.Metadata(filter_metadata={"envoy.lb": canary}))
    return lb


def cluster_load_assignment(
    cluster_name: str, endpoints: Iterable[Endpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped by locality (region, zone), in the snapshot's stable order."""
    localities: dict[tuple[str, str], list[endpoint_components_pb2.LbEndpoint]] = {}
    for endpoint in endpoints:
        localities.setdefault((endpoint.region, endpoint.zone), []).append(_lb_endpoint(endpoint))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=region, zone=zone),
                lb_endpoints=lbs,
                # gRPC clients drop a locality without a weight; Envoy ignores it unless
                # locality-weighted balancing is on. The sum keeps each endpoint's share.
                load_balancing_weight=wrappers_pb2.UInt32Value(
                    value=sum(lb.load_balancing_weight.value for lb in lbs)
                ),
            )
            for (region, zone), lbs in sorted(localities.items())
        ],
    )


@dataclass(frozen=True, slots=True)
class Resource:
    """One xDS resource, packed and hashed once, shared by every stream that sends it.

    ``delta_chunk`` is the resource already serialised as the ``resources`` entry of a
    DeltaDiscoveryResponse: protobuf messages concatenate, so a delta response is its header
    followed by the chunks of what it carries. ``refs`` names the clusters a
    RouteConfiguration sends to (make before break: they go first).
    """

    name: str
    version: str
    packed: any_pb2.Any
    endpoint_count: int
    delta_chunk: bytes
    refs: frozenset[str] = frozenset()


def pack(
    name: str, message: Message, refs: frozenset[str] = frozenset(), count: int = 0
) -> Resource:
    """``message`` as the resource ``name``, its version a hash of its bytes."""
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    version = hashlib.sha256(packed.value).hexdigest()[:16]
    chunk = discovery_pb2.DeltaDiscoveryResponse(
        resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
    ).SerializeToString()
    return Resource(name, version, packed, count, chunk, refs)


def build_resource(
    name: str, snapshot: ServiceSnapshot, endpoints: Iterable[Endpoint] | None = None
) -> Resource:
    """The resource ``name`` (the name the proxy asked for) with ``snapshot``'s endpoints.

    ``endpoints``, when given, is the part of the snapshot the name stands for (one port).
    """
    chosen = tuple(snapshot.endpoints if endpoints is None else endpoints)
    return pack(name, cluster_load_assignment(name, chosen), count=len(chosen))


def combined_version(resources: Iterable[Resource]) -> str:
    """A version for a set of resources: changes when any member or membership does."""
    digest = hashlib.sha256()
    for resource in sorted(resources, key=lambda r: r.name):
        digest.update(f"{resource.name}={resource.version};".encode())
    return digest.hexdigest()[:16]
