"""The ``sds`` command as a process: flags, environment, and shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import httpx

from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess, wait_http


async def test_sds_serves_then_stops_cleanly_on_sigterm(run_dir: Path) -> None:
    http, grpc = free_port(), free_port()
    proc = ManagedProcess(
        "sds",
        [sys.executable, "-m", "sds", "--http-host", "127.0.0.1", "--grpc-host", "127.0.0.1"],
        log_path=run_dir / "sds.log",
        env={"SDS_HTTP_PORT": str(http), "SDS_GRPC_PORT": str(grpc), "SDS_WRITE_TOKEN": "t0k3n"},
    )
    await proc.start()
    await wait_http(f"http://127.0.0.1:{http}/healthcheck", timeout=20, process=proc)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http}") as client:
        denied = await client.post("/v1/registration/usersvc", json={"ip": "10.0.0.1", "port": 80})
        assert denied.status_code == 401
        allowed = await client.post(
            "/v1/registration/usersvc",
            json={"ip": "10.0.0.1", "port": 80},
            headers={"authorization": "Bearer t0k3n"},
        )
        assert allowed.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait(timeout=15) == 0
    log = proc.log_path.read_text()
    assert '"event":"sds stopped"' in log
    assert "t0k3n" not in log


async def test_unknown_source_is_refused_with_a_message(run_dir: Path) -> None:
    proc = ManagedProcess(
        "sds", [sys.executable, "-m", "sds", "--source", "consul"], log_path=run_dir / "bad.log"
    )
    await proc.start()
    assert await proc.wait(timeout=15) != 0
    assert "unknown source" in proc.log_path.read_text()
    await asyncio.sleep(0)
