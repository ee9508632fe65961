"""HTTP load generator: N keep-alive connections for D seconds; prints JSON stats.

Runs as its own process (``python bench/loadgen.py URL ...``) so its CPU is not the server's;
on a 2-core machine the two still share the cores, which every result states.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import aiohttp


async def _worker(  # noqa: PLR0917 - one call site, in this file
    session: aiohttp.ClientSession,
    url: str,
    method: str,
    body: bytes | None,
    deadline: float,
    latencies: list[float],
    errors: list[int],
    index: int,
    vary: bool,
) -> None:
    n = 0
    while time.perf_counter() < deadline:
        target = url.replace("{n}", f"{index}-{n}") if vary else url
        n += 1
        started = time.perf_counter()
        try:
            async with session.request(
                method, target, data=body, headers={"content-type": "application/json"}
            ) as response:
                await response.read()
                if response.status >= 400:
                    errors.append(response.status)
                    continue
        except aiohttp.ClientError:
            errors.append(0)
            continue
        latencies.append(time.perf_counter() - started)


async def load(
    url: str, *, method: str, body: bytes | None, concurrency: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Drive ``url`` and return requests/s and latency percentiles (ms)."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        vary = "{n}" in url
        if warmup:
            # Workers numbered past the measured ones: every {n} stays unique across both runs
            # (a PUT of a name that already exists is an update, which needs credentials).
            warm_until = time.perf_counter() + warmup
            await asyncio.gather(
                *(
                    _worker(session, url, method, body, warm_until, [], [], concurrency + i, vary)
                    for i in range(concurrency)
                )
            )
        latencies: list[float] = []
        errors: list[int] = []
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(
            *(
                _worker(session, url, method, body, deadline, latencies, errors, i, vary)
                for i in range(concurrency)
            )
        )
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 2)

    return {
        "url": url,
        "method": method,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "requests": len(latencies),
        "errors": len(errors),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="target; {n} in it becomes a unique number per request")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    result = asyncio.run(
        load(
            args.url,
            method=args.method,
            body=args.body.encode() if args.body else None,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
        )
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
