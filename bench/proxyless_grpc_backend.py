"""Backends of bench/proxyless_grpc.py: gRPC servers on loopback that answer with their name.

Run as ``python bench/proxyless_grpc_backend.py NAME [NAME...]``: one grpc.aio server per
name on a free 127.0.0.1 port, each answering every unary method with its name (the handler
of the tests' ``grpc_backends``). Prints ``{NAME: PORT, ...}`` once all listen, and serves
until its standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import named_grpc_handler


async def main(names: list[str]) -> None:
    """Serve every name until stdin closes."""
    servers, ports = [], {}
    for name in names:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((named_grpc_handler(name),))
        ports[name] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
    print(json.dumps(ports), flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await asyncio.gather(*(server.stop(grace=None) for server in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
