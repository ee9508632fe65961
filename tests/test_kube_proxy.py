"""meshctl's stand-in for kube-proxy: one backend per TCP connection, round robin over them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import pytest

from meshctl.kube_proxy import KubeProxy


async def _echo_name(
    name: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer every line with the backend's name and the line."""
    while line := await reader.readline():
        writer.write(name + b":" + line)
        await writer.drain()
    writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[KubeProxy]:
    servers = [
        await asyncio.start_server(functools.partial(_echo_name, name), "127.0.0.1", 0)
        for name in (b"a", b"b", b"c")
    ]
    backends = [("127.0.0.1", s.sockets[0].getsockname()[1]) for s in servers]
    async with KubeProxy(backends) as balancer:
        yield balancer
    for server in servers:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def _answers(proxy: KubeProxy, lines: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    answers = []
    async with asyncio.timeout(5):
        for i in range(lines):
            writer.write(b"%d\n" % i)
            answers.append((await reader.readline()).split(b":")[0])
    writer.close()
    await writer.wait_closed()
    return answers


async def test_every_request_on_one_connection_reaches_one_backend(proxy: KubeProxy) -> None:
    assert await _answers(proxy, 12) == [b"a"] * 12


async def test_each_new_connection_goes_to_the_next_backend(proxy: KubeProxy) -> None:
    first = [(await _answers(proxy, 1))[0] for _ in range(4)]
    assert first == [b"a", b"b", b"c", b"a"]
    assert len(proxy.picks) == 4
