"""The mesh on one machine, end to end: real PostgreSQL, Envoy, sds and usersvc replicas."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from envoymesh.procs import ManagedProcess
from meshctl.mesh import Mesh, free_mesh_ports

pytestmark = pytest.mark.slow

# alice's credentials: creating her ignores them; where she exists, they make the PUT an update.
ALICE_AUTH = ("alice", "pw")


async def get_alice(client: httpx.AsyncClient) -> str:
    response = await client.get("/user/alice")
    assert response.status_code == 200, response.text
    return str(response.json()["resolvedname"])


async def test_edge_round_robins_over_three_replicas(start_mesh: Callable[..., Any]) -> None:
    mesh: Mesh = await start_mesh(3)
    async with httpx.AsyncClient(base_url=mesh.edge_url) as client:
        await client.put(
            "/user/alice", json={"fullname": "Alice", "password": "pw"}, auth=ALICE_AUTH
        )
        seen = Counter([await get_alice(client) for _ in range(12)])
    assert seen == {r.at.address: 4 for r in mesh.replicas.values()}


async def test_added_replica_gets_traffic_within_a_second_of_registering(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(3)
    async with (
        httpx.AsyncClient(base_url=mesh.edge_url) as edge,
        httpx.AsyncClient(base_url=mesh.sds_url) as sds,
    ):
        await edge.put("/user/alice", json={"fullname": "Alice", "password": "pw"}, auth=ALICE_AUTH)
        scaling = asyncio.create_task(mesh.scale(4))
        async with asyncio.timeout(60):
            while len((await sds.get("/v1/registration/usersvc")).json()["hosts"]) < 4:
                await asyncio.sleep(0.01)
        registered = asyncio.get_running_loop().time()
        newest = mesh.replicas[max(mesh.replicas)].at.address
        async with asyncio.timeout(1.0):
            while await get_alice(edge) != newest:
                pass
        assert asyncio.get_running_loop().time() - registered < 1.0
        await scaling


async def test_scaling_down_under_steady_load_fails_no_request(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(3)
    outcomes: Counter[int] = Counter()
    done = asyncio.Event()

    async def steady_gets() -> None:
        async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=10) as client:
            while not done.is_set():
                try:
                    outcomes[(await client.get("/user/health")).status_code] += 1
                except httpx.HTTPError:
                    outcomes[0] += 1

    workers = [asyncio.create_task(steady_gets()) for _ in range(4)]
    await asyncio.sleep(0.5)
    await mesh.scale(1)
    await asyncio.sleep(0.5)
    done.set()
    await asyncio.gather(*workers)
    assert set(outcomes) == {200}, outcomes
    assert outcomes[200] > 50


async def test_killed_replica_is_ejected_after_a_bounded_number_of_failures(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(3)
    victim = mesh.replicas[2]
    assert victim.sidecar.proxy is not None
    assert victim.usersvc.proc is not None
    victim.sidecar.proxy.process.send_signal(signal.SIGKILL)
    victim.usersvc.proc.send_signal(signal.SIGKILL)
    failures = 0
    async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=10) as client:
        for _ in range(30):
            if (await client.get("/user/health")).status_code != 200:
                failures += 1
        assert failures <= 3
        hosts = await mesh.edge.proxy.clusters() if mesh.edge.proxy else {}
        [dead] = [h for h in hosts[mesh.usersvc_cluster] if h.address == victim.at.address]
        assert dead.ejected
        statuses = [(await client.get("/user/health")).status_code for _ in range(30)]
    assert statuses == [200] * 30


async def test_users_written_through_the_edge_are_readable_on_every_replica(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(3)
    async with httpx.AsyncClient() as client:
        put = await client.put(
            f"{mesh.edge_url}/user/carol",
            json={"fullname": "Carol", "password": "pw"},
            auth=("carol", "pw"),
        )
        assert put.status_code in (200, 201)
        for replica in mesh.replicas.values():
            direct = f"http://{replica.at.address}:{replica.at.usersvc_port}/user/carol"
            sidecar = f"http://{replica.at.address}:{replica.at.sidecar_port}/user/carol"
            for url in (direct, sidecar):
                body = (await client.get(url)).json()
                assert body["uuid"] == put.json()["uuid"]
                assert body["resolvedname"] == replica.at.address


def meshctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshctl", *args]


def port_args(ports: dict[str, int]) -> list[str]:
    return [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]


async def run(argv: list[str], log: Path, timeout: float = 60) -> tuple[int, str]:
    proc = ManagedProcess(argv[2], argv, log_path=log)
    await proc.start()
    code = await proc.wait(timeout=timeout)
    return code, log.read_text()


async def test_meshctl_up_scale_status_proxy_status_and_clean_stop(
    tmp_path: Path, postgres_url: str
) -> None:
    ports = free_mesh_ports()
    run_dir = tmp_path / "up"
    up = ManagedProcess(
        "meshctl-up",
        meshctl("up", "--replicas=1", f"--run-dir={run_dir}", *port_args(ports)),
        log_path=tmp_path / "up.out",
        env={"DATABASE_URL": postgres_url},
    )
    await up.start()
    try:
        async with asyncio.timeout(60):
            while not (run_dir / "mesh.json").exists():
                assert up.running(), up.tail()
                await asyncio.sleep(0.1)
        code, out = await run(
            meshctl("scale", "usersvc", "2", f"--run-dir={run_dir}"), tmp_path / "s"
        )
        assert code == 0, out
        code, out = await run(meshctl("status", f"--run-dir={run_dir}"), tmp_path / "st")
        assert code == 0, out
        assert "usersvc-2" in out
        assert "stopped" not in out
        sds = json.loads((run_dir / "mesh.json").read_text())["sds"]
        code, out = await run(meshctl("proxy-status", f"--sds={sds}"), tmp_path / "p")
        assert code == 0, out
        assert "SYNCED" in out
    finally:
        up.send_signal(signal.SIGTERM)
        assert await up.wait(timeout=60) == 0, up.tail()
    assert not (run_dir / "mesh.json").exists()
    # Every listener is gone: a server could bind each port again (as servers do, with
    # SO_REUSEADDR, since closed connections may linger in TIME_WAIT).
    for port in (ports["edge_port"], ports["sds_http_port"], ports["edge_admin_port"]):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


async def test_supervisor_restarts_a_component_that_dies(start_mesh: Callable[..., Any]) -> None:
    mesh: Mesh = await start_mesh(1)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(mesh.supervise(stop))
    try:
        replica = mesh.replicas[1]
        assert replica.usersvc.proc is not None
        replica.usersvc.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(30):
            while not (replica.usersvc.restarts == 1 and replica.usersvc.running()):
                await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=mesh.edge_url) as client, asyncio.timeout(30):
            while (await client.get("/user/health")).status_code != 200:
                await asyncio.sleep(0.1)
        [row] = [r for r in mesh.status() if r.component == "usersvc-1"]
        assert (row.state, row.restarts) == ("running", 1)
    finally:
        stop.set()
        await supervisor


async def test_edge_keeps_every_replica_while_sds_restarts(start_mesh: Callable[..., Any]) -> None:
    mesh: Mesh = await start_mesh(2)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(mesh.supervise(stop))
    try:
        assert mesh.sds.proc is not None
        mesh.sds.proc.send_signal(signal.SIGKILL)
        seen: Counter[str] = Counter()
        async with httpx.AsyncClient(base_url=mesh.edge_url, timeout=10) as client:
            await client.put(
                "/user/alice", json={"fullname": "Alice", "password": "pw"}, auth=ALICE_AUTH
            )
            async with asyncio.timeout(60):
                while mesh.sds.restarts == 0 or not mesh.sds.running():
                    seen[await get_alice(client)] += 1
                    await asyncio.sleep(0.02)
            # Through the new sds's warm-up and past it, both replicas keep serving.
            loop = asyncio.get_running_loop()
            until = loop.time() + mesh.heartbeat_interval + 2
            while loop.time() < until:
                seen[await get_alice(client)] += 1
                await asyncio.sleep(0.02)
        assert set(seen) == {r.at.address for r in mesh.replicas.values()}
        await mesh.wait_edge_hosts(2)
    finally:
        stop.set()
        await supervisor


async def test_mesh_sds_takes_writes_only_with_its_generated_token(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(1)
    token_file = mesh.write_token_file
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    weight = {"load_balancing_weight": "50"}
    async with httpx.AsyncClient(base_url=mesh.sds_url) as sds:
        anonymous = await sds.post("/v1/loadbalancing/usersvc", data=weight)
        assert anonymous.status_code == 401
        allowed = await sds.post(
            "/v1/loadbalancing/usersvc", data=weight, headers={"authorization": f"Bearer {token}"}
        )
        assert allowed.status_code == 204
        [host] = (await sds.get("/v1/registration/usersvc")).json()["hosts"]
    assert host["tags"]["load_balancing_weight"] == 50
    assert host["ip_address"].startswith("127.")  # admitted by --allow-loopback
    assert token not in (mesh.run_dir / "logs" / "sds.log").read_text()
