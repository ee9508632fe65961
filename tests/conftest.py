"""Shared fixtures: a real PostgreSQL, the usersvc app, and real server processes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from envoymesh.procs import ManagedProcess, wait_http
from meshctl.postgres import LocalPostgres, free_port
from sds.config import Settings as SdsSettings
from sds.server import SdsServer
from usersvc.app import create_app
from usersvc.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
async def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A real PostgreSQL for the session: ``$DATABASE_URL`` or a private server."""
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"))
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[LocalPostgres]:
    """A PostgreSQL server of the test's own, which the test may stop and restart."""
    server = LocalPostgres(tmp_path / "pg")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def db_conn(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, to look behind the API."""
    conn = await asyncpg.connect(postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


def usersvc_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for a test usersvc; short timeouts so outages show quickly."""
    values: dict[str, Any] = {"database_url": database_url, "db_timeout": 2.0, **overrides}
    return Settings(**values)


@pytest.fixture
async def usersvc(postgres_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client wired to the usersvc ASGI app (lifespan run) on a clean database."""
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS users, schema_migrations")
    finally:
        await conn.close()
    app = create_app(usersvc_settings(postgres_url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://usersvc"
        ) as client,
    ):
        yield client


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Where a test's server processes write their logs."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
async def usersvc_process(run_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start real ``usersvc`` processes (uvicorn) on free ports; all stopped at teardown."""
    started: list[ManagedProcess] = []

    async def start(
        database_url: str, *, wait_healthy: bool = True, env: dict[str, str] | None = None
    ) -> tuple[ManagedProcess, str]:
        port = free_port()
        proc = ManagedProcess(
            f"usersvc-{len(started)}",
            [sys.executable, "-m", "usersvc", "--host", "127.0.0.1", "--port", str(port)],
            log_path=run_dir / f"usersvc-{len(started)}.log",
            env={"DATABASE_URL": database_url, "USERSVC_DB_TIMEOUT": "2", **(env or {})},
        )
        started.append(proc)
        await proc.start()
        base = f"http://127.0.0.1:{port}"
        await wait_http(
            f"{base}/user/health" if wait_healthy else f"{base}/openapi.json",
            timeout=30,
            process=proc,
        )
        return proc, base

    yield start
    for proc in started:
        await proc.stop(timeout=5)


class RunningSds:
    """An in-process sds on loopback: its HTTP base URL and registry, for tests to drive."""

    def __init__(self, server: SdsServer, settings: SdsSettings) -> None:
        self.server = server
        self.settings = settings
        self.registry = server.registry
        self.url = f"http://127.0.0.1:{settings.http_port}"
        self.grpc_target = f"127.0.0.1:{settings.grpc_port}"


@pytest.fixture
async def start_sds() -> AsyncIterator[Callable[..., Any]]:
    """Start sds servers (HTTP and gRPC on free loopback ports); all stopped at teardown."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> RunningSds:
        values: dict[str, Any] = {
            "http_host": "127.0.0.1",
            "http_port": free_port(),
            "grpc_host": "127.0.0.1",
            "grpc_port": free_port(),
            **overrides,
        }
        settings = SdsSettings(**values)
        server = SdsServer(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(server.run(stop))
        running.append((stop, task))
        sds = RunningSds(server, settings)
        ready = asyncio.create_task(wait_http(f"{sds.url}/healthcheck", timeout=10))
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
            raise RuntimeError("sds stopped during start-up")
        ready.result()
        return sds

    yield start
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def sds(start_sds: Callable[..., Any]) -> RunningSds:
    """One sds with the registration source and default settings."""
    server: RunningSds = await start_sds()
    return server
