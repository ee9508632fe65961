"""usersvc over HTTP: requests/s and p50/p99 for GET and PUT under concurrent load.

Starts a private PostgreSQL and one usersvc process (uvicorn, one worker), then drives it from a
separate load-generator process. Run: ``.venv/bin/python bench/usersvc.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LOAD_CPUS, SERVER_CPUS, machine, pin, row, run_load, usersvc_on_postgres


async def main(duration: float, get_concurrency: int, put_concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-usersvc-") as tmp:
        # A queue as long as the PUT connections: this measures hashing throughput, not
        # load shedding (bench/usersvc_flood.py measures that).
        env = {"USERSVC_LOG_LEVEL": "warning", "USERSVC_HASH_QUEUE": str(put_concurrency)}
        async with usersvc_on_postgres(Path(tmp), env) as (usersvc, postgres, base):
            async with httpx.AsyncClient(base_url=base) as client:
                await client.put("/user/alice", json={"fullname": "Alice", "password": "pw"})
            pinned = pin(usersvc.pid, SERVER_CPUS) and pin(postgres.pid, SERVER_CPUS)
            load_cpus = LOAD_CPUS if pinned else None
            print("usersvc benchmark")
            print(f"machine: {machine()}")
            print(
                f"setup: 1 usersvc process (uvicorn, 1 worker, pool 10, default hashing "
                f"slots, hashing queue {put_concurrency}) + PostgreSQL "
                f"{postgres.bindir}; load from a separate process (wrk when installed, else "
                "aiohttp; the tool is named on each row), keep-alive; "
                f"{duration:.0f} s per run after 1 s warm-up; "
                + (
                    "usersvc and PostgreSQL pinned to CPU 0, load generator to CPU 1"
                    if pinned
                    else "server and load generator share the CPUs"
                )
            )
            get = await run_load(
                f"{base}/user/alice",
                cpus=load_cpus,
                concurrency=get_concurrency,
                duration=duration,
            )
            print(row(f"GET /user/alice  ({get_concurrency} connections)", get))
            put = await run_load(
                base + "/user/bench-{n}",
                cpus=load_cpus,
                method="PUT",
                body='{"fullname": "Bench User", "password": "correct horse"}',
                concurrency=put_concurrency,
                duration=duration,
            )
            print(row(f"PUT /user/<new>  ({put_concurrency} connections, argon2id)", put))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--get-concurrency", type=int, default=64)
    parser.add_argument("--put-concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.get_concurrency, args.put_concurrency))
