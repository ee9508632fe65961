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
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from sds.model import Endpoint, Health, ServiceSnapshot
from sds.registry import Registry

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
    """One ClusterLoadAssignment, packed, with its content version."""

    name: str
    version: str
    packed: any_pb2.Any
    endpoint_count: int


class ResourceCache:
    """Builds each requested resource once per registry snapshot.

    Keyed by the name the proxy asked for: ``usersvc`` and ``usersvc.default`` may resolve to
    the same service but each answer carries the proxy's own ``cluster_name``.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._cache: dict[str, tuple[ServiceSnapshot, Resource]] = {}

    def get(self, name: str) -> Resource:
        """The current resource for ``name`` (an empty assignment for an unknown service)."""
        snap = self._registry.snapshot(self._registry.resolve(name))
        cached = self._cache.get(name)
        if cached is not None and cached[0] is snap:
            return cached[1]
        cla = cluster_load_assignment(name, snap.endpoints)
        packed = any_pb2.Any()
        packed.Pack(cla, deterministic=True)
        digest = hashlib.sha256(packed.value).hexdigest()[:16]
        resource = Resource(name, digest, packed, len(snap.endpoints))
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[name] = (snap, resource)
        return resource

    def known_names(self) -> list[str]:
        """Every service the registry knows, for wildcard subscriptions."""
        return self._registry.services()

    def answerable(self, names: Iterable[str]) -> list[Resource]:
        """The resources for ``names`` that may be sent now, in name order.

        Until every source has synced, an empty assignment may only mean "not learned yet"
        (sds just restarted, registrations not back): it is withheld, so a proxy keeps the
        endpoints it has instead of dropping them all.
        """
        resources = [self.get(name) for name in sorted(names)]
        if self._registry.ready:
            return resources
        return [r for r in resources if r.endpoint_count]


def combined_version(resources: Iterable[Resource]) -> str:
    """A version for a set of resources: changes when any member or membership does."""
    digest = hashlib.sha256()
    for resource in sorted(resources, key=lambda r: r.name):
        digest.update(f"{resource.name}={resource.version};".encode())
    return digest.hexdigest()[:16]
