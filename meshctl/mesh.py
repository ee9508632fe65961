"""The whole tutorial mesh on one machine, supervised: what ``meshctl up`` runs.

PostgreSQL, sds (registration source), N usersvc replicas each behind its own sidecar Envoy,
and the edge Envoy on 127.0.0.1:8000 that learns the replicas only through sds. Each replica
gets its own loopback address, so ``resolvedname`` tells replicas apart as pod IPs do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from envoymesh.envoyconf import render
from envoymesh.ports import free_port, free_port_block
from envoymesh.procs import ManagedProcess, wait_http
from meshctl.addresses import ReplicaAddress, loopback_aliases_work, replica_address
from meshctl.envoy import EnvoyProxy
from meshctl.postgres import LocalPostgres, PostgresError
from sds.bootstrap import envoy_bootstrap, grpc_bootstrap

# A component that keeps dying is restarted at most this often.
RESTART_MIN_INTERVAL = 2.0


@dataclass
class MeshSettings:
    """Addresses, ports and tunables of a local mesh."""

    run_dir: Path
    replicas: int = 3
    edge_port: int = 8000
    edge_admin_port: int = 8001
    control_port: int = 8002
    sds_http_port: int = 8080
    sds_grpc_port: int = 18000
    usersvc_port: int = 5000
    # usersvc's gRPC API (registered as usersvc-grpc); like usersvc_port, the first of a block.
    usersvc_grpc_port: int = 5100
    sidecar_port: int = 10000
    admin_base: int = 9900
    database_url: str = ""
    # One interval for both sides: replicas heartbeat at it, sds derives its host TTL (3x) and
    # warm-up (2.5x) from it. Short, so a killed replica leaves the mesh within 15 s.
    heartbeat_interval: float = 5.0
    drain_seconds: float = 1.0
    # How the edge gets its configuration: "gateway" (everything from sds: a Gateway and an
    # HTTPRoute in sds's config directory, through an `sds bootstrap` bootstrap), or the
    # tutorial's static edge with EDS from sds over "ads" or "rest".
    edge: str = "gateway"
    say: Callable[[str], None] = field(default=print)


# The settings that are ports; the per-replica ones are the first of a block of ports.
PORT_FIELDS = ("edge_port", "edge_admin_port", "control_port", "sds_http_port", "sds_grpc_port")
REPLICA_PORT_FIELDS = ("usersvc_port", "usersvc_grpc_port", "sidecar_port", "admin_base")


def free_mesh_ports(max_replicas: int = 20) -> dict[str, int]:
    """Ports for one more mesh on this machine (tests, benchmarks): free right now, and room
    for ``max_replicas`` replicas in each per-replica block.

    Nothing listens on any of them yet, so each is also kept out of the others' blocks: a
    control port inside the admin block would meet a replica's Envoy there.
    """
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for name in REPLICA_PORT_FIELDS:
        block: set[int] = set()
        while not block or block & taken:
            base = free_port_block(max_replicas + 1)
            block = set(range(base, base + max_replicas + 1))
        taken |= block
        ports[name] = base
    for name in PORT_FIELDS:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        ports[name] = port
    return ports


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    """One row of ``meshctl status``."""

    component: str
    address: str
    pid: int | None
    state: str
    restarts: int


class _Supervised:
    """A process the mesh restarts when it dies unexpectedly."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.restarts = 0
        self.last_start = 0.0

    def process(self) -> ManagedProcess | None:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        proc = self.process()
        return proc is not None and proc.running()

    def status(self) -> ComponentStatus:
        proc = self.process()
        return ComponentStatus(
            self.name,
            self.address,
            proc.pid if proc else None,
            "running" if self.running() else "stopped",
            self.restarts,
        )


class _Process(_Supervised):
    def __init__(self, name: str, address: str, make: Callable[[], ManagedProcess]) -> None:
        super().__init__(name, address)
        self._make = make
        self.proc: ManagedProcess | None = None

    def process(self) -> ManagedProcess | None:
        return self.proc

    async def start(self) -> None:
        self.last_start = time.monotonic()
        self.proc = self._make()
        await self.proc.start()


class _Envoy(_Supervised):
    def __init__(self, name: str, address: str, make: Callable[[], EnvoyProxy]) -> None:
        super().__init__(name, address)
        self._make = make
        self.proxy: EnvoyProxy | None = None

    def process(self) -> ManagedProcess | None:
        return self.proxy.process if self.proxy else None

    async def start(self) -> None:
        self.last_start = time.monotonic()
        self.proxy = self._make()
        await self.proxy.start()


class Replica:
    """One usersvc and its sidecar Envoy, on the replica's own address."""

    def __init__(self, mesh: Mesh, at: ReplicaAddress) -> None:
        self.at = at
        settings = mesh.settings
        sidecar_config = render(
            "sidecar",
            {
                "NODE_ID": f"{at.name}-sidecar",
                "LISTEN_ADDRESS": at.address,
                "LISTEN_PORT": at.sidecar_port,
                "ADMIN_PORT": at.admin_port,
                "APP_ADDRESS": at.address,
                "APP_PORT": at.usersvc_port,
            },
        )
        logs = settings.run_dir / "logs"
        self.sidecar = _Envoy(
            f"{at.name}-sidecar",
            f"{at.address}:{at.sidecar_port}",
            lambda: EnvoyProxy(
                f"{at.name}-sidecar",
                sidecar_config,
                admin_port=at.admin_port,
                run_dir=logs,
                concurrency=1,
            ),
        )
        env = {
            "DATABASE_URL": mesh.database_url,
            "POD_NAME": at.name,
            "POD_IP": at.address,
            "USERSVC_HOST": at.address,
            "USERSVC_PORT": str(at.usersvc_port),
            # Offset from its block's start as the HTTP port is from its own.
            "USERSVC_GRPC_PORT": str(
                settings.usersvc_grpc_port + at.usersvc_port - settings.usersvc_port
            ),
            "USERSVC_SDS_URL": mesh.sds_url,
            "USERSVC_SDS_TOKEN": mesh.write_token,
            "USERSVC_REGISTER_PORT": str(at.sidecar_port),
            "USERSVC_REGISTER_INTERVAL": str(mesh.heartbeat_interval),
            "USERSVC_DRAIN_SECONDS": str(settings.drain_seconds),
            # Only the sidecar, which connects from the replica's address, is believed when it
            # passes on the X-Forwarded-For the edge wrote.
            "USERSVC_TRUSTED_PROXIES": at.address,
        }
        self.usersvc = _Process(
            at.name,
            f"{at.address}:{at.usersvc_port}",
            lambda: ManagedProcess(
                at.name,
                [sys.executable, "-m", "usersvc"],
                log_path=logs / f"{at.name}.log",
                env=env,
            ),
        )

    @property
    def health_url(self) -> str:
        return f"http://{self.at.address}:{self.at.usersvc_port}/user/health"

    async def start(self) -> None:
        """Sidecar first, so the replica is reachable the moment it registers."""
        await self.sidecar.start()
        await self.usersvc.start()
        await wait_http(self.health_url, timeout=60, process=self.usersvc.proc)

    async def stop(self, drain: float) -> None:
        """usersvc deregisters and drains on SIGTERM; the sidecar goes once it has finished."""
        if self.usersvc.proc is not None:
            await self.usersvc.proc.stop(timeout=drain + 15)
        if self.sidecar.proxy is not None:
            await self.sidecar.proxy.stop()


class Mesh:
    """Starts, supervises, scales and stops the local mesh."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._aliases = loopback_aliases_work()
        self.postgres: LocalPostgres | None = None
        self.database_url = settings.database_url
        self.sds_url = f"http://127.0.0.1:{settings.sds_http_port}"
        # Writes to sds need a token even here; this one lives as long as the mesh. In the
        # environment, not the command line, where `ps` would show it.
        self.write_token = secrets.token_urlsafe(32)
        self.write_token_file = self.run_dir / "sds-write-token"
        # GRPC_XDS_BOOTSTRAP for proxyless gRPC clients: xds:///usersvc-grpc, no Envoy.
        self.grpc_bootstrap_file = self.run_dir / "grpc-bootstrap.json"
        self.edge_url = f"http://127.0.0.1:{settings.edge_port}"
        self.replicas: dict[int, Replica] = {}
        # The Gateway edge names a Service port, the same on every replica: that needs each
        # replica on an address of its own (Linux). Elsewhere the static EDS edge serves.
        self.edge_kind = settings.edge if settings.edge != "gateway" or self._aliases else "ads"
        self.config_dir = self.run_dir / "config"
        self.heartbeat_interval = settings.heartbeat_interval
        self._lock = asyncio.Lock()
        logs = self.run_dir / "logs"
        self.sds = _Process(
            "sds",
            f"127.0.0.1:{settings.sds_http_port} (gRPC {settings.sds_grpc_port})",
            lambda: ManagedProcess(
                "sds",
                [
                    sys.executable,
                    "-m",
                    "sds",
                    "--source",
                    "registration",
                    "--http-host",
                    "127.0.0.1",
                    "--http-port",
                    str(settings.sds_http_port),
                    "--grpc-host",
                    "127.0.0.1",
                    "--grpc-port",
                    str(settings.sds_grpc_port),
                    # The host TTL and the restart warm-up follow from it.
                    "--heartbeat-interval",
                    str(settings.heartbeat_interval),
                    # Every replica lives on a loopback address.
                    "--allow-loopback",
                    "--config-dir",
                    str(self.config_dir),
                ],
                log_path=logs / "sds.log",
                env={"SDS_WRITE_TOKEN": self.write_token},
            ),
        )
        self.edge = _Envoy(
            "edge-envoy",
            f"127.0.0.1:{settings.edge_port} (admin {settings.edge_admin_port})",
            lambda: EnvoyProxy(
                "edge-envoy",
                self._edge_config(),
                admin_port=settings.edge_admin_port,
                run_dir=logs,
                # One worker: round-robin then cycles exactly, even over new connections.
                concurrency=1,
            ),
        )

    def _save_write_token(self) -> None:
        """Leave the token where the mesh's owner, and only they, can use it with curl."""
        self.write_token_file.unlink(missing_ok=True)
        fd = os.open(self.write_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.write_token + "\n")

    def _save_grpc_bootstrap(self) -> None:
        """The gRPC xDS bootstrap (``sds bootstrap --grpc``) of a client of this mesh's sds."""
        bootstrap = grpc_bootstrap(f"127.0.0.1:{self.settings.sds_grpc_port}", node_id="grpc")
        self.grpc_bootstrap_file.write_text(json.dumps(bootstrap, indent=2) + "\n")

    @property
    def usersvc_cluster(self) -> str:
        """The edge's cluster of usersvc replicas (as Envoy's admin API names it)."""
        if self.edge_kind == "gateway":
            return f"default/usersvc/{self.settings.sidecar_port}"
        return "usersvc"

    def write_config(self) -> None:
        """sds's config directory: the edge Gateway, the usersvc Service and its route."""
        s = self.settings
        self.config_dir.mkdir(parents=True, exist_ok=True)
        documents = {
            "gateway.yaml": {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "edge", "namespace": "default"},
                "spec": {
                    "gatewayClassName": "envoymesh",
                    "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
                    "listeners": [{"name": "http", "port": s.edge_port, "protocol": "HTTP"}],
                },
            },
            # The replicas register their sidecars, which speak HTTP/2 to the edge.
            "usersvc-service.yaml": {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "usersvc", "namespace": "default"},
                "spec": {
                    "ports": [
                        {"name": "http", "port": s.sidecar_port, "appProtocol": "kubernetes.io/h2c"}
                    ]
                },
            },
            "usersvc-route.yaml": {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "usersvc", "namespace": "default"},
                "spec": {
                    "parentRefs": [{"name": "edge"}],
                    "rules": [
                        {
                            "matches": [{"path": {"type": "PathPrefix", "value": "/user"}}],
                            "backendRefs": [{"name": "usersvc", "port": s.sidecar_port}],
                        }
                    ],
                },
            },
        }
        for name, document in documents.items():
            path = self.config_dir / name
            if not path.exists():  # the owner's edits to a running mesh's routes stay
                path.write_text(yaml.safe_dump(document, sort_keys=False))

    def _edge_config(self) -> str:
        s = self.settings
        if self.edge_kind == "gateway":
            bootstrap = envoy_bootstrap(
                "default/edge",
                f"127.0.0.1:{s.sds_grpc_port}",
                node_id="edge",
                admin_port=s.edge_admin_port,
            )
            return json.dumps(bootstrap, indent=2)
        values: dict[str, object] = {
            "NODE_ID": "edge",
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": s.edge_port,
            "ADMIN_PORT": s.edge_admin_port,
            "SERVICE_NAME": "usersvc",
            "SDS_ADDRESS": "127.0.0.1",
            "SDS_GRPC_PORT": s.sds_grpc_port,
            "SDS_HTTP_PORT": s.sds_http_port,
            "ADS_API_TYPE": "GRPC",
            "REFRESH_DELAY": "1s",
        }
        return render("edge-eds-rest" if self.edge_kind == "rest" else "edge-eds", values)

    def _address(self, index: int) -> ReplicaAddress:
        s = self.settings
        return replica_address(
            index,
            aliases=self._aliases,
            usersvc_port=s.usersvc_port,
            sidecar_port=s.sidecar_port,
            admin_base=s.admin_base,
        )

    # ----- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything and wait until the edge balances over every replica."""
        say = self.settings.say
        if not self.database_url:
            self.postgres = LocalPostgres(self.run_dir / "postgres")
            say(f"  starting PostgreSQL ({self.postgres.bindir}) ...")
            await self.postgres.start()
            self.database_url = self.postgres.url
        if self.edge_kind == "gateway":
            self.write_config()
        say("  starting sds ...")
        await asyncio.to_thread(self._save_write_token)
        await asyncio.to_thread(self._save_grpc_bootstrap)
        await self.sds.start()
        await wait_http(f"{self.sds_url}/healthcheck", timeout=30, process=self.sds.proc)
        # Replicas first: the edge then finds them registered and is ready at once.
        await self.scale(self.settings.replicas, wait_edge=False)
        say("  starting the edge Envoy ...")
        await self.edge.start()
        await self.wait_edge_hosts(len(self.replicas))

    async def scale(self, count: int, *, wait_edge: bool = True) -> None:
        """Add or remove replicas; removed ones leave sds and drain before they stop."""
        if count < 0:
            raise ValueError("replicas must be zero or more")
        async with self._lock:
            while len(self.replicas) < count:
                index = next(i for i in range(1, 1000) if i not in self.replicas)
                replica = Replica(self, self._address(index))
                self.settings.say(f"  starting {replica.at.name} on {replica.at.address} ...")
                self.replicas[index] = replica
                await replica.start()
            doomed = sorted(self.replicas)[count:]
            for index in reversed(doomed):
                self.settings.say(f"  stopping {self.replicas[index].at.name} (drains first) ...")
            await asyncio.gather(
                *(self.replicas.pop(i).stop(self.settings.drain_seconds) for i in doomed)
            )
        if wait_edge:
            await self.wait_edge_hosts(count)

    async def wait_edge_hosts(self, count: int, timeout: float = 30.0) -> None:
        """Until the edge routes to exactly the current replicas."""
        want = {(r.at.address, r.at.sidecar_port) for r in self.replicas.values()}
        assert len(want) == count
        async with asyncio.timeout(timeout):
            while True:
                proxy = self.edge.proxy
                if proxy is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        hosts = (await proxy.clusters()).get(self.usersvc_cluster, [])
                        if {(h.address, h.port) for h in hosts if h.serving} == want:
                            return
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop everything, replicas first; no process is left behind."""
        async with self._lock:
            await asyncio.gather(
                *(r.stop(self.settings.drain_seconds) for r in self.replicas.values())
            )
            self.replicas.clear()
            for component in (self.edge, self.sds):
                proc = component.process()
                if proc is not None:
                    await proc.stop()
            if self.postgres is not None:
                await self.postgres.stop()
                self.postgres.discard()

    # ----- supervision ---------------------------------------------------------------------

    def components(self) -> list[_Supervised]:
        """Every supervised component, in start order."""
        parts: list[_Supervised] = [self.sds, self.edge]
        for index in sorted(self.replicas):
            parts += [self.replicas[index].sidecar, self.replicas[index].usersvc]
        return parts

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart components that die, until ``stop`` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if stop.is_set() or self._lock.locked():
                continue
            async with self._lock:
                if self.postgres is not None and not self.postgres.running():
                    self.settings.say("! PostgreSQL stopped; restarting it")
                    try:
                        await self.postgres.start()
                    except (OSError, PostgresError) as exc:
                        # Backends of a killed server may hold its shared memory a moment
                        # longer: try again on the next round.
                        self.settings.say(f"! PostgreSQL failed to restart: {exc}")
                for component in self.components():
                    if component.running():
                        continue
                    if time.monotonic() - component.last_start < RESTART_MIN_INTERVAL:
                        continue
                    proc = component.process()
                    code = proc.returncode if proc else None
                    self.settings.say(f"! {component.name} exited ({code}); restarting it")
                    component.restarts += 1
                    try:
                        await component.start()
                    except (OSError, RuntimeError, TimeoutError) as exc:
                        self.settings.say(f"! {component.name} failed to restart: {exc}")

    def status(self) -> list[ComponentStatus]:
        """A row per component, PostgreSQL first."""
        rows = []
        if self.postgres is not None:
            rows.append(
                ComponentStatus(
                    "postgres",
                    f"{self.postgres.host}:{self.postgres.port}",
                    self.postgres.pid,
                    "running" if self.postgres.running() else "stopped",
                    0,
                )
            )
        return rows + [c.status() for c in self.components()]
