"""A fleet of ADS streams in one process, driven by bench/xds_fleet.py over stdin/stdout.

``python xds_fleet_client.py TARGET FIRST COUNT SERVICES [--shared NAME] [--delta]``

Stream ``i`` (FIRST <= i < FIRST + COUNT) subscribes to ``svc-{i % SERVICES}`` and, with
``--shared``, to the shared service too, and ACKs every response at once. Streams share one
TCP connection per STREAMS_PER_CHANNEL, as proxies behind a few nodes would not, but as a
load generator must to stay within its file descriptors.

Commands on stdin, one per line; each is answered by one JSON line on stdout:

- ``status``: how many streams were served (got a first response), failed (with gRPC codes),
  and responses received in total.
- ``mark``: start a measurement: remember, per stream, the time of the next response.
- ``report``: since the last mark: how many streams received anything, the time each first
  did (monotonic clock, shared by every process on Linux), and responses per stream.
- ``report-all``: since the last mark, every receipt time per stream index.
- ``await NAME SECONDS``: answer like ``report`` once every stream here that subscribes to NAME
  received a response since the last mark (or SECONDS passed), so the driver need not poll:
  polling a fleet busy receiving would take CPU from the clients and skew what it measures.

Each stream is one task that reads a response and writes its ACK on the call (no request
generator and queue between them), on uvloop where installed, so that one core of clients
can keep up with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoymesh.loop import event_loop_factory

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
STREAMS_PER_CHANNEL = 100


class Fleet:
    """The streams and what they saw."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.served = 0
        self.failed: Counter[str] = Counter()
        self.responses = 0
        self.marked: float | None = None
        self.after_mark: dict[int, list[float]] = {}
        # An ``await`` in progress: the streams still to hear, and who waits for that.
        self.awaited: set[int] = set()
        self.all_heard = asyncio.Event()

    def names(self, index: int) -> list[str]:
        names = [f"svc-{index % self.args.services}"]
        if self.args.shared:
            names.append(self.args.shared)
        return names

    def received(self, index: int) -> None:
        self.responses += 1
        if self.marked is not None:
            self.after_mark.setdefault(index, []).append(time.monotonic())
            if self.awaited:
                self.awaited.discard(index)
                if not self.awaited:
                    self.all_heard.set()

    async def wait_for(self, name: str, seconds: float) -> None:
        """Until every stream here subscribed to ``name`` heard something since the mark."""
        first, count = self.args.first, self.args.count
        self.awaited = {
            index
            for index in range(first, first + count)
            if name in self.names(index) and index not in self.after_mark
        }
        self.all_heard.clear()
        if self.awaited:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_heard.wait(), seconds)
        self.awaited = set()

    async def sotw(self, channel: grpc.aio.Channel, index: int) -> None:
        node = base_pb2.Node(id=f"fleet-{index}", cluster="bench")
        names = self.names(index)
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(
            discovery_pb2.DiscoveryRequest(node=node, type_url=EDS, resource_names=names)
        )
        first = True
        while (response := await call.read()) is not grpc.aio.EOF:
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=EDS,
                    resource_names=names,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                )
            )
            if first:
                first = False
                self.served += 1
            self.received(index)

    async def delta(self, channel: grpc.aio.Channel, index: int) -> None:
        node = base_pb2.Node(id=f"fleet-{index}", cluster="bench")
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                node=node, type_url=EDS, resource_names_subscribe=self.names(index)
            )
        )
        first = True
        while (response := await call.read()) is not grpc.aio.EOF:
            await call.write(
                discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, response_nonce=response.nonce)
            )
            if first:
                first = False
                self.served += 1
            self.received(index)

    async def one(self, channel: grpc.aio.Channel, index: int) -> None:
        try:
            await (self.delta if self.args.delta else self.sotw)(channel, index)
        except grpc.aio.AioRpcError as error:
            self.failed[error.code().name] += 1
        except asyncio.CancelledError:
            raise
        except Exception as error:  # counted and shown, never hidden
            self.failed[type(error).__name__] += 1

    async def answer(self, line: str) -> dict[str, Any]:
        command, *arguments = line.split() or ["status"]
        if command == "await":
            await self.wait_for(arguments[0], float(arguments[1]))
            command = "report"
        if command == "mark":
            self.marked = time.monotonic()
            self.after_mark.clear()
            return {"marked": self.marked}
        if command == "report":
            return {
                "streams": len(self.after_mark),
                "times": sorted(times[0] for times in self.after_mark.values()),
                "max_responses_per_stream": max(map(len, self.after_mark.values()), default=0),
                "responses": sum(map(len, self.after_mark.values())),
            }
        if command == "report-all":
            return {"times": {str(index): times for index, times in self.after_mark.items()}}
        return {
            "served": self.served,
            "failed": dict(self.failed),
            "responses": self.responses,
        }


async def main(args: argparse.Namespace) -> None:
    fleet = Fleet(args)
    channels = [
        grpc.aio.insecure_channel(args.target) for _ in range(-(-args.count // STREAMS_PER_CHANNEL))
    ]
    tasks = [
        asyncio.create_task(fleet.one(channels[i // STREAMS_PER_CHANNEL], args.first + i))
        for i in range(args.count)
    ]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        print(json.dumps(await fleet.answer(line.decode())), flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("services", type=int)
    parser.add_argument("--shared", default="")
    parser.add_argument("--delta", action="store_true")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main(parser.parse_args()))
