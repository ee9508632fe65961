"""Proxyless gRPC (issue 18): endpoint changes reaching 200 xDS clients, and GetUser without Envoy.

1. convergence: an sds process (pinned to CPU 0) serves 200 grpcio client processes
   (bench/proxyless_grpc_client.py, one xDS client each, on CPU 1), each calling
   ``xds:///svc-(i % 20)``; 20 services, each with one registered backend at a time
   (bench/proxyless_grpc_backend.py: grpc.aio servers on loopback, 10 per process, each
   answering with its own name). Every round changes one service through the registration
   API: a new host is registered (time until each of the service's clients sends a call that
   the new host answers), then the old one is deregistered (time until each sends its first
   call after the last one the old host answered). Those clients call every few milliseconds
   during the round, the others at a modest pace throughout, so the call spacing (printed) is
   the resolution. Target p99 <= 200 ms. Also printed: sds CPU per change, how long the fleet
   took to start, and the clients' memory.
2. getuser: meshctl's local mesh (PostgreSQL, sds, 3 usersvc replicas with sidecars, the edge
   Envoy): GetUser over proxyless gRPC (``xds:///usersvc-grpc`` straight to the replicas'
   gRPC ports, bench/proxyless_grpc_load.py) against GET /user/<name> over HTTP through the
   edge Envoy (bench/common.py's run_load), at the same concurrency: requests/s and p99 of
   each, and their ratio.

Times come from one monotonic clock, which every process on the machine shares.
Run: ``.venv/bin/python bench/proxyless_grpc.py`` (``--scenarios convergence getuser``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SERVER_CPUS, machine, row, run_load
from bench.xds_fleet import Sds, percentile, running_sds
from meshctl.mesh import Mesh, MeshSettings, free_mesh_ports

HERE = Path(__file__).resolve().parent
BACKENDS_PER_PROCESS = 10
STARTUP_DEADLINE = 240.0
ANSWER_DEADLINE = 30.0
SETTLE = 0.3  # seconds of calls with none to a removed host before it counts as gone


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ", ".join(f"{n:.2f}" for n in os.getloadavg())


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident and proportional set size (shared pages divided among their users) in MB."""
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per CPU, (busy, total) clock ticks since boot, from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields]
            times[name] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy(before: dict[str, tuple[int, int]]) -> str:
    """How busy each CPU was since ``before``, in percent."""
    now = cpu_times()
    return ", ".join(
        f"{name} {(now[name][0] - b[0]) * 100 / max(1, now[name][1] - b[1]):.0f} %"
        for name, b in before.items()
    )


def spread(values: list[float]) -> str:
    """p50, p99 and max of seconds, in ms."""
    return (
        f"p50 {percentile(values, 0.5) * 1000:7.1f} ms   p99 {percentile(values, 0.99) * 1000:7.1f}"
        f" ms   max {max(values) * 1000:7.1f} ms   (n={len(values)})"
    )


class Client:
    """One client process and the line protocol of bench/proxyless_grpc_client.py."""

    def __init__(self, proc: asyncio.subprocess.Process, service: str) -> None:
        self.proc = proc
        self.service = service

    async def ask(self, command: str, deadline: float = ANSWER_DEADLINE) -> Any:
        """Send one command; its answer (None when the client's own deadline passed)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), deadline + 10))


async def ask_all(clients: list[Client], command: str, deadline: float = ANSWER_DEADLINE) -> Any:
    """The answers of ``clients`` to ``command``, sent to all at once."""
    return await asyncio.gather(*(client.ask(command, deadline) for client in clients))


async def start_backends(
    names: list[str],
) -> tuple[list[asyncio.subprocess.Process], dict[str, int]]:
    """The backend processes, and the port of every name."""
    procs: list[asyncio.subprocess.Process] = []
    ports: dict[str, int] = {}
    for first in range(0, len(names), BACKENDS_PER_PROCESS):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "proxyless_grpc_backend.py"),
            *names[first : first + BACKENDS_PER_PROCESS],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        ports |= json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
    return procs, ports


async def grpc_bootstrap(target: str) -> dict[str, Any]:
    """What ``sds bootstrap --grpc`` prints for sds's gRPC address ``target``."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sds", "bootstrap", "--grpc", "--xds-server", target),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        raise RuntimeError("sds bootstrap --grpc failed")
    document: dict[str, Any] = json.loads(out)
    return document


async def start_clients(
    bootstrap: dict[str, Any], count: int, services: int, interval: float
) -> list[Client]:
    """``count`` client processes, client i on ``svc-(i % services)`` with node id bench-i."""
    clients = []
    for i in range(count):
        own = {**bootstrap, "node": {**bootstrap["node"], "id": f"bench-client-{i}"}}
        service = f"svc-{i % services}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "proxyless_grpc_client.py"),
            service,
            "--interval",
            str(interval),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(own)},
        )
        clients.append(Client(proc, service))
    return clients


async def stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    """Close every process's stdin (each exits on that), then make sure each has gone."""
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def failures(stats: list[dict[str, Any]]) -> dict[str, int]:
    """Failed calls by status code, summed over the clients' ``stats`` answers."""
    failed: dict[str, int] = {}
    for answer in stats:
        for code, n in answer["failed"].items():
            failed[code] = failed.get(code, 0) + n
    return failed


class Rounds:
    """The endpoint changes, one service per round, and what each cost."""

    def __init__(self, sds: Sds, clients: list[Client], ports: dict[str, int]) -> None:
        self.sds, self.clients, self.ports = sds, clients, ports
        self.added: list[float] = []
        self.removed: list[float] = []
        self.gaps: list[float] = []
        self.missing = 0
        self.cpu = 0.0
        self.changes = 0

    async def change(self, method: str, service: str, name: str) -> float:
        """Register (POST) or deregister (DELETE) backend ``name``; when it was sent."""
        port = self.ports[name]
        sent = time.monotonic()
        if method == "POST":
            answer = await self.sds.http.post(
                f"/v1/registration/{service}", json={"ip": "127.0.0.1", "port": port}
            )
        else:
            answer = await self.sds.http.delete(f"/v1/registration/{service}/127.0.0.1/{port}")
        answer.raise_for_status()
        self.changes += 1
        return sent

    async def one(self, service: str, old: str, new: str, fast: float, slow: float) -> None:
        """Replace ``old`` by ``new`` in ``service``: an add, then a removal, each timed."""
        affected = [c for c in self.clients if c.service == service]
        await ask_all(affected, f"pace {fast}")
        await asyncio.sleep(0.2)
        cpu = self.sds.cpu_seconds()
        sent = await self.change("POST", service, new)
        for answer in await ask_all(affected, f"added {new} {sent} {ANSWER_DEADLINE}"):
            if answer is None:
                self.missing += 1
            else:
                self.added.append(answer["t"] - sent)
                self.gaps.append(answer["gap"])
        sent = await self.change("DELETE", service, old)
        command = f"removed {old} {sent} {SETTLE} {ANSWER_DEADLINE}"
        for answer in await ask_all(affected, command):
            if answer is None:
                self.missing += 1
            else:
                self.removed.append(answer["t"] - sent)
        self.cpu += self.sds.cpu_seconds() - cpu
        await ask_all(affected, f"pace {slow}")


async def convergence(args: argparse.Namespace) -> dict[str, bool]:
    """Scenario 1; the targets met."""
    services, count = args.services, args.clients
    names = [f"svc-{s}-{side}" for s in range(services) for side in "ab"]
    env = {"SDS_ALLOW_LOOPBACK": "true", "SDS_HOST_TTL": "86400"}
    async with running_sds(args.debounce, **env) as sds:
        backends, ports = await start_backends(names)
        clients: list[Client] = []
        try:
            for s in range(services):
                await sds.http.post(
                    f"/v1/registration/svc-{s}",
                    json={"ip": "127.0.0.1", "port": ports[f"svc-{s}-a"]},
                )
            bootstrap = await grpc_bootstrap(sds.target)
            sds_cpu, rss_before = sds.cpu_seconds(), sds.rss_mb()
            started = time.monotonic()
            clients = await start_clients(bootstrap, count, services, args.interval)
            answers = await ask_all(clients, f"ready {STARTUP_DEADLINE}", STARTUP_DEADLINE)
            ready = sum(a is not None for a in answers)
            elapsed = time.monotonic() - started
            startup_cpu = sds.cpu_seconds() - sds_cpu
            print(
                f"fleet: {ready} of {count} clients made a successful call {elapsed:.1f} s "
                f"after the first was started (sds CPU meanwhile {startup_cpu:.2f} s; sds RSS "
                f"{rss_before:.0f} MB before, {sds.rss_mb():.0f} MB after)"
            )
            if ready < count:
                raise RuntimeError(f"only {ready} of {count} clients ever made a call")
            await asyncio.sleep(2)
            memory = [memory_mb(c.proc.pid) for c in clients]
            rss, pss = sum(m[0] for m in memory), sum(m[1] for m in memory)
            print(
                f"  client memory: RSS {rss / count:.1f} MB per process ({rss / 1024:.2f} GB in "
                f"all, shared pages counted in each), PSS {pss / count:.1f} MB per process "
                f"({pss / 1024:.2f} GB in all)"
            )
            idle, machine_idle = sds.cpu_seconds(), cpu_times()
            await asyncio.sleep(3)
            idle_rate = (sds.cpu_seconds() - idle) / 3
            print(f"  idle (no change, background calls only), busy: {busy(machine_idle)}")
            before_rounds = await ask_all(clients, "stats")
            machine_rounds = cpu_times()
            rounds = Rounds(sds, clients, ports)
            current = dict.fromkeys(range(services), "a")
            began = time.monotonic()
            for round_ in range(args.rounds):
                s = round_ % services
                old, new = current[s], "b" if current[s] == "a" else "a"
                await rounds.one(
                    f"svc-{s}", f"svc-{s}-{old}", f"svc-{s}-{new}", args.fast, args.interval
                )
                current[s] = new
            took = time.monotonic() - began
            machine_busy = busy(machine_rounds)
            at_start = failures(before_rounds)
            after = await ask_all(clients, "stats")
            calls = sum(a["calls"] - b["calls"] for a, b in zip(after, before_rounds, strict=True))
            failed = {
                code: n - at_start.get(code, 0)
                for code, n in failures(after).items()
                if n > at_start.get(code, 0)
            }
            affected = count // services
            print(
                f"{args.rounds} rounds, one service ({affected} clients) each: register a new "
                "host, then deregister the old one"
            )
            print(f"  register -> every client's first call to it   {spread(rounds.added)}")
            print(f"  deregister -> first call after its last one    {spread(rounds.removed)}")
            both = rounds.added + rounds.removed
            print(f"  both                                           {spread(both)}")
            print(
                f"  call spacing of the affected clients before their first call to the new "
                f"host: median {statistics.median(rounds.gaps) * 1000:.1f} ms, max "
                f"{max(rounds.gaps) * 1000:.1f} ms (the resolution of these times); "
                f"answers missing: {rounds.missing}"
            )
            per_change = (rounds.cpu - idle_rate * took) / rounds.changes * 1000
            print(
                f"  sds CPU: {per_change:.1f} ms per change ({rounds.changes} changes; from "
                f"before the request until every affected client had converged, idle "
                f"{idle_rate * 1000:.1f} ms/s taken off), {rounds.cpu / took * 100:.1f} % of a "
                f"core over the {took:.0f} s of rounds"
            )
            print(f"  busy during the rounds: {machine_busy}")
            print(
                f"  calls by all clients during the rounds: {calls}, failed: {failed or 0}; "
                f"during start-up and idle: {at_start or 0} failed"
            )
            return {
                "convergence p99 <= 200 ms": percentile(both, 0.99) <= 0.2,
                "every client converged every time": rounds.missing == 0,
                "no call failed during the rounds": not failed,
            }
        finally:
            await stop_all([c.proc for c in clients])
            await stop_all(backends)


def children_cpu() -> float:
    """CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def grpc_load(mesh: Mesh, user: str, concurrency: int, duration: float) -> dict[str, Any]:
    """bench/proxyless_grpc_load.py against the mesh; its stats."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "proxyless_grpc_load.py"),
        "usersvc-grpc",
        user,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(mesh.grpc_bootstrap_file)},
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("the gRPC load generator failed")
    result: dict[str, Any] = json.loads(out)
    result["tool"] = "grpc.aio"
    return result


async def getuser(args: argparse.Namespace) -> dict[str, bool]:
    """Scenario 2; the checks met."""
    concurrency, duration = args.concurrency, args.duration
    with tempfile.TemporaryDirectory(prefix="bench-proxyless-") as tmp:
        ports: dict[str, Any] = free_mesh_ports(10)
        mesh = Mesh(MeshSettings(run_dir=Path(tmp), replicas=3, say=lambda _: None, **ports))
        await mesh.start()
        try:
            async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as client:
                made = await client.put(
                    "/user/alice", json={"fullname": "Alice", "password": "wonderland"}
                )
                made.raise_for_status()
            print(
                f"getuser: meshctl's local mesh (PostgreSQL, sds, 3 usersvc replicas, each 1 "
                f"uvicorn worker with its gRPC server in the same process, behind a sidecar "
                f"Envoy; the edge Envoy, 1 worker); user alice created through the edge; "
                f"{concurrency} requests in flight, {duration:.0f} s per run after 1 s of "
                "warm-up; load from a separate process; everything shares the 2 cores"
            )
            cpu = children_cpu()
            proxyless = await grpc_load(mesh, "alice", concurrency, duration)
            proxyless_cpu = (children_cpu() - cpu) / (duration + 1)
            cpu = children_cpu()
            edge = await run_load(
                f"{mesh.edge_url}/user/alice", concurrency=concurrency, duration=duration
            )
            edge_cpu = (children_cpu() - cpu) / (duration + 1)
            print(row(f"GetUser over xds:///usersvc-grpc ({concurrency} in flight)", proxyless))
            print(row(f"GET /user/alice via edge -> sidecar ({concurrency} conns)", edge))
            print(
                f"  load generator CPU: gRPC {proxyless_cpu * 100:.0f} % of a core, HTTP "
                f"{edge_cpu * 100:.0f} % of a core; gRPC calls per replica "
                f"{sorted(proxyless['replicas'].values())}, errors {proxyless['error_codes']}"
            )
            print(
                f"proxyless/edge: {proxyless['rps'] / edge['rps']:.2f}x the requests/s, "
                f"p99 {proxyless['p99_ms']} ms against {edge['p99_ms']} ms "
                f"({proxyless['p99_ms'] / edge['p99_ms']:.2f}x)"
            )
            return {
                "GetUser: no errors on either path": proxyless["errors"] == edge["errors"] == 0,
                "GetUser: every replica answered over gRPC": len(proxyless["replicas"]) == 3,
            }
        finally:
            await mesh.stop()


async def main(args: argparse.Namespace) -> int:
    """Run the scenarios asked for; 0 when every target was met."""
    print("proxyless gRPC benchmark")
    print(f"machine: {machine()}; grpcio {grpc.__version__}; load average {load_average()}")
    met: dict[str, bool] = {}
    if "convergence" in args.scenarios:
        print(
            f"convergence setup: sds as its own process on CPU {sorted(SERVER_CPUS)} (xDS "
            f"debounce {args.debounce * 1000:.0f} ms); {args.clients} grpcio client processes "
            f"and {-(-args.services * 2 // BACKENDS_PER_PROCESS)} backend processes "
            f"({args.services * 2} grpc.aio servers) on either CPU; "
            f"{args.services} services; clients call every {args.interval * 1000:.0f} ms, those "
            f"of the changing service every {args.fast * 1000:.0f} ms during its round; changes "
            "through POST and DELETE /v1/registration"
        )
        met |= await convergence(args)
    if "getuser" in args.scenarios:
        met |= await getuser(args)
    for name, ok in met.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    print(f"load average after: {load_average()}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between calls")
    parser.add_argument(
        "--fast", type=float, default=0.01, help="seconds between calls while changing"
    )
    parser.add_argument("--debounce", type=float, default=0.01)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--scenarios", nargs="+", default=["convergence", "getuser"])
    sys.exit(asyncio.run(main(parser.parse_args())))
