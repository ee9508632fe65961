"""What every benchmark prints about where and how it ran, and how it drives load."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess, wait_http
from meshctl.postgres import LocalPostgres

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """CPU count, CPU model, Python and platform, one line."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({model or platform.processor() or 'unknown'}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


SERVER_CPUS = {0}
LOAD_CPUS = {1}


def pin(pid: int | None, cpus: set[int]) -> bool:
    """Keep process ``pid`` on ``cpus`` (Linux, 2+ CPUs); False where that is not possible."""
    if pid is None or not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(pid, cpus)
    return True


def _ms(text: str) -> float:
    """A wrk latency ("850.00us", "9.12ms", "1.02s") in milliseconds."""
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return round(float(text[: -len(unit)]) * factor, 2)
    raise ValueError(f"unexpected wrk latency {text!r}")


async def _wrk(
    url: str, cpus: set[int] | None, concurrency: int, duration: float
) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--latency", url]
    for seconds in (1, duration):  # a short warm-up run first
        argv[3] = f"-d{seconds:g}s"
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        if cpus:
            pin(proc.pid, cpus)
        out, _ = await proc.communicate()
    text = out.decode()
    latency = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", text, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "tool": "wrk",
        "requests": requests,
        "errors": (int(bad.group(1)) if bad else 0)
        + (sum(int(n) for n in sockets.groups()) if sockets else 0),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(latency["50"]),
        "p99_ms": _ms(latency["99"]),
    }


async def run_load(
    url: str, *, cpus: set[int] | None = None, method: str = "GET", **options: Any
) -> dict[str, Any]:
    """Drive ``url`` from another process (on ``cpus``) and return requests/s and latencies.

    wrk when it is installed and the load is plain GETs (it is much faster than any Python
    client, so it measures the server, not itself); else bench/loadgen.py.
    """
    if shutil.which("wrk") and method == "GET" and "{n}" not in url:
        return await _wrk(
            url, cpus, int(options.get("concurrency", 32)), float(options.get("duration", 5))
        )
    argv = [sys.executable, str(HERE / "loadgen.py"), url, "--method", method]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    if cpus:
        pin(proc.pid, cpus)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {argv}")
    result: dict[str, Any] = json.loads(out)
    result["tool"] = "aiohttp"
    return result


def row(label: str, stats: dict[str, Any]) -> str:
    """One result line: requests/s, p50, p99, errors."""
    return (
        f"{label:<44} {stats['rps']:>9.1f} req/s   p50 {stats['p50_ms']:>7} ms   "
        f"p99 {stats['p99_ms']:>7} ms   errors {stats['errors']}   ({stats['tool']})"
    )


@asynccontextmanager
async def usersvc_on_postgres(
    tmp: Path, env: dict[str, str]
) -> AsyncIterator[tuple[ManagedProcess, LocalPostgres, str]]:
    """A private PostgreSQL and one healthy usersvc process on it: (usersvc, PostgreSQL, URL)."""
    postgres = LocalPostgres(tmp / "pg")
    await postgres.start()
    port = free_port()
    usersvc = ManagedProcess(
        "usersvc",
        [sys.executable, "-m", "usersvc", "--host", "127.0.0.1", "--port", str(port)],
        log_path=tmp / "usersvc.log",
        env={"DATABASE_URL": postgres.url, **env},
    )
    await usersvc.start()
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{base}/user/health", timeout=30, process=usersvc)
        yield usersvc, postgres, base
    finally:
        await usersvc.stop()
        await postgres.stop()
        postgres.discard()
