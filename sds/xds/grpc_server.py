"""The gRPC xDS server: ADS and EDS, state-of-the-world and delta, on grpc.aio.

Responses are written as bytes the cache serialised once (see :mod:`sds.xds.cache`), so the
methods are registered with a pass-through response serialiser instead of the generated
servicer helpers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from sds import metrics
from sds.errors import InvalidInput, LimitReached, NotFound, NotSynced, SdsError
from sds.xds.cache import XdsCache
from sds.xds.fetch import fetch
from sds.xds.resources import EDS_TYPE_URL
from sds.xds.stream import (
    DeltaStream,
    SotwStream,
    XdsProtocolError,
    XdsResourceExhausted,
    XdsStream,
)
from sds.xds.subscription import DEFAULT_MAX_NAMES

log = logging.getLogger("sds.xds")

StreamFactory = Callable[[type[XdsStream], str], XdsStream]

DEFAULT_MAX_STREAMS_PER_PEER = 1_000

_SERVER_OPTIONS = [
    # Envoy keeps xDS streams open for hours; let it ping to keep NATs and LBs from dropping them.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # The stream cliff: grpc.aio takes new calls from gRPC core one at a time on the event
    # loop. While a burst of proxies connects, calls wait in core's queue, and core refuses
    # calls past 1,000 waiting (some) and 3,000 (all) with RESOURCE_EXHAUSTED. A fleet
    # reconnecting after a restart is exactly such a burst: let them queue; the caps that
    # protect sds are --max-streams-per-peer and the subscription caps.
    ("grpc.server.max_pending_requests", 1_000_000),
    ("grpc.server.max_pending_requests_hard_limit", 1_000_000),
    # A call waits in that queue at most this long before core cancels it.
    ("grpc.server_max_unrequested_time_in_server", 300),
]


def server_options(max_connection_age: float, grace: float) -> list[tuple[str, int]]:
    """gRPC server options; connections are recycled after ``max_connection_age`` seconds.

    gRPC core spreads the age by up to 10 % either way (jitter), so a fleet that connected in
    one burst does not reconnect in one; after a GOAWAY, streams get ``grace`` seconds before
    the connection closes, and proxies reconnect, through the Service, to any replica.
    """
    options = list(_SERVER_OPTIONS)
    if max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace * 1000)),
        ]
    return options


def _raw(message: bytes) -> bytes:
    return message


_CODES: dict[type[SdsError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    LimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    NotSynced: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code(exc: SdsError) -> grpc.StatusCode:
    """The gRPC status code of a core error."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string (``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer  # unix sockets and the like: the whole string


class StreamGate:
    """Runs streams, counting them per client address (``--max-streams-per-peer``)."""

    def __init__(self, make: StreamFactory, max_streams_per_peer: int) -> None:
        self._make = make
        self._limit = max_streams_per_peer
        self._per_peer: Counter[str] = Counter()

    async def serve(
        self,
        kind: type[XdsStream],
        service: str,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Serve one stream, or refuse it when its address has too many."""
        peer = context.peer()
        address = peer_address(peer)
        if self._per_peer[address] >= self._limit:
            metrics.XDS_REFUSED.labels("too_many_streams").inc()
            log.warning(
                "xds stream refused: too many from one address",
                extra={"peer": address, "limit": self._limit},
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self._limit} xDS streams from {address}",
            )
        self._per_peer[address] += 1
        stream = self._make(kind, service)
        stream.peer = peer
        try:
            await stream.run(requests, context.write)
        except XdsProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except XdsResourceExhausted as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            self._per_peer[address] -= 1
            if not self._per_peer[address]:
                del self._per_peer[address]


class AggregatedDiscovery:
    """ADS: every type on one stream."""

    def __init__(self, gate: StreamGate) -> None:
        self._gate = gate

    async def StreamAggregatedResources(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """State-of-the-world ADS."""
        await self._gate.serve(SotwStream, "ads", request_iterator, context)

    async def DeltaAggregatedResources(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Incremental ADS."""
        await self._gate.serve(DeltaStream, "ads", request_iterator, context)


class EndpointDiscovery:
    """EDS on its own service."""

    def __init__(self, gate: StreamGate, cache: XdsCache, max_names: int) -> None:
        self._gate = gate
        self._cache = cache
        self._max_names = max_names

    async def FetchEndpoints(  # noqa: N802 - name fixed by the proto
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bytes:
        """One-shot fetch; an empty response (no resources) means "unchanged"."""
        try:
            answer = fetch(self._cache, request, max_names=self._max_names)
        except SdsError as exc:
            await context.abort(grpc_code(exc), exc.message)
        if answer is None:
            unchanged: bytes = discovery_pb2.DiscoveryResponse(
                version_info=request.version_info, type_url=EDS_TYPE_URL
            ).SerializeToString()
            return unchanged
        return answer.body

    async def StreamEndpoints(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """State-of-the-world EDS."""
        await self._gate.serve(SotwStream, "eds", request_iterator, context)

    async def DeltaEndpoints(  # noqa: N802 - name fixed by the proto
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Incremental EDS."""
        await self._gate.serve(DeltaStream, "eds", request_iterator, context)


def _handlers(gate: StreamGate, cache: XdsCache, max_names: int) -> list[grpc.GenericRpcHandler]:
    ads, eds = AggregatedDiscovery(gate), EndpointDiscovery(gate, cache, max_names)
    sotw_in = discovery_pb2.DiscoveryRequest.FromString
    delta_in = discovery_pb2.DeltaDiscoveryRequest.FromString

    def bidi(handler: Any, deserializer: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.stream_stream_rpc_method_handler(
            handler, request_deserializer=deserializer, response_serializer=_raw
        )

    return [
        grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            {
                "StreamAggregatedResources": bidi(ads.StreamAggregatedResources, sotw_in),
                "DeltaAggregatedResources": bidi(ads.DeltaAggregatedResources, delta_in),
            },
        ),
        grpc.method_handlers_generic_handler(
            "envoy.service.endpoint.v3.EndpointDiscoveryService",
            {
                "StreamEndpoints": bidi(eds.StreamEndpoints, sotw_in),
                "DeltaEndpoints": bidi(eds.DeltaEndpoints, delta_in),
                "FetchEndpoints": grpc.unary_unary_rpc_method_handler(
                    eds.FetchEndpoints, request_deserializer=sotw_in, response_serializer=_raw
                ),
            },
        ),
    ]


async def start_grpc_server(
    make: StreamFactory,
    cache: XdsCache,
    host: str,
    port: int,
    *,
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
    max_connection_age: float = 0.0,
    max_connection_age_grace: float = 0.0,
    credentials: grpc.ServerCredentials | None = None,
    max_names: int = DEFAULT_MAX_NAMES,
) -> grpc.aio.Server:
    """Bind and start the xDS gRPC server; stop it with ``await server.stop(grace)``.

    With ``credentials`` the port speaks TLS only; without, plaintext.
    """
    server = grpc.aio.server(options=server_options(max_connection_age, max_connection_age_grace))
    server.add_generic_rpc_handlers(
        _handlers(StreamGate(make, max_streams_per_peer), cache, max_names)
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("xds grpc listening", extra={"address": address, "tls": credentials is not None})
    return server
