"""sds v1 read API: GET /v1/registration/{service} at 10 and 1,000 hosts under load, beside a
bare ASGI app on the same server stack answering the same bytes (the ceiling).

Target: the v1 GET at 10 hosts reaches >= 80 % of the baseline's requests/s.
Run: ``.venv/bin/python bench/sds_v1.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, row, run_load
from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess, wait_http

HERE = Path(__file__).resolve().parent


async def register(base: str, service: str, count: int) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for i in range(count):
            ip = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
            tags = json.dumps({"az": f"zone-{i % 3}", "instance_id": f"i-{i}"})
            response = await client.post(
                f"/v1/registration/{service}",
                data={"ip": ip, "port": "8080", "revision": "r1", "tags": tags},
            )
            response.raise_for_status()


async def main(duration: float, concurrency: int) -> int:
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

            print("sds v1 API benchmark")
            print(f"machine: {machine()}")
            print(
                f"setup: sds (1 process, uvicorn + FastAPI) and the baseline (bare ASGI, same "
                f"uvicorn settings) each on loopback; load from a separate process, "
                f"{concurrency} keep-alive connections, {duration:.0f} s per run after 1 s "
                "warm-up; server and load generator share the 2 cores"
            )
            ceiling = await run_load(
                f"http://127.0.0.1:{base_port}/", concurrency=concurrency, duration=duration
            )
            print(row(f"baseline: bare ASGI, same {len(body)} bytes", ceiling))
            ten = await run_load(
                f"{base}/v1/registration/ten", concurrency=concurrency, duration=duration
            )
            print(row("GET /v1/registration/ten       (10 hosts)", ten))
            thousand = await run_load(
                f"{base}/v1/registration/thousand", concurrency=concurrency, duration=duration
            )
            print(row("GET /v1/registration/thousand  (1,000 hosts)", thousand))
            ratio = ten["rps"] / ceiling["rps"]
            print(f"v1 GET at 10 hosts / baseline: {ratio:.0%} (target >= 80%)")
            return 0 if ratio >= 0.8 else 1
        finally:
            if baseline is not None:
                await baseline.stop()
            await sds.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.duration, args.concurrency)))
