"""The ``sds`` command as a process: flags, environment, and shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess, wait_http
from tests.conftest import SDS_AUTH, SDS_WRITE_TOKEN, SdsProcess


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


async def test_a_frozen_sds_does_not_expire_hosts_for_the_time_it_was_frozen(
    sds_process: Callable[..., Any],
) -> None:
    sds: SdsProcess = await sds_process(
        "--host-ttl", "1", "--allow-loopback", env={"SDS_WRITE_TOKEN": SDS_WRITE_TOKEN}
    )
    async with httpx.AsyncClient(base_url=sds.url, timeout=10) as client:
        registered = await client.post(
            "/v1/registration/usersvc", json={"ip": "127.0.0.2", "port": 80}, headers=SDS_AUTH
        )
        assert registered.status_code == 200
        sds.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3)  # three TTLs with no chance to heartbeat
        sds.proc.send_signal(signal.SIGCONT)
        # The sweep runs every 0.1 s: had the freeze counted, the host would go on the first.
        for _ in range(5):
            hosts = (await client.get("/v1/registration/usersvc")).json()["hosts"]
            assert [h["ip_address"] for h in hosts] == ["127.0.0.2"]
            await asyncio.sleep(0.1)
        metrics = (await client.get("/metrics")).text
    assert "sds_stalls_total 1.0" in metrics
    assert "sds_expired_hosts_total 0.0" in metrics
    assert "host TTLs extended" in sds.log()
