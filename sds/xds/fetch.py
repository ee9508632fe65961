"""One-shot fetches (REST polling and gRPC ``FetchEndpoints``): no stream, no state."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from sds.errors import bad_request
from sds.xds.resources import EDS_TYPE_URL, ResourceCache, combined_version
from sds.xds.stream import CONTROL_PLANE


def fetch(
    cache: ResourceCache, request: discovery_pb2.DiscoveryRequest
) -> tuple[str, discovery_pb2.DiscoveryResponse | None]:
    """The current version for the request's resources, and a response unless it is current.

    No resource names means every known service. Raises a 400 :class:`ApiError` for a type
    other than ClusterLoadAssignment.
    """
    if request.type_url not in ("", EDS_TYPE_URL):
        raise bad_request(f"only {EDS_TYPE_URL} is served here, not {request.type_url}")
    names = sorted(set(request.resource_names)) or cache.known_names()
    resources = [cache.get(name) for name in names]
    version = combined_version(resources)
    if request.version_info == version:
        return version, None
    return version, discovery_pb2.DiscoveryResponse(
        version_info=version,
        resources=[r.packed for r in resources],
        type_url=EDS_TYPE_URL,
        control_plane=CONTROL_PLANE,
    )
