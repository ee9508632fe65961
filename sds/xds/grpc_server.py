"""The gRPC xDS server: ADS and EDS, state-of-the-world and delta, on grpc.aio."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc

from sds.errors import ApiError
from sds.xds.fetch import fetch
from sds.xds.resources import EDS_TYPE_URL, ResourceCache
from sds.xds.stream import DeltaStream, SotwStream, XdsProtocolError, XdsStream

log = logging.getLogger("sds.xds")

StreamFactory = Callable[[type[XdsStream], str], XdsStream]

_SERVER_OPTIONS = [
    # Envoy keeps xDS streams open for hours; let it ping to keep NATs and LBs from dropping them.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


async def _serve(
    make: StreamFactory,
    kind: type[XdsStream],
    service: str,
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext[Any, Any],
) -> None:
    stream = make(kind, service)
    try:
        await stream.run(requests, context.write)
    except XdsProtocolError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class AggregatedDiscovery:
    """ADS: every type on one stream (we serve ClusterLoadAssignments)."""

    def __init__(self, make: StreamFactory) -> None:
        self._make = make

    async def StreamAggregatedResources(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """State-of-the-world ADS."""
        await _serve(self._make, SotwStream, "ads", request_iterator, context)

    async def DeltaAggregatedResources(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Incremental ADS."""
        await _serve(self._make, DeltaStream, "ads", request_iterator, context)


class EndpointDiscovery:
    """EDS on its own service."""

    def __init__(self, make: StreamFactory, cache: ResourceCache) -> None:
        self._make = make
        self._cache = cache

    async def FetchEndpoints(  # noqa: N802 - name fixed by the proto
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> discovery_pb2.DiscoveryResponse:
        """One-shot fetch; an empty response (no resources) means "unchanged"."""
        try:
            version, response = fetch(self._cache, request)
        except ApiError as exc:
            code = (
                grpc.StatusCode.UNAVAILABLE
                if exc.status == 503
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            await context.abort(code, exc.message)
        return response or discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=EDS_TYPE_URL
        )

    async def StreamEndpoints(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """State-of-the-world EDS."""
        await _serve(self._make, SotwStream, "eds", request_iterator, context)

    async def DeltaEndpoints(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Incremental EDS."""
        await _serve(self._make, DeltaStream, "eds", request_iterator, context)


async def start_grpc_server(
    make: StreamFactory, cache: ResourceCache, host: str, port: int
) -> grpc.aio.Server:
    """Bind and start the xDS gRPC server; stop it with ``await server.stop(grace)``."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AggregatedDiscovery(make), server)
    eds_pb2_grpc.add_EndpointDiscoveryServiceServicer_to_server(
        EndpointDiscovery(make, cache), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("xds grpc listening", extra={"address": address})
    return server
