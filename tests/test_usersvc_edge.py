"""usersvc behind the real edge and sidecar Envoys: what the edge retries, and what it never does.

Run under the heavy lock (each test starts a mesh of Envoys and usersvc processes).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meshctl.mesh import Mesh

pytestmark = pytest.mark.slow


async def edge_counter(mesh: Mesh, name: str) -> int:
    """One counter of the edge Envoy's usersvc cluster (``cluster.<cluster>.<name>``)."""
    assert mesh.edge.proxy is not None
    stat = f"cluster.{mesh.usersvc_cluster}.{name}"
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{mesh.edge.proxy.admin_url}/stats",
            params={"filter": f"^{stat}$", "format": "json"},
        )
    values = [s["value"] for s in response.json()["stats"] if s.get("name") == stat]
    return int(values[0]) if values else 0


async def put_many(mesh: Mesh, prefix: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.put(f"/user/{prefix}-{i}", json={"fullname": "F", "password": f"p{i}"})
                for i in range(count)
            )
        )


async def test_edge_never_retries_a_503_that_usersvc_answered(
    start_mesh: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No wait budget: a replica admits only as many sign-ups as it has hashing slots (one on
    # two CPUs) and refuses the rest, however fast this machine hashes. The replicas inherit
    # this environment (meshctl adds its own variables to it).
    monkeypatch.setenv("USERSVC_HASH_WAIT", "0")
    mesh: Mesh = await start_mesh(2)
    before = await edge_counter(mesh, "upstream_rq_retry")
    replies = await put_many(mesh, "busy", 60)
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {201, 503}, statuses
    for busy in (r for r in replies if r.status_code == 503):
        assert busy.json()["ok"] is False  # usersvc's answer, not the edge's
        assert int(busy.headers["retry-after"]) >= 1
    assert await edge_counter(mesh, "upstream_rq_retry") == before
    # Shedding load is not failing: both replicas stay in rotation.
    await mesh.wait_edge_hosts(2, timeout=5)


async def test_edge_retries_a_put_elsewhere_when_a_replica_cannot_be_reached(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(2)
    victim = mesh.replicas[2]
    assert victim.usersvc.proc is not None
    # Its sidecar stays up and answers 503 for it: marked unreachable, retried elsewhere.
    victim.usersvc.proc.send_signal(signal.SIGKILL)
    await victim.usersvc.proc.wait(timeout=10)
    before = await edge_counter(mesh, "upstream_rq_retry")
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as client:
        for i in range(6):
            response = await client.put(
                f"/user/retried-{i}", json={"fullname": "F", "password": "pw"}
            )
            assert response.status_code == 201, response.text
            assert response.json()["resolvedname"] == mesh.replicas[1].at.address
            assert "x-envoymesh-unreachable" not in response.headers
    assert await edge_counter(mesh, "upstream_rq_retry") > before


async def test_through_the_edge_a_client_cannot_forge_its_way_past_the_login_limit(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(1)
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=30) as client:
        # Its own name: the mesh shares the session's database with the demo's alice.
        await client.put("/user/carroll", json={"fullname": "Carroll", "password": "right"})
        for i in range(10):
            forged = {"x-forwarded-for": f"203.0.113.{i}"}
            response = await client.post(
                "/user/carroll/login", json={"password": "guess"}, headers=forged
            )
            assert response.status_code == 401
        forged = {"x-forwarded-for": "198.51.100.1"}
        limited = await client.post(
            "/user/carroll/login", json={"password": "right"}, headers=forged
        )
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0


async def serving_hosts(mesh: Mesh) -> set[str]:
    assert mesh.edge.proxy is not None
    hosts = (await mesh.edge.proxy.clusters()).get(mesh.usersvc_cluster, [])
    return {h.address for h in hosts if h.serving}


async def test_database_outage_under_traffic_replicas_leave_the_edge_and_come_back(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(2, own_postgres=True)
    assert mesh.postgres is not None
    replicas = {r.at.address for r in mesh.replicas.values()}
    statuses: list[tuple[str, int]] = []  # (phase, status)
    phase = "before"
    done = asyncio.Event()

    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=10) as client:
            while not done.is_set():
                try:
                    status = (await client.get("/user/alice")).status_code
                except httpx.HTTPError:
                    status = 0
                statuses.append((phase, status))
                await asyncio.sleep(0.02)

    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=10) as client:
        created = await client.put("/user/alice", json={"fullname": "Alice", "password": "pw"})
        assert created.status_code == 201
    worker = asyncio.create_task(traffic())
    try:
        await asyncio.sleep(0.5)
        phase = "outage"
        await mesh.postgres.stop()
        async with asyncio.timeout(20):
            while await serving_hosts(mesh):
                await asyncio.sleep(0.1)
        phase = "restart"
        await mesh.postgres.start()
        async with asyncio.timeout(30):
            while await serving_hosts(mesh) != replicas:
                await asyncio.sleep(0.1)
        phase = "after"
        await asyncio.sleep(1.0)
    finally:
        done.set()
        await worker
    assert {s for p, s in statuses if p == "before"} == {200}
    assert {s for p, s in statuses if p == "after"} == {200}
    assert any(s == 503 for p, s in statuses if p == "outage")
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=10) as client:
        assert (await client.get("/user/alice")).json()["uuid"] == created.json()["uuid"]
