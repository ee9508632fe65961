"""A stand-in for kube-proxy: the connection-level balancer behind a Kubernetes Service.

Only ``meshctl demo`` uses it, to show the tutorial's problem on one machine; sds and usersvc
never import it. Like kube-proxy in front of a ClusterIP, it picks a backend once per TCP
connection (round robin) and then only forwards bytes, so every request on a long-lived
HTTP/2 connection reaches the same backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence

# How long a connection to a backend may take before the client's connection is dropped.
CONNECT_TIMEOUT = 5.0
CHUNK = 65536


class KubeProxy:
    """Listens on ``host:port`` and pipes each accepted connection to the next backend."""

    def __init__(self, backends: Sequence[tuple[str, int]], host: str = "127.0.0.1") -> None:
        if not backends:
            raise ValueError("a Service needs at least one backend")
        self.backends = list(backends)
        self.host = host
        self.port = 0
        # The backend each accepted connection was sent to, in order.
        self.picks: list[tuple[str, int]] = []
        self._next = itertools.cycle(self.backends)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> None:
        """Listen on ``port`` (0: any free one, then in :attr:`port`)."""
        self._server = await asyncio.start_server(self._accept, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every forwarded connection."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> KubeProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Run each connection as a task of ours, so stop() can cancel and await it.
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            self._connections.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = next(self._next)
        self.picks.append(backend)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection(*backend)
        except (OSError, TimeoutError):
            writer.close()
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, up_writer))
                group.create_task(_pipe(up_reader, writer))
        finally:
            for end in (up_writer, writer):
                end.close()
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(end.wait_closed(), 1)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy bytes until ``source`` ends, then end ``sink``'s writing side too."""
    with contextlib.suppress(OSError):
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
