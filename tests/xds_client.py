"""A raw xDS gRPC client for protocol tests: send requests, read responses, with timeouts."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.rpc import status_pb2

from sds.xds.resources import EDS_TYPE_URL


class XdsClient:
    """One bidirectional xDS stream (SotW or delta, ADS or EDS) driven by a test."""

    def __init__(self, target: str, *, delta: bool = False, ads: bool = True, node: str = "test"):
        self.channel = grpc.aio.insecure_channel(target)
        self.delta = delta
        self.node = base_pb2.Node(id=node, cluster="tests")
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        if ads:
            stub: Any = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
            method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        else:
            stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(self.channel)
            method = stub.DeltaEndpoints if delta else stub.StreamEndpoints
        self.call = method(self._requests())
        # Reads happen in one task: cancelling a pending read() would cancel the whole call.
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    return
                self._inbox.put_nowait(response)
        except grpc.aio.AioRpcError as error:
            self._inbox.put_nowait(error)

    async def _requests(self) -> Any:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    def send(self, **fields: Any) -> None:
        """Queue a request; ``node`` and the EDS ``type_url`` are filled in by default."""
        fields.setdefault("node", self.node)
        fields.setdefault("type_url", EDS_TYPE_URL)
        message = (
            discovery_pb2.DeltaDiscoveryRequest(**fields)
            if self.delta
            else discovery_pb2.DiscoveryRequest(**fields)
        )
        self._outbox.put_nowait(message)

    def ack(self, response: Any, **fields: Any) -> None:
        """ACK ``response`` (SotW repeats its version; delta only its nonce)."""
        if not self.delta:
            fields.setdefault("version_info", response.version_info)
        self.send(response_nonce=response.nonce, **fields)

    def nack(self, response: Any, message: str, previous_version: str = "", **fields: Any) -> None:
        """Reject ``response`` with an error."""
        if not self.delta:
            fields.setdefault("version_info", previous_version)
        self.send(
            response_nonce=response.nonce,
            error_detail=status_pb2.Status(code=3, message=message),
            **fields,
        )

    async def receive(self, timeout: float = 5.0) -> Any:
        """The next response; fails the test when none comes in ``timeout`` seconds."""
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    async def expect_silence(self, seconds: float = 0.3) -> None:
        """Assert that no response arrives for ``seconds``."""
        try:
            response = await asyncio.wait_for(self._inbox.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {response}")

    async def close(self) -> None:
        """End the stream and the channel."""
        self._outbox.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()


def assignments(response: Any) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
    """The ClusterLoadAssignments in a SotW or delta response, by cluster name."""
    result = {}
    for item in response.resources:
        packed = item.resource if hasattr(item, "resource") else item
        cla = endpoint_pb2.ClusterLoadAssignment()
        packed.Unpack(cla)
        result[cla.cluster_name] = cla
    return result


def addresses(cla: endpoint_pb2.ClusterLoadAssignment) -> list[tuple[str, int]]:
    """(address, port) of every endpoint in an assignment."""
    return [
        (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
        for group in cla.endpoints
        for lb in group.lb_endpoints
    ]
