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

from sds.model import Endpoint, Health, ServiceSnapshot

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

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
                locality=base_pb2.Locality(region=region, zone=zone), lb_endpoints=lbs
            )
            for (region, zone), lbs in sorted(localities.items())
        ],
    )


@dataclass(frozen=True, slots=True)
class Resource:
    """One ClusterLoadAssignment, packed and hashed once, shared by every stream that sends it.

    ``delta_chunk`` is the resource already serialised as the ``resources`` entry of a
    DeltaDiscoveryResponse: protobuf messages concatenate, so a delta response is its header
    followed by the chunks of what it carries.
    """

    name: str
    version: str
    packed: any_pb2.Any
    endpoint_count: int
    delta_chunk: bytes


def build_resource(name: str, snapshot: ServiceSnapshot) -> Resource:
    """The resource ``name`` (the name the proxy asked for) with ``snapshot``'s endpoints."""
    packed = any_pb2.Any()
    packed.Pack(cluster_load_assignment(name, snapshot.endpoints), deterministic=True)
    version = hashlib.sha256(packed.value).hexdigest()[:16]
    chunk = discovery_pb2.DeltaDiscoveryResponse(
        resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
    ).SerializeToString()
    return Resource(name, version, packed, len(snapshot.endpoints), chunk)


def combined_version(resources: Iterable[Resource]) -> str:
    """A version for a set of resources: changes when any member or membership does."""
    digest = hashlib.sha256()
    for resource in sorted(resources, key=lambda r: r.name):
        digest.update(f"{resource.name}={resource.version};".encode())
    return digest.hexdigest()[:16]
