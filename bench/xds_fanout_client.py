"""1,000 xDS streams from one process: each subscribes to ``usersvc`` and ACKs every response.

Run by bench/xds_convergence.py as a separate process: ``python xds_fanout_client.py TARGET N``.
Prints ``ready`` once every stream received its first response.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
STREAMS_PER_CHANNEL = 100


async def stream(channel: grpc.aio.Channel, index: int, first: asyncio.Event) -> None:
    outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
    node = base_pb2.Node(id=f"fanout-{index}", cluster="bench")
    outbox.put_nowait(
        discovery_pb2.DiscoveryRequest(node=node, type_url=EDS, resource_names=["usersvc"])
    )

    async def requests():  # type: ignore[no-untyped-def]
        while True:
            yield await outbox.get()

    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
        requests()
    )
    async for response in call:
        outbox.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=EDS,
                resource_names=["usersvc"],
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )
        first.set()


async def main(target: str, count: int) -> None:
    channels = [grpc.aio.insecure_channel(target) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    firsts = [asyncio.Event() for _ in range(count)]
    tasks = [
        asyncio.create_task(stream(channels[i // STREAMS_PER_CHANNEL], i, firsts[i]))
        for i in range(count)
    ]
    await asyncio.gather(*(event.wait() for event in firsts))
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
