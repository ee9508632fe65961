"""sds v1 read API: GET /v1/registration/{service} at 10 and 1,000 hosts under load, beside a
bare ASGI app on the same server stack answering the same bytes (the ceiling).

Target: the v1 GET at 10 hosts reaches >= 80 % of the baseline's requests/s.
Run: ``.venv/bin/python bench/sds_v1.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LOAD_CPUS, SERVER_CPUS, machine, pin, row, run_load
from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess, wait_http

HERE = Path(__file__).resolve().parent


# Writes need a token, as in production.
TOKEN = secrets.token_urlsafe(24)


async def register(base: str, service: str, count: int) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        for i in range(count):
            ip = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
            tags = json.dumps({"az": f"zone-{i % 3}", "instance_id": f"i-{i}"})
            response = await client.post(
                f"/v1/registration/{service}",
                data={"ip": ip, "port": "8080", "revision": "r1", "tags": tags},
            )
            response.raise_for_status()


async def main(duration: float, concurrency: int, rounds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-sds-") as tmp:
        sds_port, base_port = free_port(), free_port()
        sds = ManagedProcess(
            "sds",
            [
                sys.executable,
                "-m",
                "sds",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(sds_port),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                str(free_port()),
                "--log-level",
                "warning",
                "--registration-warmup",
                "0",
            ],
            log_path=Path(tmp) / "sds.log",
            env={"SDS_WRITE_TOKEN": TOKEN},
        )
        await sds.start()
        base = f"http://127.0.0.1:{sds_port}"
        baseline: ManagedProcess | None = None
        try:
            await wait_http(f"{base}/readyz", timeout=30, process=sds)
            await register(base, "ten", 10)
            await register(base, "thousand", 1000)
            async with httpx.AsyncClient() as client:
                body = (await client.get(f"{base}/v1/registration/ten")).content
            (Path(tmp) / "body.json").write_bytes(body)
            baseline = ManagedProcess(
                "baseline",
                [
                    sys.executable,
                    str(HERE / "minimal_asgi.py"),
                    str(base_port),
                    str(Path(tmp) / "body.json"),
                ],
                log_path=Path(tmp) / "baseline.log",
            )
            await baseline.start()
            await wait_http(f"http://127.0.0.1:{base_port}/", timeout=30, process=baseline)

            pinned = pin(sds.pid, SERVER_CPUS) and pin(baseline.pid, SERVER_CPUS)
            print("sds v1 API benchmark")
            print(f"machine: {machine()}")
            print(
                "setup: sds (1 process, uvicorn + FastAPI) and the baseline (bare ASGI, same "
                "uvicorn settings and event loop) on loopback; load from a separate process "
                "(wrk when installed, else aiohttp; named on each row), "
                f"{concurrency} keep-alive connections, {duration:.0f} s per run after 1 s "
                f"warm-up, {rounds} alternating rounds, medians; "
                + (
                    "servers pinned to CPU 0, load generator to CPU 1"
                    if pinned
                    else "servers and load generator share the CPUs"
                )
            )
            targets = {
                f"baseline: bare ASGI, same {len(body)} bytes": f"http://127.0.0.1:{base_port}/",
                "GET /v1/registration/ten       (10 hosts)": f"{base}/v1/registration/ten",
                "GET /v1/registration/thousand  (1,000 hosts)": f"{base}/v1/registration/thousand",
            }
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in targets}
            for _ in range(rounds):
                for label, url in targets.items():
                    runs[label].append(
                        await run_load(
                            url,
                            cpus=LOAD_CPUS if pinned else None,
                            concurrency=concurrency,
                            duration=duration,
                        )
                    )
            medians = {}
            for label, results in runs.items():
                medians[label] = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
                print(row(label, medians[label]))
            ceiling, ten = (medians[label] for label in list(targets)[:2])
            ratio = ten["rps"] / ceiling["rps"]
            print(f"v1 GET at 10 hosts / baseline: {ratio:.0%} (target >= 80%)")
            return 0 if ratio >= 0.8 else 1
        finally:
            if baseline is not None:
                await baseline.stop()
            await sds.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.duration, args.concurrency, args.rounds)))
