"""What gRPC alone costs: a bare grpc.aio ADS server, to measure sds's push path against.

``python xds_grpc_floor.py PORT`` serves ``StreamAggregatedResources`` on 127.0.0.1:PORT the
way sds's streams use grpc.aio (uvloop, the same server options, one task per stream plus
one reading its requests, responses written as bytes serialised once) and does nothing else:
no registry, cache, subscriptions or bookkeeping. Each stream gets one response at once; on
SIGUSR1 every subscriber of ``svc-7``, and on SIGUSR2 every subscriber of ``shared``, gets one
more. Prints ``ready`` once it listens. bench/xds_fleet.py drives it with the same client fleet
as sds, so the difference between the two is what sds adds to each push.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoymesh.loop import event_loop_factory
from sds.model import Endpoint, Source
from sds.server import GC_THRESHOLDS
from sds.xds.grpc_server import server_options
from sds.xds.resources import EDS_TYPE_URL, cluster_load_assignment

subscribers: dict[str, list[asyncio.Event]] = {}


async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Answer the first request, then push whenever a subscribed name is signalled."""
    first = await anext(aiter(requests))
    pushed = asyncio.Event()
    for name in first.resource_names:
        subscribers.setdefault(name, []).append(pushed)

    async def read_acks() -> None:
        async for _ in requests:
            pass

    reader = asyncio.create_task(read_acks())
    body = response(list(first.resource_names))
    try:
        for nonce in itertools.count(1):
            await context.write(body + f"\x2a{chr(len(str(nonce)))}{nonce}".encode())
            await pushed.wait()
            pushed.clear()
    finally:
        for name in first.resource_names:
            subscribers[name].remove(pushed)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def response(names: list[str]) -> bytes:
    """A response like sds's: one assignment with one endpoint per name, without a nonce."""
    resources = []
    for name in names:
        packed = any_pb2.Any()
        packed.Pack(cluster_load_assignment(name, [Endpoint("10.0.0.1", 80, Source.REGISTRATION)]))
        resources.append(packed)
    message = discovery_pb2.DiscoveryResponse(
        version_info="1", resources=resources, type_url=EDS_TYPE_URL
    )
    return message.SerializeToString()


def push(name: str) -> None:
    """Give every subscriber of ``name`` one more response."""
    for event in subscribers.get(name, []):
        event.set()


async def main(port: int) -> None:
    server = grpc.aio.server(options=server_options(0, 0))
    handler = grpc.stream_stream_rpc_method_handler(
        stream,
        request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
        response_serializer=bytes,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService",
                {"StreamAggregatedResources": handler},
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, push, "svc-7")
    loop.add_signal_handler(signal.SIGUSR2, push, "shared")
    gc.freeze()  # as sds does
    gc.set_threshold(*GC_THRESHOLDS)
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main(int(sys.argv[1])))
