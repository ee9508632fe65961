"""Thousands of ADS streams from separate client processes: all served, per-name fan-out.

Past roughly 1,000-2,000 streams connecting at once, gRPC core used to refuse calls (its
pending-call queue limit); this test holds 3,000 and asserts every one is served. Counts only,
no timings (the deadlines are generous bounds on the wait).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import ROOT, RunningSds, put

pytestmark = pytest.mark.slow

STREAMS = 3_000
PER_PROCESS = 1_000
SERVICES = 100


class FleetProcess:
    """One bench/xds_fleet_client.py process, asked for its counts over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        answer: dict[str, Any] = json.loads(line)
        return answer


@pytest.fixture
async def fleet_sds(start_sds: Callable[..., Any]) -> RunningSds:
    sds: RunningSds = await start_sds(xds_debounce=0.01, max_streams_per_peer=STREAMS)
    for i in range(SERVICES):
        put(sds, f"svc-{i}", f"10.0.{i}.1:80")
    put(sds, "shared", "10.9.0.1:80")
    return sds


@pytest.fixture
async def fleet(fleet_sds: RunningSds) -> AsyncIterator[list[FleetProcess]]:
    procs = [
        FleetProcess(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "bench" / "xds_fleet_client.py"),
                fleet_sds.grpc_target,
                str(first),
                str(PER_PROCESS),
                str(SERVICES),
                "--shared",
                "shared",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
        for first in range(0, STREAMS, PER_PROCESS)
    ]
    try:
        yield procs
    finally:
        for fleet_process in procs:
            if fleet_process.proc.returncode is None:
                fleet_process.proc.kill()
            await fleet_process.proc.wait()


async def totals(fleet: list[FleetProcess], command: str) -> list[dict[str, Any]]:
    return [await p.ask(command) for p in fleet]


async def test_three_thousand_streams_are_all_served_and_woken_per_name(
    fleet_sds: RunningSds, fleet: list[FleetProcess]
) -> None:
    async with asyncio.timeout(120):
        while True:
            status = await totals(fleet, "status")
            assert [s["failed"] for s in status] == [{}, {}, {}]
            if sum(s["served"] for s in status) == STREAMS:
                break
            await asyncio.sleep(0.5)
    async with asyncio.timeout(60):
        while sum(p.state == "SYNCED" for p in fleet_sds.server.proxies.all()) < STREAMS:
            await asyncio.sleep(0.2)

    # One service: only its subscribers (1 % of the fleet) hear about it.
    await totals(fleet, "mark")
    put(fleet_sds, "svc-7", "10.0.7.1:80", "10.0.7.2:80")
    heard = await totals(fleet, "await svc-7 25")  # each process answers once all of its heard
    assert sum(r["streams"] for r in heard) == STREAMS // SERVICES
    await asyncio.sleep(0.5)  # room for a wrong push to arrive; the count must not move
    reports = await totals(fleet, "report")
    assert sum(r["streams"] for r in reports) == STREAMS // SERVICES
    assert max(r["max_responses_per_stream"] for r in reports) == 1

    # The shared service: every stream hears about it, once.
    await totals(fleet, "mark")
    put(fleet_sds, "shared", "10.9.0.1:80", "10.9.0.2:80")
    reports = await totals(fleet, "await shared 25")
    assert sum(r["streams"] for r in reports) == STREAMS
    assert max(r["max_responses_per_stream"] for r in reports) == 1
    status = await totals(fleet, "status")
    assert [s["failed"] for s in status] == [{}, {}, {}]
