"""Faults injected into the local mesh under steady load, and what each one cost.

``bench/faults.py`` prints the figures and ``tests/test_faults.py`` asserts on them. The load
goes through the edge as a user's would: readers GET existing users, a writer PUTs new ones,
and a write counts as acknowledged only once the edge answered 201 for it. After the faults,
:func:`verify_writes` reads every acknowledged user back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from meshctl.mesh import Mesh

# How long a request may take before the load counts it as failed: longer than the longest
# freeze below, so a request held by a frozen process counts only if it is never answered.
REQUEST_TIMEOUT = 30.0
PASSWORD = "fault-suite-password"  # noqa: S105 - a test account's, printed nowhere


@dataclass
class Tally:
    """Requests sent and how they ended, from some moment on."""

    sent: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    # Failures after the fault was over (the mesh was healthy again).
    late_failures: int = 0
    # Which replica (``resolvedname``) answered the successful GETs.
    replicas: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx answer."""
        return sum(self.failures.values())


class SteadyLoad:
    """``readers`` clients GET existing users and ``writers`` clients PUT new ones, nonstop."""

    def __init__(self, edge_url: str, *, readers: int = 4, writers: int = 1) -> None:
        self.edge_url = edge_url
        self.readers = readers
        self.writers = writers
        self.run_id = secrets.token_hex(4)
        self.acknowledged: dict[str, str] = {}
        self.tally = Tally()
        self.fault_over = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._names = itertools.count()

    async def start(self) -> None:
        """Create the users the readers read, then start every client."""
        async with httpx.AsyncClient(base_url=self.edge_url, timeout=REQUEST_TIMEOUT) as client:
            for reader in range(self.readers):
                name = self._reader_name(reader)
                response = await client.put(
                    f"/user/{name}", json={"fullname": name, "password": PASSWORD}
                )
                if response.status_code != 201:
                    raise RuntimeError(f"cannot create {name}: {response.status_code}")
        self._tasks = [
            *(asyncio.create_task(self._read(i)) for i in range(self.readers)),
            *(asyncio.create_task(self._write()) for _ in range(self.writers)),
        ]

    async def stop(self) -> None:
        """Stop every client and wait for its last request to end."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def measure(self) -> Tally:
        """Count from now on in a fresh tally, and return it."""
        self.tally = Tally()
        self.fault_over = False
        return self.tally

    def _reader_name(self, reader: int) -> str:
        return f"reader-{self.run_id}-{reader}"

    def _record(self, outcome: str) -> None:
        tally = self.tally
        tally.sent += 1
        if outcome != "ok":
            tally.failures[outcome] += 1
            if self.fault_over:
                tally.late_failures += 1

    async def _request(
        self, client: httpx.AsyncClient, method: str, path: str, body: dict[str, str] | None = None
    ) -> httpx.Response | None:
        try:
            response = await client.request(method, path, json=body)
        except httpx.ConnectError:
            self._record("refused")
            await asyncio.sleep(0.05)  # nothing listens: do not spin
            return None
        except httpx.TimeoutException:
            self._record("timeout")
            return None
        except httpx.TransportError:
            self._record("reset")
            return None
        self._record("ok" if response.is_success else str(response.status_code))
        if not response.is_success:
            await asyncio.sleep(0.05)
        return response

    async def _read(self, reader: int) -> None:
        path = f"/user/{self._reader_name(reader)}"
        async with httpx.AsyncClient(base_url=self.edge_url, timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set():
                response = await self._request(client, "GET", path)
                if response is not None and response.is_success:
                    self.tally.replicas[str(response.json().get("resolvedname"))] += 1

    async def _write(self) -> None:
        async with httpx.AsyncClient(base_url=self.edge_url, timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set():
                name = f"w-{self.run_id}-{next(self._names)}"
                fullname = f"Writer {secrets.token_hex(6)}"
                response = await self._request(
                    client, "PUT", f"/user/{name}", {"fullname": fullname, "password": PASSWORD}
                )
                if response is not None and response.status_code == 201:
                    self.acknowledged[name] = fullname


@dataclass(frozen=True, slots=True)
class Fault:
    """Something that goes wrong, and how long the mesh may take to be whole again."""

    name: str
    inject: Callable[[Mesh], Awaitable[None]]
    heal_deadline: float = 90.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one fault cost: requests sent and failed while it ran, and the time to heal."""

    fault: str
    sent: int
    failed: int
    failures: dict[str, int]
    late_failures: int
    heal_seconds: float
    replicas_after: dict[str, int]
    # The fewest replicas the edge would route to at any moment of the run.
    fewest_edge_hosts: int


async def mesh_is_whole(mesh: Mesh) -> bool:
    """Every component runs, every replica is healthy, and the edge serves exactly them."""
    if not all(component.running() for component in mesh.components()):
        return False
    if mesh.postgres is not None and not mesh.postgres.running():
        return False
    async with httpx.AsyncClient(timeout=2) as client:
        for replica in mesh.replicas.values():
            try:
                if (await client.get(replica.health_url)).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
    proxy = mesh.edge.proxy
    if proxy is None:
        return False
    try:
        hosts = (await proxy.clusters()).get(mesh.usersvc_cluster, [])
    except httpx.HTTPError:
        return False
    want = {(r.at.address, r.at.sidecar_port) for r in mesh.replicas.values()}
    return {(h.address, h.port) for h in hosts if h.serving} == want


async def wait_whole(mesh: Mesh, timeout: float) -> None:
    """Until :func:`mesh_is_whole`; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await mesh_is_whole(mesh):
                return
            await asyncio.sleep(0.1)


async def run_fault(
    mesh: Mesh, load: SteadyLoad, fault: Fault, *, settle: float = 2.0, after: float = 3.0
) -> Outcome:
    """Inject ``fault`` under ``load`` and measure it.

    The tally covers ``settle`` seconds of load before the fault, the fault, the time until the
    mesh is whole again, and ``after`` seconds more. Failures in that last part are counted
    separately as ``late_failures``, and so are the replicas that answered.
    """
    await wait_whole(mesh, fault.heal_deadline)
    tally = load.measure()
    fewest: list[int] = []
    watcher = asyncio.create_task(_watch_edge_hosts(mesh, fewest))
    try:
        await asyncio.sleep(settle)
        started = time.monotonic()
        await fault.inject(mesh)
        await wait_whole(mesh, fault.heal_deadline)
        healed = time.monotonic() - started
        load.fault_over = True
        tally.replicas.clear()
        await asyncio.sleep(after)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return Outcome(
        fault=fault.name,
        sent=tally.sent,
        failed=tally.failed,
        failures=dict(tally.failures),
        late_failures=tally.late_failures,
        heal_seconds=round(healed, 1),
        replicas_after=dict(tally.replicas),
        fewest_edge_hosts=min(fewest, default=0),
    )


async def _watch_edge_hosts(mesh: Mesh, fewest: list[int]) -> None:
    """Append, every 100 ms, how many replicas the edge would send requests to (while its
    admin interface answers)."""
    while True:
        proxy = mesh.edge.proxy
        if proxy is not None and proxy.process.running():
            with contextlib.suppress(httpx.HTTPError):
                hosts = (await proxy.clusters()).get(mesh.usersvc_cluster, [])
                fewest.append(sum(1 for h in hosts if h.serving))
        await asyncio.sleep(0.1)


async def verify_writes(edge_url: str, acknowledged: dict[str, str]) -> int:
    """How many acknowledged users read back through the edge with the fullname written."""
    found = 0
    async with httpx.AsyncClient(base_url=edge_url, timeout=REQUEST_TIMEOUT) as client:
        for name, fullname in acknowledged.items():
            response = await client.get(f"/user/{name}")
            if response.status_code == 200 and response.json().get("fullname") == fullname:
                found += 1
    return found


# ----- the faults ----------------------------------------------------------------------------


def _signal(mesh: Mesh, component: str, sig: int) -> None:
    for part in mesh.components():
        if part.name == component:
            proc = part.process()
            if proc is None or not proc.running():
                raise RuntimeError(f"{component} is not running")
            proc.send_signal(sig)
            return
    raise KeyError(component)


def _first_replica(mesh: Mesh) -> str:
    return mesh.replicas[min(mesh.replicas)].at.name


def _kill(component: Callable[[Mesh], str]) -> Callable[[Mesh], Awaitable[None]]:
    async def inject(mesh: Mesh) -> None:
        _signal(mesh, component(mesh), signal.SIGKILL)

    return inject


def _freeze(component: Callable[[Mesh], str], seconds: float) -> Callable[[Mesh], Awaitable[None]]:
    async def inject(mesh: Mesh) -> None:
        name = component(mesh)
        _signal(mesh, name, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            _signal(mesh, name, signal.SIGCONT)

    return inject


async def _restart_postgres(mesh: Mesh) -> None:
    """A fast shutdown; the mesh's supervisor starts it again, as systemd or a kubelet would."""
    if mesh.postgres is None:
        raise RuntimeError("the mesh does not run its own PostgreSQL")
    await mesh.postgres.stop()


async def _kill_postgres(mesh: Mesh) -> None:
    if mesh.postgres is None or mesh.postgres.pid is None:
        raise RuntimeError("the mesh does not run its own PostgreSQL")
    mesh.postgres.kill()


async def _scale_down_and_up(mesh: Mesh) -> None:
    count = len(mesh.replicas)
    await mesh.scale(1)
    await mesh.scale(count)


def faults() -> list[Fault]:
    """Every fault of the suite, in the order they run."""
    return [
        Fault("SIGKILL one usersvc replica", _kill(_first_replica)),
        Fault("SIGSTOP one usersvc replica 10 s", _freeze(_first_replica, 10.0)),
        Fault("SIGKILL sds (restarted)", _kill(lambda _: "sds")),
        Fault("SIGSTOP sds 20 s", _freeze(lambda _: "sds", 20.0)),
        Fault("restart PostgreSQL (fast shutdown)", _restart_postgres),
        Fault("SIGKILL PostgreSQL (restarted)", _kill_postgres),
        Fault("SIGKILL the edge Envoy (restarted)", _kill(lambda _: "edge-envoy")),
        Fault("scale 3 -> 1 -> 3", _scale_down_and_up),
    ]


@contextlib.asynccontextmanager
async def supervised(mesh: Mesh) -> AsyncIterator[None]:
    """Run the mesh's supervisor, which restarts what dies, for the life of the context."""
    stop = asyncio.Event()
    task = asyncio.create_task(mesh.supervise(stop), name="supervisor")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
