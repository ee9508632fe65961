"""gRPC load generator of bench/proxyless_grpc.py: GetUser over ``xds:///TARGET``; JSON stats.

Run as ``python bench/proxyless_grpc_load.py TARGET USERNAME --concurrency N --duration D``
with the bootstrap of ``sds bootstrap --grpc`` in ``GRPC_XDS_BOOTSTRAP``: N calls in flight at
once on one channel (one xDS client, round robin over every replica), for D seconds after a
warm-up. Prints the same fields as bench/loadgen.py, and which replicas answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from usersvc.proto import users_pb2

METHOD = "/envoymesh.users.v1.Users/GetUser"
CALL_TIMEOUT = 5.0


async def _worker(
    call: Any, request: bytes, deadline: float, latencies: list[float], errors: Counter[str]
) -> Counter[str]:
    """Call until the deadline; the replicas that answered."""
    replicas: Counter[str] = Counter()
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            answer = await call(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            errors[exc.code().name] += 1
            continue
        latencies.append(time.perf_counter() - started)
        replicas[users_pb2.GetUserResponse.FromString(answer).replica.resolvedname] += 1
    return replicas


async def load(
    target: str, username: str, concurrency: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Drive GetUser and return requests/s, latency percentiles (ms) and replicas."""
    request = users_pb2.GetUserRequest(username=username).SerializeToString()
    async with grpc.aio.insecure_channel(f"xds:///{target}") as channel:
        # Bytes in and out: the load generator spends no CPU it need not.
        call: Any = channel.unary_unary(METHOD)
        await asyncio.gather(
            *(
                _worker(call, request, time.perf_counter() + warmup, [], Counter())
                for _ in range(concurrency)
            )
        )
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        started = time.perf_counter()
        per_worker = await asyncio.gather(
            *(
                _worker(call, request, started + duration, latencies, errors)
                for _ in range(concurrency)
            )
        )
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 2)

    return {
        "target": target,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "replicas": dict(sum(per_worker, Counter())),
    }


def main() -> None:
    """Print the stats of one run as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", help="the xDS name, e.g. usersvc-grpc")
    parser.add_argument("username")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    result = asyncio.run(
        load(args.target, args.username, args.concurrency, args.duration, args.warmup)
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
