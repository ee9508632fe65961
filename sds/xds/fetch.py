"""One-shot fetches (REST polling and gRPC ``FetchEndpoints``): no stream, no state."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from sds.errors import ApiError, bad_request
from sds.xds.resources import EDS_TYPE_URL, ResourceCache, combined_version
from sds.xds.stream import CONTROL_PLANE


def fetch(
    cache: ResourceCache, request: discovery_pb2.DiscoveryRequest
) -> tuple[str, discovery_pb2.DiscoveryResponse | None]:
    """The current version for the request's resources, and a response unless it is current.

    No resource names means every known service. Raises :class:`ApiError`: 400 for a type
    other than ClusterLoadAssignment, 503 while every requested resource is withheld.
    """
    if request.type_url not in ("", EDS_TYPE_URL):
        raise bad_request(f"only {EDS_TYPE_URL} is served here, not {request.type_url}")
    resources = cache.answerable(set(request.resource_names) or cache.known_names())
    if not resources and request.resource_names:
        raise ApiError(503, "sds has not synced its sources yet; keep what you have and retry")
    version = combined_version(resources)
    if request.version_info == version:
        return version, None
    return version, discovery_pb2.DiscoveryResponse(
        version_info=version,
        resources=[r.packed for r in resources],
        type_url=EDS_TYPE_URL,
        control_plane=CONTROL_PLANE,
    )
