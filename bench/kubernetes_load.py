"""How fast the Kubernetes source loads a large cluster, and in how much memory.

A fake API server runs in its own process (its CPU is not ours) preloaded with 10,000 services
of 10 endpoints each, one EndpointSlice per service. The real KubernetesSource, through the
unpatched kubernetes-asyncio client, lists them (paginated) into a registry in this process;
we time start to ready and read the peak RSS.

    .venv/bin/python bench/kubernetes_load.py [--services N] [--endpoints-per-service M]

Targets: ready within 5 s, peak RSS within 400 MB. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sds.registry import Registry  # noqa: E402  (needs the path above)
from sds.sources.kubernetes import KubernetesSource, WatchSettings  # noqa: E402

FAKE_APISERVER = ROOT / "tests" / "fake_apiserver.py"


def current_rss_mb() -> float:
    """Resident set size right now (Linux), in MB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def start_apiserver(args: argparse.Namespace) -> tuple[asyncio.subprocess.Process, str]:
    """The preloaded fake API server in a child process, and its URL once it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FAKE_APISERVER),
        "--services",
        str(args.services),
        "--endpoints-per-service",
        str(args.endpoints_per_service),
        "--namespaces",
        str(args.namespaces),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(120):
        line = await proc.stdout.readline()
    if not line:
        raise SystemExit(f"fake API server exited with {await proc.wait()}")
    return proc, str(json.loads(line)["url"])


async def stop_apiserver(proc: asyncio.subprocess.Process) -> None:
    """Terminate the child; kill it if it does not go within 10 s."""
    if proc.returncode is None:
        proc.terminate()
    try:
        async with asyncio.timeout(10):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def measure(args: argparse.Namespace, url: str) -> dict[str, float]:
    """Run the source until ready; the numbers."""
    registry = Registry()
    source = KubernetesSource(
        registry, kube_api_url=url, watch=WatchSettings(page_size=args.page_size)
    )
    rss_before = current_rss_mb()
    started = time.perf_counter()
    task = asyncio.create_task(source.run())
    try:
        async with asyncio.timeout(args.give_up):
            while not (s := registry.source_statuses().get("kubernetes")) or not s.ready:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    services, endpoints = registry.counts()
    peak = peak_rss_mb()
    return {
        "seconds": elapsed,
        "services": services,
        "endpoints": endpoints,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
        "rss_delta_mb": peak - rss_before,
    }


async def main_async(args: argparse.Namespace) -> int:
    """Set up, measure, report; 0 when both targets are met."""
    proc, url = await start_apiserver(args)
    try:
        result = await measure(args, url)
    finally:
        await stop_apiserver(proc)
    ok_time = result["seconds"] <= args.target_seconds
    ok_rss = result["peak_rss_mb"] <= args.target_rss_mb
    print("kubernetes source: initial load")
    print(f"  machine     {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"  cluster     {args.services:,} services x {args.endpoints_per_service} endpoints"
        f" in {args.namespaces} namespaces, page size {args.page_size}"
        " (fake API server in its own process)"
    )
    print(
        f"  loaded      {int(result['services']):,} services,"
        f" {int(result['endpoints']):,} endpoints"
    )
    verdict = "ok" if ok_time else "MISSED"
    print(f"  start→ready {result['seconds']:.2f} s (target ≤ {args.target_seconds} s: {verdict})")
    verdict = "ok" if ok_rss else "MISSED"
    print(
        f"  peak RSS    {result['peak_rss_mb']:.0f} MB (target ≤ {args.target_rss_mb} MB:"
        f" {verdict}); before {result['rss_before_mb']:.0f} MB,"
        f" delta {result['rss_delta_mb']:.0f} MB"
    )
    expected = args.services * args.endpoints_per_service
    if result["endpoints"] != expected:
        print(f"  WRONG: expected {expected:,} endpoints")
        return 1
    return 0 if ok_time and ok_rss else 1


def main() -> None:
    """Parse flags and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints-per-service", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--target-seconds", type=float, default=5.0)
    parser.add_argument("--target-rss-mb", type=float, default=400.0)
    parser.add_argument("--give-up", type=float, default=120.0, help="seconds before failing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
