"""usersvc goodput while it sheds sign-ups: completed sign-ups/s against the one-client ceiling.

Starts a private PostgreSQL and one usersvc process (default settings), both pinned to CPU 0;
the load comes from separate processes pinned to CPU 1. First the ceiling: one connection
sending PUTs of new names back to back. Then 16, 64 and 128 connections, each sending as fast
as it is answered and ignoring Retry-After, 15 s each; during the 128-connection flood another
process GETs a user every 20 ms. Prints completed sign-ups/s and their share of the ceiling
(and of the best rate of a run with no refusal: one connection leaves the hasher idle between
its requests), refusals, p50/p99 of the completed ones, usersvc's peak RSS, and the CPU the
load generators used (near 100 % they, not usersvc, would be the limit).

Last, what one refusal costs: the hashing queue is filled with PUTs whose bodies never come, so
every further PUT is refused, and the event loop's CPU time during a 128-connection flood of
those is divided by the refusals.
Run: ``.venv/bin/python bench/usersvc_admission.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LOAD_CPUS, SERVER_CPUS, machine, usersvc_on_postgres
from bench.usersvc_flood import load_average, peak_rss_bytes

TICKS = os.sysconf("SC_CLK_TCK")


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Pin ``pid``, every thread of it and every child process (and theirs); how many tasks."""
    pinned = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)
        pinned += 1
        children = (task / "children").read_text().split()
        pinned += sum(pin_tree(int(child), cpus) for child in children)
    return pinned


def loop_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the process's main thread, its event loop, so far."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank), 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client(base: str, mode: str, connections: int, duration: float, tag: str) -> None:
    """Drive usersvc and print JSON: statuses, and latencies (s) of the 201s (or of GETs)."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    missing_retry_after = 0
    cpu_started = time.process_time()
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + duration

        async def sign_ups(worker: int) -> None:
            nonlocal missing_retry_after
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                body = {"fullname": "Bench", "password": f"pw-{worker}-{n}"}
                started = time.perf_counter()
                async with session.put(f"/user/{tag}-{worker}-{n}", json=body) as response:
                    await response.read()
                statuses[response.status] += 1
                if response.status == 201:
                    latencies.append(time.perf_counter() - started)
                elif response.status == 503 and "Retry-After" not in response.headers:
                    missing_retry_after += 1

        async def reads() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get("/user/reader") as response:
                    await response.read()
                statuses[response.status] += 1
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)

        if mode == "get":
            await reads()
        else:
            await asyncio.gather(*(sign_ups(i) for i in range(connections)))
    json.dump(
        {
            "statuses": statuses,
            "latencies": latencies,
            "missing_retry_after": missing_retry_after,
            "cpu_seconds": time.process_time() - cpu_started,
        },
        sys.stdout,
    )


async def run_client(base: str, mode: str, connections: int, duration: float, tag: str) -> Any:
    """Start one client process on the load CPUs; a task giving its parsed result."""
    argv = [sys.executable, __file__, "--client", mode, "--base", base, "--tag", tag]
    argv += ["--connections", str(connections), "--duration", str(duration)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert proc.pid is not None
    os.sched_setaffinity(proc.pid, LOAD_CPUS)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {argv}")
    return json.loads(out)


async def fill_queue(base: str, count: int) -> list[asyncio.StreamWriter]:
    """``count`` connections, each the head of a PUT whose body never comes: each admitted one
    holds a place in the hashing queue until its connection closes."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    writers = []
    for i in range(count):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"PUT /user/held-{i} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            "content-length: 100\r\n\r\n{".encode()
        )
        await writer.drain()
        writers.append(writer)
    return writers


async def refusal_cost(pid: int, base: str, connections: int, duration: float) -> str:
    """Fill the queue, flood it with refused PUTs, and report the event loop's CPU per refusal."""
    writers = await fill_queue(base, 256)
    try:
        await asyncio.sleep(2)  # the heads beyond the queue have had their refusals
        cpu_before = loop_cpu_seconds(pid)
        puts = await run_client(base, "put", connections, duration, "refused")
        loop_cpu = loop_cpu_seconds(pid) - cpu_before
    finally:
        for writer in writers:
            writer.close()
    statuses = {int(k): v for k, v in puts["statuses"].items()}
    refused = statuses.get(503, 0)
    cost = f"{loop_cpu / refused * 1e6:.0f} µs of event-loop CPU" if refused else "no refusal"
    return (
        f"one refusal (queue held full, {connections} connections, {duration:g} s): {cost}; "
        f"answers {dict(sorted(statuses.items()))}, {refused / duration:.0f} refusals/s, event "
        f"loop {loop_cpu / duration:.0%} of a core, load generator "
        f"{puts['cpu_seconds'] / duration:.0%} of CPU {sorted(LOAD_CPUS)}"
    )


async def main(duration: float, counts: list[int], env: dict[str, str]) -> None:
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp:
        env = {"USERSVC_LOG_LEVEL": "warning", **env}
        async with usersvc_on_postgres(Path(tmp), env) as (usersvc, postgres, base):
            assert usersvc.pid is not None
            assert postgres.pid is not None
            pinned = pin_tree(usersvc.pid, SERVER_CPUS) + pin_tree(postgres.pid, SERVER_CPUS)
            async with aiohttp.ClientSession(base) as session:
                body = {"fullname": "Reader", "password": "pw"}
                async with session.put("/user/reader", json=body) as response:
                    assert response.status == 201
            print("usersvc admission: goodput while shedding sign-ups")
            print(f"machine: {machine()}")
            print(
                f"setup: 1 usersvc process (uvicorn, default settings{' ' + str(env)}) + "
                f"PostgreSQL {postgres.bindir}, {pinned} tasks pinned to CPU "
                f"{sorted(SERVER_CPUS)}; load from separate aiohttp processes on CPU "
                f"{sorted(LOAD_CPUS)}, keep-alive, each connection sends its next PUT "
                f"/user/<new> as soon as it is answered (Retry-After ignored); {duration:g} s "
                f"per run; load average before: {load_before}"
            )
            ceiling = 0.0
            best_unrefused = 0.0
            loop_per_signup = 0.0
            rows: list[str] = []
            for connections in [1, *counts]:
                cpu_before = loop_cpu_seconds(usersvc.pid)
                runs = [run_client(base, "put", connections, duration, f"c{connections}")]
                if connections == max(counts):
                    runs.append(run_client(base, "get", 1, duration, "get"))
                results = await asyncio.gather(*runs)
                loop_cpu = loop_cpu_seconds(usersvc.pid) - cpu_before
                puts = results[0]
                statuses = {int(k): v for k, v in puts["statuses"].items()}
                done, refused = statuses.get(201, 0), statuses.get(503, 0)
                rate = done / duration
                if connections == 1:
                    ceiling = rate
                    loop_per_signup = loop_cpu / max(1, done)
                if not refused:
                    best_unrefused = max(best_unrefused, rate)
                rows.append(
                    f"{connections:>4} clients: {rate:6.1f} sign-ups/s ({rate / ceiling:4.0%} of "
                    f"the ceiling, {rate / best_unrefused:4.0%} of the best unrefused)  answers "
                    f"{dict(sorted(statuses.items()))}  refused "
                    f"{refused / duration:6.0f}/s  201 p50 {quantile(puts['latencies'], 0.5):.3f}"
                    f" s p99 {quantile(puts['latencies'], 0.99):.3f} s  event loop "
                    f"{loop_cpu / duration:4.0%} of a core"
                    + f"  load generator {puts['cpu_seconds'] / duration:4.0%} of CPU "
                    f"{sorted(LOAD_CPUS)}"
                    + (
                        f"  (503 without Retry-After: {puts['missing_retry_after']})"
                        if puts["missing_retry_after"]
                        else ""
                    )
                )
                print(rows[-1], flush=True)
                if len(results) > 1:
                    gets = results[1]["latencies"]
                    print(
                        f"      GET /user/reader every 20 ms meanwhile: "
                        f"{dict(results[1]['statuses'])}  p50 {quantile(gets, 0.5) * 1e3:.1f} ms"
                        f"  p99 {quantile(gets, 0.99) * 1e3:.1f} ms  max {max(gets) * 1e3:.1f} ms"
                        f"  (its process {results[1]['cpu_seconds'] / duration:4.0%} of CPU "
                        f"{sorted(LOAD_CPUS)})"
                    )
            print(
                f"at the ceiling the event loop spends {loop_per_signup * 1e3:.1f} ms per sign-up"
            )
            print(f"usersvc peak RSS: {peak_rss_bytes(usersvc.pid) / 2**20:.0f} MiB")
            print(
                await refusal_cost(usersvc.pid, base, max(counts), min(duration, 10.0)), flush=True
            )
    print(f"load average after: {load_average()} (above 1: other work shared the machine)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--counts", default="16,64,128", help="concurrent clients per run")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for usersvc (repeatable)"
    )
    parser.add_argument("--client", choices=("put", "get"), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        from envoymesh.loop import event_loop_factory

        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(client(args.base, args.client, args.connections, args.duration, args.tag))
    else:
        counts = [int(n) for n in args.counts.split(",")]
        asyncio.run(main(args.duration, counts, dict(item.split("=", 1) for item in args.env)))
