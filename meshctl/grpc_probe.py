"""The demo's proxyless gRPC client: GetUser calls through ``xds:///TARGET``, no Envoy involved.

Run as ``python -m meshctl.grpc_probe TARGET USERNAME --calls N --replicas R`` with the
bootstrap of ``sds bootstrap --grpc`` in ``GRPC_XDS_BOOTSTRAP``. grpcio keeps one xDS client
per process, so the demo runs this in a process of its own. It prints one JSON object: the
``resolvedname`` of the replica that answered each counted call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc

from usersvc.proto import users_pb2, users_pb2_grpc

CALL_TIMEOUT = 5.0
# How long the channel may take to learn every replica from sds and connect to each.
WARM_TIMEOUT = 30.0


async def probe(target: str, username: str, calls: int, replicas: int) -> list[str]:
    """The replicas that answered ``calls`` GetUser calls, once ``replicas`` are connected.

    Round robin on a cold channel picks only the subchannels that are already connected, so
    the channel is warmed first: called until ``replicas`` distinct replicas have answered.
    """
    async with grpc.aio.insecure_channel(f"xds:///{target}") as channel:
        stub = users_pb2_grpc.UsersStub(channel)
        request = users_pb2.GetUserRequest(username=username)
        seen: set[str] = set()
        async with asyncio.timeout(WARM_TIMEOUT):
            while len(seen) < replicas:
                answer = await stub.GetUser(request, timeout=CALL_TIMEOUT)
                seen.add(answer.replica.resolvedname)
        answered = []
        for _ in range(calls):
            answer = await stub.GetUser(request, timeout=CALL_TIMEOUT)
            answered.append(answer.replica.resolvedname)
        return answered


def main() -> None:
    """Print ``{"answered": [...]}``, or ``{"error": ...}`` and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m meshctl.grpc_probe")
    parser.add_argument("target", help="the xDS name, e.g. usersvc-grpc")
    parser.add_argument("username")
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--replicas", type=int, default=3, help="replicas to warm up to")
    args = parser.parse_args()
    try:
        answered = asyncio.run(probe(args.target, args.username, args.calls, args.replicas))
    except (grpc.RpcError, TimeoutError) as exc:
        print(json.dumps({"error": str(exc) or type(exc).__name__}))
        sys.exit(1)
    print(json.dumps({"answered": answered}))


if __name__ == "__main__":
    main()
