"""usersvc under a sign-up flood: N concurrent PUTs of new users, peak RSS and latencies.

Starts a private PostgreSQL and one usersvc process, opens N connections and sends one
``PUT /user/<new name>`` on each at the same moment. Every answer must be 201, a 503 (the
expected wait for a hash over its budget; with Retry-After, after the refusal delay) or a 429;
none a 500 or a timeout. Prints the answers, p50/p99 per status and usersvc's peak RSS (VmHWM).
Run: ``.venv/bin/python bench/usersvc_flood.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, usersvc_on_postgres


@dataclass
class FloodResult:
    """What a flood got back."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    missing_retry_after: int = 0
    seconds: float = 0.0

    def quantile(self, q: float, status: int | None = None) -> float:
        """The ``q`` quantile (0-1) of latencies in seconds, of one status or of all."""
        values = sorted(v for s, vs in self.latencies.items() if status in (None, s) for v in vs)
        if not values:
            return 0.0
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: whether the machine had other work meanwhile."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


async def flood(base: str, count: int, prefix: str = "flood", timeout: float = 60) -> FloodResult:
    """PUT ``count`` new users at once, each on its own connection.

    aiohttp, not httpx: with hundreds of connections at once httpx's own overhead shows up
    in the latencies.
    """
    result = FloodResult()
    go = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=count)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(base, connector=connector, timeout=client_timeout) as client:

        async def one(i: int) -> None:
            await go.wait()
            started = time.perf_counter()
            body = {"fullname": f"User {i}", "password": f"pw-{i}"}
            try:
                async with client.put(f"/user/{prefix}-{i}", json=body) as response:
                    await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors[type(exc).__name__] += 1
                return
            status = response.status
            result.statuses[status] += 1
            result.latencies.setdefault(status, []).append(time.perf_counter() - started)
            if status in (429, 503) and "Retry-After" not in response.headers:
                result.missing_retry_after += 1

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0.1)  # every task at the start line
        started = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - started
    return result


async def main(count: int, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        async with usersvc_on_postgres(Path(tmp), env) as (usersvc, postgres, base):
            assert usersvc.pid is not None
            before = peak_rss_bytes(usersvc.pid)
            result = await flood(base, count)
            peak = peak_rss_bytes(usersvc.pid)
            said = json.loads(
                next(
                    line
                    for line in usersvc.log_path.read_text().splitlines()
                    if '"usersvc started"' in line
                )
            )
            bindir = postgres.bindir
    print("usersvc sign-up flood")
    print(f"machine: {machine()}")
    print(
        f"setup: 1 usersvc process (uvicorn, pool 10) with {said['hash_concurrency']} hashing "
        f"slot(s), at most {said['hash_queue']} waiting and an expected wait of at most "
        f"{said['hash_wait']} s, refusals answered after {said['hash_refusal_delay']} s "
        f"(defaults: the CPU quota less one, 64 per slot, 2 s, 0.5 s; one hash measured"
        f" {said['hash_seconds'] * 1000:.0f} ms at start) + PostgreSQL {bindir}; "
        f"{count} connections from this process "
        "(aiohttp), one PUT /user/<new> each, all released at once; load average after: "
        + load_average()
    )
    print(f"answers: {dict(sorted(result.statuses.items()))}  errors: {dict(result.errors)}")
    print(f"503/429 without Retry-After: {result.missing_retry_after}")
    for status in sorted(result.latencies):
        print(
            f"  {status}: p50 {result.quantile(0.5, status) * 1000:.0f} ms   "
            f"p99 {result.quantile(0.99, status) * 1000:.0f} ms   "
            f"max {max(result.latencies[status]) * 1000:.0f} ms"
        )
    print(
        f"all answers: p99 {result.quantile(0.99) * 1000:.0f} ms; flood over in "
        f"{result.seconds:.2f} s"
    )
    print(f"usersvc peak RSS: {peak / 2**20:.0f} MiB (before the flood: {before / 2**20:.0f} MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="concurrent PUTs")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for usersvc (repeatable)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.count, dict(item.split("=", 1) for item in args.env)))
