"""xDS at fleet scale: thousands of ADS streams against one sds process.

sds runs as its own process (``python -m sds``, pinned to CPU 0); the streams come from
bench/xds_fleet_client.py processes (pinned to CPU 1), 2,000 streams each, 100 per TCP
connection. Every stream subscribes to ``svc-(i % services)`` and, in the fleet scenarios, to
``shared``, and ACKs every response at once. Changes go in through sds's registration API,
as a registering service would make them.

Scenarios (targets from issue 11; ``--scenarios fleet floor churn``):

1. fleet: 10,000 streams, 100 services: time until every stream got its first response
   (target: within 60 s), sds RSS and KB per stream (target: RSS <= 1 GB).
2. one service (1 % of the streams subscribe to it) changes, 20 times: time until its
   subscribers received the push (each ACKs on receipt; target 200 ms), sds CPU per change
   (target <= 20 ms; idle windows and a change nobody watches are measured alongside),
   streams that received anything else (target: none).
3. the shared service changes: time until all 10,000 received it (target 3 s).
   The gRPC floor: the same fleet, one-service and shared pushes against
   bench/xds_grpc_floor.py, a grpc.aio server that does nothing but write and read, to show
   how much of sds's cost per push is gRPC's own.
4. churn: 1,000 streams on 1,000 services, 100 changes/s for 60 s spread over the services:
   per change, the time until its subscriber received it (target p99 <= 100 ms), and sds
   CPU (target: below one core).

Times are from just before the registration request is sent to the receipt at the client
(monotonic clock, shared by all processes). Run: ``.venv/bin/python bench/xds_fleet.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from signal import SIGUSR1, SIGUSR2
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LOAD_CPUS, SERVER_CPUS, machine, pin
from envoymesh.ports import free_port

HERE = Path(__file__).resolve().parent
PER_PROCESS = 2_000
ROUNDS = 20  # one-service changes measured (CPU is summed over them)
WINDOW = 0.3  # seconds of sds CPU counted per change
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


class Sds:
    """The sds process: its ports, CPU time and memory."""

    def __init__(self, proc: asyncio.subprocess.Process, http: int, grpc: int, token: str):
        self.proc = proc
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http}",
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
        self.target = f"127.0.0.1:{grpc}"

    def cpu_seconds(self) -> float:
        return cpu_of(self.proc.pid)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    async def register(self, service: str, host: int) -> None:
        answer = await self.http.post(
            f"/v1/registration/{service}",
            json={"ip": f"10.{host // 65536 % 256}.{host // 256 % 256}.{host % 256}", "port": 80},
        )
        answer.raise_for_status()


@contextlib.asynccontextmanager
async def running_sds(debounce: float, **env_extra: str) -> AsyncIterator[Sds]:
    """An sds process on free loopback ports, pinned to SERVER_CPUS; ``env_extra`` adds
    ``SDS_*`` settings."""
    http, grpc, token = free_port(), free_port(), secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "SDS_HTTP_HOST": "127.0.0.1",
        "SDS_HTTP_PORT": str(http),
        "SDS_GRPC_HOST": "127.0.0.1",
        "SDS_GRPC_PORT": str(grpc),
        "SDS_REGISTRATION_WARMUP": "0",
        "SDS_WRITE_TOKEN": token,
        "SDS_MAX_STREAMS_PER_PEER": "100000",
        "SDS_XDS_DEBOUNCE": str(debounce),
        "SDS_LOG_LEVEL": "warning",
        "SDS_MAX_HOSTS_PER_SERVICE": "100000",
        **env_extra,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sds", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    pin(proc.pid, SERVER_CPUS)
    sds = Sds(proc, http, grpc, token)
    try:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await sds.http.get("/healthcheck")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        yield sds
    finally:
        await sds.http.aclose()
        proc.terminate()
        await proc.wait()


class Fleet:
    """The client processes."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, target: str, streams: int, services: int, shared: str) -> Fleet:
        procs = []
        for first in range(0, streams, PER_PROCESS):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "xds_fleet_client.py"),
                target,
                str(first),
                str(min(PER_PROCESS, streams - first)),
                str(services),
                *(["--shared", shared] if shared else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=64 * 1024 * 1024,
            )
            pin(proc.pid, LOAD_CPUS)
            procs.append(proc)
        return cls(procs)

    async def ask(self, command: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Send ``command`` to every client process at once, then collect their answers."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{command}\n".encode())
            await proc.stdin.drain()
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            answers.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), timeout)))
        return answers

    async def served(self) -> tuple[int, dict[str, int]]:
        served, failed = 0, {}
        for answer in await self.ask("status"):
            served += answer["served"]
            for code, n in answer["failed"].items():
                failed[code] = failed.get(code, 0) + n
        return served, failed

    def cpu_seconds(self) -> float:
        return sum(cpu_of(proc.pid) for proc in self.procs)

    async def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            await proc.wait()


async def wait_received(fleet: Fleet, name: str, timeout: float) -> list[dict[str, Any]]:
    """Reports once every subscriber of ``name`` received a response since the mark.

    The clients answer when that happened: polling them while they receive would take CPU
    from the core they share and lengthen what is measured.
    """
    return await fleet.ask(f"await {name} {timeout}", timeout + 10)


def delays(reports: list[dict[str, Any]], started: float) -> list[float]:
    return [t - started for r in reports for t in r["times"]]


def line(label: str, values: list[float]) -> str:
    return (
        f"{label:<44} p50 {percentile(values, 0.5) * 1000:8.1f} ms   "
        f"p99 {percentile(values, 0.99) * 1000:8.1f} ms   max {max(values) * 1000:8.1f} ms"
        f"   (n={len(values)})"
    )


async def all_served(fleet: Fleet, streams: int) -> tuple[int, dict[str, int], float]:
    """Wait until every stream got its first response or failed; (served, failed, seconds)."""
    started = time.monotonic()
    async with asyncio.timeout(120):
        while True:
            served, failed = await fleet.served()
            if served + sum(failed.values()) >= streams:
                return served, failed, time.monotonic() - started
            await asyncio.sleep(0.25)


async def cpu_per_change(
    cpu: Callable[[], float], change: Callable[[int], Awaitable[None]]
) -> float:
    """Mean CPU milliseconds of ROUNDS windows of WINDOW seconds, each starting with a change.

    /proc counts CPU in 10 ms ticks, so it is summed over all the rounds.
    """
    spent = 0.0
    for round_ in range(ROUNDS):
        before, started = cpu(), time.monotonic()
        await change(round_)
        await asyncio.sleep(max(0.0, started + WINDOW - time.monotonic()))
        spent += cpu() - before
    return spent * 1000 / ROUNDS


async def nothing(round_: int) -> None:
    """No change: the idle windows."""


class OneService:
    """Changes to ``svc-7`` (1 % of the streams subscribe): delays, and what else was sent."""

    def __init__(self, fleet: Fleet, subscribers: int, push: Callable[[int], Awaitable[None]]):
        self.fleet, self.subscribers, self.push = fleet, subscribers, push
        self.delays: list[float] = []
        self.others = 0

    async def change(self, round_: int) -> None:
        await self.fleet.ask("mark")
        changed = time.monotonic()
        await self.push(round_)
        self.delays.extend(delays(await wait_received(self.fleet, "svc-7", 30), changed))
        await asyncio.sleep(max(0.0, changed + WINDOW - 0.05 - time.monotonic()))
        heard = sum(r["streams"] for r in await self.fleet.ask("report"))
        self.others += heard - self.subscribers


async def shared_rounds(
    fleet: Fleet, streams: int, cpu: Callable[[], float], push: Callable[[int], Awaitable[None]]
) -> float:
    """Three changes every stream subscribes to; the slowest round's time until all heard."""
    slowest = 0.0
    for round_ in range(3):
        await fleet.ask("mark")
        server_cpu, clients_cpu = cpu(), fleet.cpu_seconds()
        changed = time.monotonic()
        await push(round_)
        reports = await wait_received(fleet, "shared", 60)
        server_cpu = (cpu() - server_cpu) * 1000
        clients_cpu = (fleet.cpu_seconds() - clients_cpu) * 1000
        slowest = max(slowest, *delays(reports, changed))
        print(
            line(f"  shared service, round {round_ + 1}: all {streams}", delays(reports, changed))
        )
        print(
            f"    CPU until all received: server {server_cpu:.0f} ms, the client processes "
            f"(sharing CPU {sorted(LOAD_CPUS)}) {clients_cpu:.0f} ms"
        )
        await asyncio.sleep(1)
    return slowest


async def fleet_scenarios(streams: int, services: int, debounce: float) -> dict[str, bool]:
    met: dict[str, bool] = {}
    subscribers = streams // services
    async with running_sds(debounce) as sds:
        for i in range(services):
            await sds.register(f"svc-{i}", i)
        await sds.register("shared", 1_000_000)
        rss_before = sds.rss_mb()
        fleet = await Fleet.start(sds.target, streams, services, "shared")
        try:
            served, failed, elapsed = await all_served(fleet, streams)
            print(
                f"sds: {streams} ADS streams from {len(fleet.procs)} processes: "
                f"{served} served in {elapsed:.1f} s, failed {failed or 0}"
            )
            met["fleet served within 60 s"] = served == streams and elapsed <= 60
            await asyncio.sleep(2)  # let ACKs and allocations settle
            rss = sds.rss_mb()
            per_stream = (rss - rss_before) * 1024 / streams
            print(
                f"  memory: sds RSS {rss_before:.0f} MB before the streams, {rss:.0f} MB with "
                f"{streams} ({per_stream:.1f} KB per stream)"
            )
            met["RSS <= 1 GB"] = rss <= 1024

            # The same windows with no change (idle) and with a change no stream watches (the
            # registration request and registry alone) tell the push path's own cost apart.
            async def unwatched(round_: int) -> None:
                await sds.register("unwatched", 4_000_000 + round_)

            async def one_change(round_: int) -> None:
                await sds.register("svc-7", 2_000_000 + round_)

            one = OneService(fleet, subscribers, one_change)
            idle_ms = await cpu_per_change(sds.cpu_seconds, nothing)
            unwatched_ms = await cpu_per_change(sds.cpu_seconds, unwatched) - idle_ms
            total_ms = await cpu_per_change(sds.cpu_seconds, one.change) - idle_ms
            push_ms = total_ms - unwatched_ms
            print(line(f"  one service ({subscribers} subscribers), {ROUNDS} rounds", one.delays))
            print(
                f"    sds CPU per change (mean of {ROUNDS}, {WINDOW * 1000:.0f} ms windows, idle "
                f"{idle_ms:.1f} ms per window taken off): {total_ms:.1f} ms in all, of which "
                f"{unwatched_ms:.1f} ms is the registration request and registry (the same "
                f"change to a service nobody watches) and {push_ms:.1f} ms the push path "
                f"({push_ms * 1000 / subscribers:.0f} us per subscriber, push and ACK); "
                f"streams sent anything else: {one.others}"
            )
            met["one service p99 <= 200 ms"] = percentile(one.delays, 0.99) <= 0.2
            met["one service sds CPU <= 20 ms"] = push_ms <= 20
            met["nothing to other streams"] = one.others == 0

            async def shared_change(round_: int) -> None:
                await sds.register("shared", 3_000_000 + round_)

            slowest = await shared_rounds(fleet, streams, sds.cpu_seconds, shared_change)
            met["shared: all within 3 s"] = slowest <= 3.0
            served, failed = await fleet.served()
            print(f"  after the changes: {served} served, failed {failed or 0}")
        finally:
            await fleet.stop()
    return met


async def grpc_floor(streams: int, services: int) -> None:
    """The same fleet and pushes against bench/xds_grpc_floor.py: what gRPC alone costs."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "xds_grpc_floor.py"), str(port), stdout=asyncio.subprocess.PIPE
    )
    pin(proc.pid, SERVER_CPUS)
    fleet = None
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 30)
        fleet = await Fleet.start(f"127.0.0.1:{port}", streams, services, "shared")
        served, failed, elapsed = await all_served(fleet, streams)
        print(
            f"gRPC floor (bench/xds_grpc_floor.py: grpc.aio alone, same fleet, same pushes): "
            f"{served} served in {elapsed:.1f} s, failed {failed or 0}"
        )
        await asyncio.sleep(2)

        def cpu() -> float:
            return cpu_of(proc.pid)

        async def signal_(number: int) -> None:
            proc.send_signal(number)

        async def one_change(round_: int) -> None:
            await signal_(SIGUSR1)

        async def shared_change(round_: int) -> None:
            await signal_(SIGUSR2)

        one = OneService(fleet, streams // services, one_change)
        idle_ms = await cpu_per_change(cpu, nothing)
        push_ms = await cpu_per_change(cpu, one.change) - idle_ms
        print(
            line(f"  one service ({streams // services} subscribers), {ROUNDS} rounds", one.delays)
        )
        print(
            f"    server CPU per change (mean of {ROUNDS}, idle taken off): {push_ms:.1f} ms "
            f"({push_ms * 1000 / (streams // services):.0f} us per subscriber, push and ACK)"
        )
        await shared_rounds(fleet, streams, cpu, shared_change)
    finally:
        if fleet is not None:
            await fleet.stop()
        proc.kill()
        await proc.wait()


async def churn(streams: int, rate: float, seconds: float, debounce: float) -> dict[str, bool]:
    services = streams
    async with running_sds(debounce) as sds:
        for i in range(services):
            await sds.register(f"svc-{i}", i)
        fleet = await Fleet.start(sds.target, streams, services, "")
        try:
            async with asyncio.timeout(60):
                while (await fleet.served())[0] < streams:
                    await asyncio.sleep(0.25)
            await fleet.ask("mark")
            changes: list[tuple[int, float]] = []
            cpu = sds.cpu_seconds()
            started = time.monotonic()
            host = 10_000_000
            while time.monotonic() - started < seconds:
                service = random.randrange(services)
                changes.append((service, time.monotonic()))
                host += 1
                await sds.register(f"svc-{service}", host)
                next_at = started + len(changes) / rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.sleep(1)
            cpu_share = (sds.cpu_seconds() - cpu) / (time.monotonic() - started)
            received: dict[int, list[float]] = {}
            for answer in await fleet.ask("report-all"):
                for index, times in answer["times"].items():
                    received[int(index)] = times
            waits = []
            missing = 0
            for service, at in changes:
                later = [t for t in received.get(service, []) if t >= at]
                if later:
                    waits.append(later[0] - at)
                else:
                    missing += 1
            print(
                f"churn: {len(changes)} changes in {seconds:.0f} s "
                f"({len(changes) / seconds:.0f}/s) over {services} services, {streams} streams"
            )
            print(line("  change -> subscriber received", waits))
            print(f"  changes never received: {missing}; sds CPU {cpu_share * 100:.0f} % of a core")
            return {
                "churn p99 <= 100 ms": percentile(waits, 0.99) <= 0.1 and not missing,
                "churn CPU below one core": cpu_share < 1.0,
            }
        finally:
            await fleet.stop()


async def main(args: argparse.Namespace) -> int:
    print("xDS fleet benchmark")
    print(f"machine: {machine()}")
    print(
        f"setup: sds as its own process on CPU {sorted(SERVER_CPUS)} (debounce "
        f"{args.debounce * 1000:.0f} ms), clients on CPU {sorted(LOAD_CPUS)} in processes of "
        f"{PER_PROCESS} streams, 100 streams per TCP connection; changes via POST "
        "/v1/registration; times to receipt at the client, which ACKs at once"
    )
    met: dict[str, bool] = {}
    if "fleet" in args.scenarios:
        met |= await fleet_scenarios(args.streams, args.services, args.debounce)
    if "floor" in args.scenarios:
        await grpc_floor(args.streams, args.services)
    if "churn" in args.scenarios:
        met |= await churn(args.churn_streams, args.churn_rate, args.churn_seconds, args.debounce)
    for name, ok in met.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--churn-streams", type=int, default=1_000)
    parser.add_argument("--churn-rate", type=float, default=100.0)
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--debounce", type=float, default=0.01)
    parser.add_argument("--scenarios", nargs="+", default=["fleet", "floor", "churn"])
    sys.exit(asyncio.run(main(parser.parse_args())))
