"""How fast sds writes Gateway API status: 3,000 HTTPRoutes at once, then backend changes.

The fake API server (``tests/fake_apiserver.py``) runs in this process; sds runs as its own
process, the real ``sds --source kubernetes`` (reflectors, translation, leader election over a
Lease, the status writer), through the unpatched kubernetes-asyncio client. So the CPU of each
side is its own and both are reported: sds's from ``/proc/<pid>/stat``, this process's (the
fake API server and the polling below) from ``getrusage``.

1. A GatewayClass, a Gateway and ``--routes`` Services are applied, sds starts and writes the
   GatewayClass and Gateway status (it leads).
2. ``--routes`` HTTPRoutes are applied at once, each to its own Service. Timed: until every
   route shows our parent entry with ``Accepted`` and ``ResolvedRefs`` True at its
   ``observedGeneration``. Counted: the API server's accepted status writes, per route and for
   the Gateway (whose ``attachedRoutes`` really changes as routes attach), and, after a quiet
   ``--quiet`` seconds, that no further write came.
3. ``--rounds`` times: one route's backend Service is deleted (until the route shows
   ``ResolvedRefs`` False, ``BackendNotFound``) and applied again (until True); each wait is one
   sample of "a backend change reaches the route's status".

    .venv/bin/python bench/gateway_status.py [--routes N] [--rounds N] [--profile FILE]

``--profile FILE`` runs sds under cProfile (written to FILE when it stops) and prints its top
functions. Targets: every status within 10 s, one write per route, p99 ≤ 1 s for a backend
change. Exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import pstats
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from envoymesh.ports import free_port  # noqa: E402  (needs the path above)
from tests.fake_apiserver import (  # noqa: E402
    FakeApiServer,
    gateway,
    gateway_class,
    http_route,
    service,
)

OURS = "envoymesh.io/gateway-controller"
NAMESPACE = "default"
# A real API server keeps minutes of history; the default 1,000 events would make sds's
# watches relist in the middle of the burst (3,000 routes and their 3,000 status writes).
HISTORY = 1_000_000


def cpu_seconds_of(pid: int) -> float:
    """User plus system CPU of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User plus system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def our_conditions(obj: dict[str, Any] | None) -> dict[str, tuple[str, str, int]] | None:
    """(status, reason, observedGeneration) of our one parent entry's conditions, or None."""
    parents = [
        p
        for p in ((obj or {}).get("status") or {}).get("parents") or ()
        if p["controllerName"] == OURS
    ]
    if len(parents) != 1:
        return None
    return {
        c["type"]: (c["status"], c["reason"], int(c["observedGeneration"]))
        for c in parents[0]["conditions"]
    }


def route_is(apiserver: FakeApiServer, name: str, resolved: bool) -> bool:
    """Whether route ``name`` is Accepted with ResolvedRefs ``resolved``, at its generation."""
    obj = apiserver.get("HTTPRoute", NAMESPACE, name)
    conditions = our_conditions(obj)
    if obj is None or conditions is None:
        return False
    generation = int(obj["metadata"]["generation"])
    want = ("True", "ResolvedRefs") if resolved else ("False", "BackendNotFound")
    return conditions.get("Accepted") == ("True", "Accepted", generation) and conditions.get(
        "ResolvedRefs"
    ) == (*want, generation)


async def until(condition: Callable[[], bool], timeout: float, poll: float) -> float:
    """Seconds until ``condition()`` holds, polled every ``poll`` s; TimeoutError after
    ``timeout``."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(poll)
    return time.perf_counter() - started


async def start_sds(url: str, log: Path, profile: str) -> asyncio.subprocess.Process:
    """The sds process against ``url``, leading at once (it is alone)."""
    profiled = ["-m", "cProfile", "-o", profile] if profile else []
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *profiled,
            "-m",
            "sds",
            "--source",
            "kubernetes",
            "--kube-api-url",
            url,
            "--namespace",
            NAMESPACE,
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(free_port()),
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(free_port()),
            "--gateway-address",
            "192.0.2.1",
            "--lease-holder",
            "bench",
            "--lease-namespace",
            NAMESPACE,
            "--ui",
            "off",
            "--log-level",
            "warning",
            stdout=out,
            stderr=out,
        )


async def stop_sds(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM (sds stops cleanly, and cProfile writes its file); kill after 30 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def percentile(samples: list[float], share: float) -> float:
    """The ``share`` percentile (nearest rank) of ``samples``."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the three phases; the numbers."""
    apiserver = FakeApiServer(history_limit=HISTORY)
    apiserver.apply(gateway_class())
    apiserver.apply(gateway())
    for i in range(args.routes):
        apiserver.apply(service(f"svc-{i}"))
    await apiserver.start()
    sds = await start_sds(apiserver.url, work / "sds.log", args.profile)
    result: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        await until(
            lambda: bool(
                ((apiserver.get("Gateway", NAMESPACE, "edge") or {}).get("status") or {}).get(
                    "listeners"
                )
            ),
            args.give_up,
            0.01,
        )
        result["startup"] = time.perf_counter() - started
        gateway_writes = apiserver.status_writes_of.get(("Gateway", NAMESPACE, "edge"), 0)
        writes_before = apiserver.status_writes
        names = [f"route-{i}" for i in range(args.routes)]

        # ----- 3,000 routes at once --------------------------------------------------------
        sds_cpu, own_cpu = cpu_seconds_of(sds.pid), own_cpu_seconds()
        started = time.perf_counter()
        for i, name in enumerate(names):
            apiserver.apply(http_route(name, path=f"/r{i}", backend=f"svc-{i}"))
        pending = set(names)

        def all_correct() -> bool:
            pending.difference_update([n for n in pending if route_is(apiserver, n, True)])
            return not pending

        await until(all_correct, args.give_up, 0.02)
        result["burst"] = time.perf_counter() - started
        result["burst_sds_cpu"] = cpu_seconds_of(sds.pid) - sds_cpu
        result["burst_own_cpu"] = own_cpu_seconds() - own_cpu
        result["burst_writes"] = apiserver.status_writes - writes_before
        per_route = [apiserver.status_writes_of.get(("HTTPRoute", NAMESPACE, n), 0) for n in names]
        result["writes_per_route"] = (min(per_route), max(per_route))
        await asyncio.sleep(args.quiet)
        result["writes_after_quiet"] = apiserver.status_writes - writes_before
        result["gateway_writes"] = (
            apiserver.status_writes_of.get(("Gateway", NAMESPACE, "edge"), 0) - gateway_writes
        )
        result["attached"] = (apiserver.get("Gateway", NAMESPACE, "edge") or {})["status"][
            "listeners"
        ][0]["attachedRoutes"]

        # ----- backend changes ---------------------------------------------------------------
        samples: list[float] = []
        gone = functools.partial(route_is, apiserver, resolved=False)
        back = functools.partial(route_is, apiserver, resolved=True)
        writes_before = apiserver.status_writes
        sds_cpu = cpu_seconds_of(sds.pid)
        for round_number in range(args.rounds):
            i = (round_number * 61) % args.routes  # spread over the routes
            name = names[i]
            apiserver.delete(NAMESPACE, f"svc-{i}", kind="Service")
            samples.append(await until(functools.partial(gone, name), 30, 0.002))
            apiserver.apply(service(f"svc-{i}"))
            samples.append(await until(functools.partial(back, name), 30, 0.002))
        result["samples"] = samples
        result["change_writes"] = apiserver.status_writes - writes_before
        result["change_sds_cpu"] = cpu_seconds_of(sds.pid) - sds_cpu
    finally:
        await stop_sds(sds)
        await apiserver.stop()
    return result


def print_profile(path: str, limit: int) -> None:
    """sds's top functions by own time, and its time by package."""
    stats = pstats.Stats(path)
    by_package: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        parts = Path(filename).parts
        if "site-packages" in parts:
            package = parts[parts.index("site-packages") + 1]
        elif str(ROOT) in filename:
            package = "/".join(Path(filename).relative_to(ROOT).parts[:2])
        else:
            package = "stdlib/builtins"
        by_package[package] = by_package.get(package, 0.0) + own
    total = sum(by_package.values())
    print(f"  profile     sds under cProfile ({path}), own time by package:")
    for package, own in sorted(by_package.items(), key=lambda item: -item[1])[:limit]:
        print(f"              {own:6.2f} s {100 * own / total:4.0f}%  {package}")
    stats.sort_stats("tottime").print_stats(limit)


async def main_async(args: argparse.Namespace) -> int:
    """Measure and report; 0 when every target is met."""
    with tempfile.TemporaryDirectory(prefix="gateway-status-") as directory:
        result = await measure(args, Path(directory))
    load = os.getloadavg()
    samples = result["samples"]
    p99 = percentile(samples, 0.99)
    low, high = result["writes_per_route"]
    ok_burst = result["burst"] <= args.target_seconds
    ok_writes = low == high == 1 and result["writes_after_quiet"] == result["burst_writes"]
    ok_p99 = p99 <= args.target_p99
    print("gateway status: routes applied at once, then backend changes")
    print(
        f"  machine     {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "  how         fake API server in this process, sds (--source kubernetes, default"
        " status settings: 500 writes/s, burst 500, 8 in flight) in its own"
        + (" under cProfile" if args.profile else "")
    )
    print(f"  start-up    GatewayClass and Gateway status {result['startup']:.2f} s after start")
    verdict = "ok" if ok_burst else "MISSED"
    print(
        f"  burst       {args.routes:,} HTTPRoutes: every status correct in"
        f" {result['burst']:.2f} s (target ≤ {args.target_seconds} s: {verdict});"
        f" CPU sds {result['burst_sds_cpu']:.2f} s, API server + polling"
        f" {result['burst_own_cpu']:.2f} s"
    )
    verdict = "ok" if ok_writes else "MISSED"
    print(
        f"  writes      {result['burst_writes']:,} status writes ({low}..{high} per route,"
        f" Gateway {result['gateway_writes']}, attachedRoutes {result['attached']});"
        f" {result['writes_after_quiet'] - result['burst_writes']} more in {args.quiet} s"
        f" quiet ({verdict})"
    )
    verdict = "ok" if ok_p99 else "MISSED"
    print(
        f"  backend     {len(samples)} changes (a Service deleted, then applied again):"
        f" p50 {1000 * statistics.median(samples):.0f} ms, p99 {1000 * p99:.0f} ms,"
        f" max {1000 * max(samples):.0f} ms (target p99 ≤ {1000 * args.target_p99:.0f} ms:"
        f" {verdict}); {result['change_writes']} writes, sds CPU"
        f" {result['change_sds_cpu']:.2f} s"
    )
    if args.profile:
        print_profile(args.profile, 25)
    return 0 if ok_burst and ok_writes and ok_p99 else 1


def main() -> None:
    """Parse flags and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, default=3_000)
    parser.add_argument("--rounds", type=int, default=100, help="backend changes, 2 samples each")
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds with no write expected")
    parser.add_argument("--target-seconds", type=float, default=10.0)
    parser.add_argument("--target-p99", type=float, default=1.0)
    parser.add_argument("--give-up", type=float, default=120.0, help="seconds before failing")
    parser.add_argument("--profile", default="", help="run sds under cProfile into this file")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
