"""Shared fixtures: a real PostgreSQL, the usersvc app, and real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
import yaml

from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess, wait_http
from meshctl.envoy import EnvoyProxy
from meshctl.mesh import Mesh, MeshSettings, free_mesh_ports
from meshctl.postgres import LocalPostgres
from sds.config import Settings as SdsSettings
from sds.model import Endpoint, Source
from sds.server import SdsServer
from tests.fake_apiserver import FakeApiServer
from tests.xds_client import XdsClient
from usersvc.app import create_app
from usersvc.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

# Test sds servers guard writes the secure way, with this token; test usersvcs send it.
SDS_WRITE_TOKEN = secrets.token_urlsafe(24)
SDS_AUTH = {"authorization": f"Bearer {SDS_WRITE_TOKEN}"}
# The admin token of the ``usersvc`` fixture.
ADMIN_TOKEN = "test-admin-token-0123456789"


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
        server.discard()


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    """A fresh test Kubernetes API server (list/watch of EndpointSlices) on a random port."""
    server = FakeApiServer()
    await server.start()
    try:
        yield server
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
        server.discard()


@pytest.fixture
async def db_conn(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, to look behind the API."""
    conn = await asyncpg.connect(postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


def usersvc_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for a test usersvc; short timeouts so outages show quickly.

    The hashing queue and wait budget are long enough for the tests' bursts of concurrent
    requests on a busy machine; the tests of the bound itself set their own.
    """
    values: dict[str, Any] = {
        "database_url": database_url,
        "db_timeout": 2.0,
        # No gRPC API unless a test asks for one (on a free port): 5001 is one port for all.
        "grpc_port": 0,
        "hash_queue": 64,
        "hash_wait": 30.0,
        **overrides,
    }
    return Settings(**values)


class _QuietServer(uvicorn.Server):
    """uvicorn that leaves the test process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def serve_http(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port (lifespan run); yield its URL."""
    port = free_port()
    server = _QuietServer(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="on",
            server_header=False,
            proxy_headers=False,  # as usersvc runs: trusted proxies are the app's setting
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during start-up")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def clean_database(database_url: str) -> None:
    """Drop usersvc's tables so the next app starts from an empty schema."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS users, schema_migrations")
    finally:
        await conn.close()


@pytest.fixture
async def start_usersvc(postgres_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start usersvc apps served over real HTTP on loopback, on a clean database.

    ``await start_usersvc(**settings_overrides)`` gives an ``httpx.AsyncClient`` for it.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> httpx.AsyncClient:
            await clean_database(postgres_url)
            app = create_app(usersvc_settings(**{"database_url": postgres_url, **overrides}))
            base = await stack.enter_async_context(serve_http(app))
            return await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))

        yield start


@pytest.fixture
async def usersvc(start_usersvc: Callable[..., Any]) -> httpx.AsyncClient:
    """An HTTP client for a usersvc (admin token ``ADMIN_TOKEN``) on a clean database."""
    client: httpx.AsyncClient = await start_usersvc(admin_token=ADMIN_TOKEN)
    return client


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
            env={
                "DATABASE_URL": database_url,
                "USERSVC_DB_TIMEOUT": "2",
                "USERSVC_SDS_TOKEN": SDS_WRITE_TOKEN,
                "USERSVC_GRPC_PORT": "0",
                **(env or {}),
            },
        )
        started.append(proc)
        await proc.start()
        base = f"http://127.0.0.1:{port}"
        await wait_http(
            f"{base}/user/health" if wait_healthy else f"{base}/user/live",
            timeout=30,
            process=proc,
        )
        return proc, base

    yield start
    for proc in started:
        await proc.stop(timeout=5)


class RunningSds:
    """An in-process sds on loopback: its HTTP base URL and registry, for tests to drive."""

    def __init__(self, settings: SdsSettings) -> None:
        self.settings = settings
        self.server = SdsServer(settings)
        self.registry = self.server.registry
        scheme = "https" if settings.tls_cert_file else "http"
        self.url = f"{scheme}://127.0.0.1:{settings.http_port}"
        self.grpc_target = f"127.0.0.1:{settings.grpc_port}"
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.server.run(self._stop))

    async def started(self) -> None:
        """Wait until it answers HTTP; raise if it died instead."""
        # Whether it is up, not whom it is: tests of TLS check the certificate themselves.
        ready = asyncio.create_task(
            wait_http(f"{self.url}/healthcheck", timeout=10, verify=not self.settings.tls_cert_file)
        )
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()
            raise RuntimeError("sds stopped during start-up")
        ready.result()

    async def stop(self) -> None:
        """Shut it down as SIGTERM would, and wait for that to finish."""
        self._stop.set()
        await asyncio.wait_for(self._task, 15)


@pytest.fixture
async def start_sds() -> AsyncIterator[Callable[..., Any]]:
    """Start sds servers (HTTP and gRPC on free loopback ports); all stopped at teardown.

    Writes need ``SDS_WRITE_TOKEN`` (send ``SDS_AUTH``), and loopback hosts are admitted:
    every test backend listens on loopback.
    """
    running: list[RunningSds] = []

    async def start(**overrides: Any) -> RunningSds:
        values: dict[str, Any] = {
            "http_host": "127.0.0.1",
            "http_port": free_port(),
            "grpc_host": "127.0.0.1",
            "grpc_port": free_port(),
            "registration_warmup": 0.0,
            "write_token": SDS_WRITE_TOKEN,
            "allow_loopback": True,
            **overrides,
        }
        sds = RunningSds(SdsSettings(**values))
        running.append(sds)
        await sds.started()
        return sds

    yield start
    for sds in running:
        await sds.stop()


@dataclass
class SdsProcess:
    """An ``sds`` process started by :func:`sds_process`."""

    proc: ManagedProcess
    url: str
    grpc_target: str

    def log(self) -> str:
        """Everything the process has logged so far."""
        return self.proc.log_path.read_text()


@pytest.fixture
async def sds_process(run_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start real ``sds`` processes on free loopback ports; all stopped at teardown.

    ``start(*flags, env=..., scheme=..., ports=(http, grpc))`` adds flags and environment to
    the loopback addresses and ports (free ones unless given: a restart reuses them); it
    returns once ``/healthcheck`` answers.
    """
    started: list[ManagedProcess] = []

    async def start(
        *flags: str,
        env: dict[str, str] | None = None,
        scheme: str = "http",
        ports: tuple[int, int] | None = None,
    ) -> SdsProcess:
        http, grpc = ports or (free_port(), free_port())
        proc = ManagedProcess(
            f"sds-{len(started)}",
            [
                *(
                    sys.executable,
                    "-m",
                    "sds",
                    "--http-host",
                    "127.0.0.1",
                    "--http-port",
                    str(http),
                ),
                *("--grpc-host", "127.0.0.1", "--grpc-port", str(grpc), *flags),
            ],
            log_path=run_dir / f"sds-{len(started)}.log",
            env={"SDS_REGISTRATION_WARMUP": "0", **(env or {})},
        )
        started.append(proc)
        await proc.start()
        url = f"{scheme}://127.0.0.1:{http}"
        # Whether it is up, not whom it is: tests of TLS check the certificate themselves.
        await wait_http(f"{url}/healthcheck", timeout=20, process=proc, verify=scheme == "http")
        return SdsProcess(proc, url, f"127.0.0.1:{grpc}")

    yield start
    for proc in started:
        await proc.stop(timeout=10)


@pytest.fixture
async def sds(start_sds: Callable[..., Any]) -> RunningSds:
    """One sds with the registration source and default settings."""
    server: RunningSds = await start_sds()
    return server


def put(sds: RunningSds, service: str, *hosts: str, **fields: Any) -> None:
    """Make ``hosts`` (ip:port) the endpoints of ``service``, as a source would."""
    sds.registry.replace(
        Source.REGISTRATION,
        service,
        [
            Endpoint(h.split(":")[0], int(h.split(":")[1]), Source.REGISTRATION, **fields)
            for h in hosts
        ],
    )


@pytest.fixture
async def fast_sds(start_sds: Callable[..., Any]) -> RunningSds:
    """An sds that pushes xDS changes without a debounce window."""
    server: RunningSds = await start_sds(xds_debounce=0.0)
    return server


@pytest.fixture
async def open_client(fast_sds: RunningSds) -> AsyncIterator[Callable[..., XdsClient]]:
    """Open raw xDS streams to ``fast_sds``; all closed at teardown."""
    clients: list[XdsClient] = []

    def open_(**kwargs: Any) -> XdsClient:
        client = XdsClient(fast_sds.grpc_target, **kwargs)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


@pytest.fixture
async def start_envoy(run_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start real Envoys from config text; all stopped at teardown."""
    started: list[EnvoyProxy] = []

    async def start(name: str, config: str, admin_port: int) -> EnvoyProxy:
        proxy = EnvoyProxy(name, config, admin_port=admin_port, run_dir=run_dir)
        started.append(proxy)
        await proxy.start()
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


def backends_config(ports: list[int], admin_port: int) -> str:
    """One Envoy serving ``backend-<i>`` on each port (HTTP/1.1 and h2c), for traffic tests."""
    listeners = [
        {
            "name": f"backend-{i}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network"
                                ".http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": f"backend_{i}",
                                "codec_type": "AUTO",
                                "route_config": {
                                    "virtual_hosts": [
                                        {
                                            "name": "all",
                                            "domains": ["*"],
                                            "routes": [
                                                {
                                                    "match": {"prefix": "/"},
                                                    "direct_response": {
                                                        "status": 200,
                                                        "body": {"inline_string": f"backend-{i}"},
                                                    },
                                                }
                                            ],
                                        }
                                    ]
                                },
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions"
                                            ".filters.http.router.v3.Router"
                                        },
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        }
        for i, port in enumerate(ports)
    ]
    return yaml.safe_dump(
        {
            "admin": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
            },
            "static_resources": {"listeners": listeners},
        }
    )


@pytest.fixture
async def backends(start_envoy: Callable[..., Any]) -> list[int]:
    """Three HTTP backends on loopback; each answers its name (``backend-0`` ...)."""
    ports, admin = [free_port() for _ in range(3)], free_port()
    await start_envoy("backends", backends_config(ports, admin), admin)
    return ports


@pytest.fixture
async def start_mesh(tmp_path: Path, postgres_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start local meshes (meshctl's Mesh) on free ports; all stopped at teardown.

    ``await start_mesh(replicas)`` uses the session's PostgreSQL; ``own_postgres=True`` gives
    the mesh a PostgreSQL of its own, which the test may stop and start.
    """
    meshes: list[Mesh] = []

    async def start(replicas: int, *, own_postgres: bool = False) -> Mesh:
        settings = MeshSettings(
            run_dir=tmp_path / f"mesh{len(meshes)}",
            replicas=replicas,
            database_url="" if own_postgres else postgres_url,
            drain_seconds=1.0,
            say=lambda _: None,
            **free_mesh_ports(),
        )
        mesh = Mesh(settings)
        meshes.append(mesh)
        await mesh.start()
        return mesh

    yield start
    for mesh in meshes:
        await mesh.stop()


def echo_app(name: str) -> Any:
    """An ASGI app that answers every request with JSON saying who answered and what it got.

    Like the Gateway API conformance suite's echo server: the backend's name, the method,
    path, query string and headers as received.
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = {
            "backend": name,
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        }
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})

    return app


@pytest.fixture
async def echo_backends() -> AsyncIterator[Callable[..., Any]]:
    """Start echo servers (see :func:`echo_app`) on free loopback ports; ``await start(name)``
    returns the port. All stopped at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(name: str) -> int:
            url = await stack.enter_async_context(serve_http(echo_app(name)))
            return int(url.rsplit(":", 1)[1])

        yield start


@dataclass
class GatewayMesh:
    """An sds serving a config directory, and a real Envoy of one Gateway fed by it."""

    sds: RunningSds
    envoy: EnvoyProxy
    config_dir: Path
    port: int  # the Gateway listener's port (on 127.0.0.1)
    backends: dict[str, int] = field(default_factory=dict)  # registered service -> its port

    def ref(self, name: str, port: int | None = None, **extra: Any) -> dict[str, Any]:
        """A backendRef to registered service ``name`` on the port it registered."""
        return {"name": name, "port": port or self.backends.get(name, 8080), **extra}

    async def register(self, name: str, port: int) -> None:
        """Register ``127.0.0.1:port`` as service ``name`` (as its replica would)."""
        put(self.sds, name, f"127.0.0.1:{port}")
        self.backends[name] = port

    @property
    def url(self) -> str:
        """Where the Gateway's listener answers."""
        return f"http://127.0.0.1:{self.port}"

    def write(self, name: str, text: str) -> None:
        """Write (atomically) one file of the config directory."""
        target = self.config_dir / name
        partial = self.config_dir / f".{name}.partial"
        partial.write_text(text)
        partial.replace(target)

    def remove(self, name: str) -> None:
        """Delete one file of the config directory."""
        (self.config_dir / name).unlink()


def gateway_yaml(port: int, name: str = "edge", namespace: str = "default", **extra: Any) -> str:
    """A Gateway of our class on 127.0.0.1 with one HTTP listener ``http`` on ``port``."""
    listener = {"name": "http", "port": port, "protocol": "HTTP", **extra}
    return yaml.safe_dump(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "gatewayClassName": "envoymesh",
                "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
                "listeners": [listener],
            },
        }
    )


@pytest.fixture
async def start_gateway(
    tmp_path: Path, start_sds: Callable[..., Any], start_envoy: Callable[..., Any]
) -> Callable[..., Any]:
    """Start an sds over a fresh config directory holding Gateway ``default/edge``, and a
    real Envoy bootstrapped by ``sds bootstrap`` for it (``delta=True`` for incremental xDS).
    """
    from sds.bootstrap import envoy_bootstrap  # noqa: PLC0415 - only these tests need it

    async def start(*, delta: bool = False, **overrides: Any) -> GatewayMesh:
        config_dir = tmp_path / f"config-{free_port()}"
        config_dir.mkdir()
        port = free_port()
        (config_dir / "gateway.yaml").write_text(gateway_yaml(port))
        sds: RunningSds = await start_sds(config_dir=str(config_dir), xds_debounce=0.0, **overrides)
        admin = free_port()
        bootstrap = envoy_bootstrap(
            "default/edge", sds.grpc_target, node_id=f"edge-{admin}", admin_port=admin, delta=delta
        )
        envoy = await start_envoy(f"edge-{admin}", json.dumps(bootstrap), admin)
        return GatewayMesh(sds, envoy, config_dir, port)

    return start


def named_grpc_handler(name: str) -> Any:
    """A gRPC handler answering every unary method with ``name`` (raw bytes): who answered."""
    import grpc  # noqa: PLC0415 - only the gRPC tests need it

    async def answer(request: bytes, context: Any) -> bytes:
        return name.encode()

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(answer)

    return Handler()


@pytest.fixture
async def grpc_backends() -> AsyncIterator[Callable[..., Any]]:
    """Start gRPC servers on free loopback ports, each answering every method with its name
    (see :func:`named_grpc_handler`); ``await start(name)`` returns the port, and
    ``await start(name, credentials)`` serves with those server credentials (TLS)."""
    import grpc  # noqa: PLC0415

    servers: list[Any] = []

    async def start(name: str, credentials: grpc.ServerCredentials | None = None) -> int:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((named_grpc_handler(name),))
        if credentials is None:
            port = int(server.add_insecure_port("127.0.0.1:0"))
        else:
            port = int(server.add_secure_port("127.0.0.1:0", credentials))
        await server.start()
        servers.append(server)
        return port

    yield start
    await asyncio.gather(*(server.stop(grace=None) for server in servers))


class GrpcCaller:
    """A proxyless gRPC client process (``tests/grpc_client.py``) and every call it made."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.calls: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.calls.append(json.loads(line))

    async def next_calls(self, count: int, deadline: float = 20.0) -> list[dict[str, Any]]:
        """The next ``count`` calls it makes."""
        start = len(self.calls)
        async with asyncio.timeout(deadline):
            while len(self.calls) < start + count:
                if self._reader.done():
                    raise RuntimeError(f"gRPC client exited: {self.calls[-3:]}")
                await asyncio.sleep(0.02)
        return self.calls[start : start + count]

    async def until(
        self, check: Callable[[list[dict[str, Any]]], bool], window: int = 20, deadline: float = 20
    ) -> None:
        """Wait until ``check`` holds for its last ``window`` calls."""
        async with asyncio.timeout(deadline):
            while True:
                calls = await self.next_calls(window, deadline)
                if check(calls):
                    return

    async def stop(self) -> None:
        """Close its stdin (it stops calling) and wait for it to exit."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def grpc_clients() -> AsyncIterator[Callable[..., Any]]:
    """Start proxyless gRPC client processes: ``await start(bootstrap_json, target, *methods,
    header=("name", "value"))`` calls ``xds:///target`` in a loop; ``tls=True`` gives its
    channel xDS credentials, so the Clusters' TLS applies. All stopped at teardown."""
    started: list[GrpcCaller] = []
    script = str(Path(__file__).with_name("grpc_client.py"))

    async def start(
        bootstrap: str,
        target: str,
        *methods: str,
        header: tuple[str, str] | None = None,
        tls: bool = False,
    ) -> GrpcCaller:
        extra = ["--header", f"{header[0]}={header[1]}"] if header else []
        if tls:
            extra.append("--tls")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            target,
            *methods,
            *extra,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap},
        )
        caller = GrpcCaller(proc)
        started.append(caller)
        return caller

    yield start
    await asyncio.gather(*(caller.stop() for caller in started))
