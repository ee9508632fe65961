"""What every benchmark prints about where and how it ran, and how it drives load."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

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


async def run_load(url: str, *, cpus: set[int] | None = None, **options: Any) -> dict[str, Any]:
    """Run bench/loadgen.py in its own process (on ``cpus``) against ``url``; its stats."""
    argv = [sys.executable, str(HERE / "loadgen.py"), url]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    if cpus:
        pin(proc.pid, cpus)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {argv}")
    result: dict[str, Any] = json.loads(out)
    return result


def row(label: str, stats: dict[str, Any]) -> str:
    """One result line: requests/s, p50, p99, errors."""
    return (
        f"{label:<44} {stats['rps']:>9.1f} req/s   p50 {stats['p50_ms']:>7} ms   "
        f"p99 {stats['p99_ms']:>7} ms   errors {stats['errors']}"
    )
