"""One xDS stream driven through its own interface: a request iterator and a send callable.

gRPC hands a stream exactly these two things; here they are plain asyncio objects, so a test
can hold a write's completion back, which a real connection never does on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from sds.model import Endpoint, Source
from sds.registry import Registry
from sds.xds.cache import XdsCache
from sds.xds.proxies import ProxyTracker
from sds.xds.resources import EDS_TYPE_URL
from sds.xds.stream import SotwStream


class HeldWrites:
    """A send callable whose writes complete only when released."""

    def __init__(self) -> None:
        self.sent: list[discovery_pb2.DiscoveryResponse] = []
        self.released = asyncio.Event()

    async def __call__(self, message: bytes) -> None:
        self.sent.append(discovery_pb2.DiscoveryResponse.FromString(message))
        await self.released.wait()


async def requests_from(
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None],
) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
    while (request := await queue.get()) is not None:
        yield request


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


async def test_an_ack_that_overtakes_the_write_completion_is_recorded_at_once() -> None:
    registry = Registry()
    registry.set_source_status("test", ready=True)
    registry.replace(Source.REGISTRATION, "a", [Endpoint("10.0.0.1", 80, Source.REGISTRATION)])
    stream = SotwStream(XdsCache(registry), ProxyTracker(), service="ads")
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
    writes = HeldWrites()
    running = asyncio.create_task(stream.run(requests_from(queue), writes))
    try:
        queue.put_nowait(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id="proxy"), type_url=EDS_TYPE_URL, resource_names=["a"]
            )
        )
        await until(lambda: len(writes.sent) == 1)
        answer = writes.sent[0]
        queue.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=EDS_TYPE_URL,
                resource_names=["a"],
                version_info=answer.version_info,
                response_nonce=answer.nonce,
            )
        )
        await until(lambda: stream.status is not None and stream.status.state == "SYNCED")

        assert not writes.released.is_set()  # the write has still not completed
        assert stream.status is not None
        assert stream.status.last_version_acked == answer.version_info
        assert len(writes.sent) == 1  # an ACK is answered with nothing
    finally:
        writes.released.set()
        queue.put_nowait(None)
        await asyncio.wait_for(running, 5)
