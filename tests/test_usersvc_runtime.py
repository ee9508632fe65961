"""usersvc as a real process: uvicorn, database outages, migrations, shutdown."""

from __future__ import annotations

import asyncio
import base64
import signal
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx

from meshctl.postgres import LocalPostgres
from tests.conftest import RunningSds
from usersvc.db import MIGRATIONS, migrate

ALICE = {"fullname": "Alice", "password": "wonderland"}


async def wait_status(client: httpx.AsyncClient, url: str, status: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if (await client.get(url)).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)


async def test_process_serves_the_api_over_http(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    _, base = await usersvc_process(private_postgres.url)
    async with httpx.AsyncClient(base_url=base) as client:
        created = await client.put("/user/alice", json=ALICE)
        assert created.status_code == 201
        assert (await client.get("/user/alice")).json()["uuid"] == created.json()["uuid"]
        assert (await client.post("/user/alice/login", json=ALICE)).status_code == 200
        assert (await client.request("PATCH", "/user/alice")).status_code == 405


async def test_starts_before_database_and_connects_when_it_appears(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    await private_postgres.stop()
    proc, base = await usersvc_process(private_postgres.url, wait_healthy=False)
    async with httpx.AsyncClient(base_url=base) as client:
        health = await client.get("/user/health")
        assert health.status_code == 503
        assert health.json()["ok"] is False
        assert health.json()["error"]
        down = await client.put("/user/alice", json=ALICE)
        assert down.status_code == 503
        assert down.json()["error"] == "database unavailable"

        await private_postgres.start()
        await wait_status(client, "/user/health", 200, timeout=20)
        assert (await client.put("/user/alice", json=ALICE)).status_code == 201
    assert proc.running()


async def test_database_restart_gives_503s_then_full_service(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    proc, base = await usersvc_process(private_postgres.url)
    async with httpx.AsyncClient(base_url=base) as client:
        acked = await client.put("/user/alice", json=ALICE)
        assert acked.status_code == 201

        await private_postgres.stop()
        during = [await client.get("/user/alice") for _ in range(3)]
        assert {r.status_code for r in during} == {503}
        assert all(r.json()["ok"] is False for r in during)

        await private_postgres.start()
        await wait_status(client, "/user/health", 200, timeout=20)
        after = await client.get("/user/alice")
        assert after.status_code == 200
        assert after.json()["uuid"] == acked.json()["uuid"]
    assert proc.running()


async def test_sigterm_finishes_in_flight_requests_then_exits_cleanly(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    proc, base = await usersvc_process(private_postgres.url)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        in_flight = [asyncio.create_task(client.put(f"/user/u{i}", json=ALICE)) for i in range(4)]
        await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*in_flight)
    assert [r.status_code for r in replies] == [201] * 4
    assert await proc.wait(timeout=15) == 0
    assert '"event":"usersvc stopped"' in proc.log_path.read_text()
    conn = await asyncpg.connect(private_postgres.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 4
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_version_once(
    private_postgres: LocalPostgres,
) -> None:
    conns = [await asyncpg.connect(private_postgres.url) for _ in range(6)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(applied) == [0] * 5 + [len(MIGRATIONS)]
        versions = await conns[0].fetch("SELECT version FROM schema_migrations")
        assert [r["version"] for r in versions] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        for c in conns:
            await c.close()


async def test_replicas_starting_together_share_one_schema(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    started = await asyncio.gather(*(usersvc_process(private_postgres.url) for _ in range(3)))
    async with httpx.AsyncClient() as client:
        await client.put(f"{started[0][1]}/user/alice", json=ALICE)
        uuids = {(await client.get(f"{base}/user/alice")).json()["uuid"] for _, base in started}
    assert len(uuids) == 1


async def wait_registered(sds: RunningSds, expected: list[tuple[str, int]]) -> None:
    async with asyncio.timeout(10):
        while [e.key for e in sds.registry.snapshot("usersvc").endpoints] != expected:
            await asyncio.sleep(0.05)


async def test_registers_with_sds_and_deregisters_on_sigterm(
    private_postgres: LocalPostgres,
    usersvc_process: Callable[..., Any],
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds()
    proc, _ = await usersvc_process(
        private_postgres.url,
        env={"USERSVC_SDS_URL": sds.url, "USERSVC_REGISTER_PORT": "10001", "POD_IP": "127.0.0.1"},
    )
    await wait_registered(sds, [("127.0.0.1", 10001)])
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait(timeout=15) == 0
    assert sds.registry.snapshot("usersvc").endpoints == ()


async def test_registration_waits_for_the_database(
    private_postgres: LocalPostgres,
    usersvc_process: Callable[..., Any],
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds()
    await private_postgres.stop()
    await usersvc_process(
        private_postgres.url,
        wait_healthy=False,
        env={"USERSVC_SDS_URL": sds.url, "POD_IP": "127.0.0.1"},
    )
    await asyncio.sleep(1.0)
    assert sds.registry.snapshot("usersvc").endpoints == ()
    await private_postgres.start()
    async with asyncio.timeout(20):
        while not sds.registry.snapshot("usersvc").endpoints:
            await asyncio.sleep(0.1)


async def test_a_replica_leaves_sds_while_its_database_is_down_and_returns_after(
    private_postgres: LocalPostgres,
    usersvc_process: Callable[..., Any],
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds()
    proc, base = await usersvc_process(
        private_postgres.url,
        env={"USERSVC_SDS_URL": sds.url, "USERSVC_REGISTER_PORT": "10001", "POD_IP": "127.0.0.1"},
    )
    await wait_registered(sds, [("127.0.0.1", 10001)])
    await private_postgres.stop()
    await wait_registered(sds, [])
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/user/health")).status_code == 503
        assert (await client.get("/user/live")).status_code == 200
    await private_postgres.start()
    await wait_registered(sds, [("127.0.0.1", 10001)])
    assert proc.running()
    assert (
        '"event":"database unreachable: leaving sds until it is back"' in proc.log_path.read_text()
    )


async def test_drain_keeps_serving_after_leaving_sds(
    private_postgres: LocalPostgres,
    usersvc_process: Callable[..., Any],
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds()
    proc, base = await usersvc_process(
        private_postgres.url,
        env={
            "USERSVC_SDS_URL": sds.url,
            "USERSVC_DRAIN_SECONDS": "1.5",
            "POD_IP": "127.0.0.1",
        },
    )
    async with asyncio.timeout(10):
        while not sds.registry.snapshot("usersvc").endpoints:
            await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(5):
        while sds.registry.snapshot("usersvc").endpoints:
            await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/user/health")).status_code == 200
    assert proc.running()
    assert await proc.wait(timeout=15) == 0


async def test_credentials_never_reach_the_log(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    admin, password = "admin-secret-4242", "alice-secret-1717"
    proc, base = await usersvc_process(
        private_postgres.url,
        env={
            "USERSVC_ADMIN_TOKEN": admin,
            "USERSVC_ACCESS_LOG": "true",
            "USERSVC_LOG_LEVEL": "debug",
        },
    )
    auth = httpx.BasicAuth("alice", password)
    async with httpx.AsyncClient(base_url=base) as client:
        body = {"fullname": "Alice", "password": password}
        assert (await client.put("/user/alice", json=body)).status_code == 201
        assert (await client.put("/user/alice", json=body, auth=auth)).status_code == 200
        wrong = httpx.BasicAuth("alice", "wrong-" + password)
        assert (await client.delete("/user/alice", auth=wrong)).status_code == 401
        bearer = {"authorization": f"Bearer {admin}"}
        assert (await client.delete("/user/alice", headers=bearer)).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait(timeout=15) == 0
    log = proc.log_path.read_text()
    assert "PUT /user/alice" in log  # the access log did run
    encoded = base64.b64encode(f"alice:{password}".encode()).decode()
    for secret in (admin, password, encoded):
        assert secret not in log
