"""Gateway API benchmarks: routes from files to a real Envoy, translation at scale, and a
backend switch under load.

Scenarios (``--scenarios``, default all):

- ``file``: an HTTPRoute file written -> a real Envoy serves the new route, 100 changes.
- ``scale``: 5,000 HTTPRoutes on 100 Gateways over 2,000 Services with 20,000 endpoints:
  reading and validating the directory, then the full translation, and the RSS after.
- ``one``: one HTTPRoute changed with 100 proxies (ADS streams) on its Gateway and 1,000 on
  others: sds's translation time, and what each stream was sent.
- ``switch``: a route switched between two backends 100 times while 2 clients send at full
  speed through a real Envoy: failed requests.

Run: ``.venv/bin/python bench/gateway_api.py [--scenarios file scale one switch]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Generator
from pathlib import Path
from typing import Any

import grpc
import httpx
import uvicorn
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.xds_fleet import percentile  # noqa: E402
from envoymesh.ports import free_port  # noqa: E402
from meshctl.envoy import EnvoyProxy  # noqa: E402
from sds.bootstrap import envoy_bootstrap  # noqa: E402
from sds.config import Settings  # noqa: E402
from sds.model import Endpoint, Source  # noqa: E402
from sds.server import SdsServer  # noqa: E402
from sds.sources.config_dir import ConfigDirSource  # noqa: E402
from sds.xds.node import GATEWAY_METADATA  # noqa: E402
from sds.xds.resources import (  # noqa: E402
    CDS_TYPE_URL,
    EDS_TYPE_URL,
    LDS_TYPE_URL,
    RDS_TYPE_URL,
    SHORT_TYPE_NAMES,
)

GROUP = "gateway.networking.k8s.io"


def gateway_doc(name: str, port: int, address: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "gatewayClassName": "envoymesh",
            "addresses": [{"type": "IPAddress", "value": address}],
            "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}],
        },
    }


def route_doc(name: str, gateway: str, path: str, service: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": gateway}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                    "backendRefs": [{"name": service, "port": port}],
                },
                {
                    "matches": [
                        {
                            "path": {"type": "Exact", "value": f"{path.rstrip('/')}/health"},
                            "headers": [{"name": "x-probe", "value": "1"}],
                        }
                    ],
                    "backendRefs": [{"name": service, "port": port}],
                },
            ],
        },
    }


def write(path: Path, *documents: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump_all(documents))
    partial.replace(path)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Echo:
    """One HTTP backend answering its name."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.port = free_port()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.name})

    async def serve(self) -> uvicorn.Server:
        server = _Quiet(
            uvicorn.Config(self, host="127.0.0.1", port=self.port, log_config=None, lifespan="off")
        )
        self.task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        return server


class _Quiet(uvicorn.Server):
    """uvicorn that leaves the signals to asyncio.run."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def start_sds(config_dir: Path, **overrides: Any) -> tuple[SdsServer, asyncio.Event, Any]:
    settings = Settings(
        http_host="127.0.0.1",
        http_port=free_port(),
        grpc_host="127.0.0.1",
        grpc_port=free_port(),
        config_dir=str(config_dir),
        allow_anonymous_writes=True,
        allow_loopback=True,
        registration_warmup=0,
        xds_debounce=0.0,
        log_level="warning",
        **overrides,
    )
    server = SdsServer(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    async with httpx.AsyncClient() as client:
        for _ in range(500):
            try:
                if (await client.get(f"http://127.0.0.1:{settings.http_port}/readyz")).is_success:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    return server, stop, task


async def start_envoy(server: SdsServer, gateway: str, run_dir: Path) -> EnvoyProxy:
    admin = free_port()
    target = f"127.0.0.1:{server.settings.grpc_port}"
    bootstrap = envoy_bootstrap(gateway, target, node_id=f"bench-{admin}", admin_port=admin)
    envoy = EnvoyProxy(f"envoy-{admin}", json.dumps(bootstrap), admin_port=admin, run_dir=run_dir)
    await envoy.start()
    return envoy


async def until(client: httpx.AsyncClient, url: str, expect: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if (await client.get(url)).status_code == expect:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.001)
    raise TimeoutError(url)


async def scenario_file(run_dir: Path) -> None:
    config = run_dir / "file"
    config.mkdir()
    port = free_port()
    write(config / "gateway.yaml", gateway_doc("edge", port))
    server, stop, task = await start_sds(config)
    echo = Echo("svc")
    backend = await echo.serve()
    server.registry.replace(
        Source.REGISTRATION, "svc", [Endpoint("127.0.0.1", echo.port, Source.REGISTRATION)]
    )
    envoy = await start_envoy(server, "default/edge", run_dir)
    times = []
    async with httpx.AsyncClient(timeout=2) as client:
        for i in range(100):
            started = time.perf_counter()
            write(config / "route.yaml", route_doc("r", "edge", f"/v{i}", "svc", echo.port))
            await until(client, f"http://127.0.0.1:{port}/v{i}", 200)
            times.append((time.perf_counter() - started) * 1000)
    print(
        f"file -> Envoy serves the new route, 100 changes: p50 {percentile(times, 0.5):.1f} ms,"
        f" p99 {percentile(times, 0.99):.1f} ms, max {max(times):.1f} ms (target p99 <= 100 ms)"
    )
    await envoy.stop()
    backend.should_exit = True
    stop.set()
    await task


def scale_config(config: Path, gateways: int, routes: int, services: int) -> None:
    for g in range(gateways):
        per = routes // gateways
        documents = [gateway_doc(f"gw{g}", 20000 + g)]
        documents += [
            route_doc(f"r{g}-{i}", f"gw{g}", f"/p{i}", f"svc{(g * per + i) % services}", 8080)
            for i in range(per)
        ]
        write(config / f"gw{g}.yaml", *documents)


async def scenario_scale(run_dir: Path) -> None:
    config = run_dir / "scale"
    config.mkdir()
    scale_config(config, 100, 5000, 2000)
    settings = Settings(config_dir=str(config), log_level="warning")
    server = SdsServer(settings)
    registry = server.registry
    for s in range(2000):
        registry.replace(
            Source.REGISTRATION,
            f"svc{s}",
            [
                Endpoint(f"10.{s // 250}.{s % 250}.{e}", 8080, Source.REGISTRATION)
                for e in range(1, 11)
            ],
        )
    source = ConfigDirSource(registry, config)
    before = rss_mb()
    cpu = time.process_time()
    started = time.perf_counter()
    files, conflicts, loaded = source.load()
    read = time.perf_counter() - started
    registry.set_config("config", loaded)
    started = time.perf_counter()
    moved = server.xds.translator.refresh(None, None)
    translated = time.perf_counter() - started
    cpu = time.process_time() - cpu
    resources = sum(
        len(server.xds.translator.resources(g, t))
        for g in moved
        for t in (CDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL)
    )
    print(
        f"scale: 5,000 HTTPRoutes (10,000 rules) on 100 Gateways over 2,000 Services, 20,000"
        f" endpoints: read+validate {read:.2f} s, full translation {translated:.2f} s"
        f" (start total {read + translated:.2f} s, CPU {cpu:.2f} s; target <= 3 s),"
        f" {len(moved)} Gateways, {resources} resources; RSS {rss_mb():.0f} MB"
        f" ({before:.0f} MB before reading; target <= 500 MB); {len(conflicts)} conflicts"
    )
    del files


class Stream:
    """One ADS stream of a Gateway proxy: ACKs everything, counts what it gets by type."""

    def __init__(self, channel: grpc.aio.Channel, gateway: str, node_id: str) -> None:
        metadata = struct_pb2.Struct()
        metadata.update({GATEWAY_METADATA: gateway})
        self.node = base_pb2.Node(id=node_id, cluster=gateway, metadata=metadata)
        self.received: Counter[str] = Counter()
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.StreamAggregatedResources(self._requests())
        self.names: dict[str, list[str]] = {}
        self.task = asyncio.create_task(self._run())

    async def _requests(self) -> Any:
        for type_url in (CDS_TYPE_URL, LDS_TYPE_URL):
            yield discovery_pb2.DiscoveryRequest(node=self.node, type_url=type_url)
        while True:
            request = await self.queue.get()
            if request is None:
                return
            yield request

    async def _run(self) -> None:
        async for response in self.call:
            self.received[SHORT_TYPE_NAMES[response.type_url]] += 1
            self.queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    node=self.node,
                    type_url=response.type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=self.names.get(response.type_url, []),
                )
            )
            # Like Envoy: the clusters' endpoints, then the listeners' routes, by name.
            follow = {CDS_TYPE_URL: EDS_TYPE_URL, LDS_TYPE_URL: RDS_TYPE_URL}.get(response.type_url)
            if follow is None:
                continue
            message = cluster_pb2.Cluster() if follow == EDS_TYPE_URL else listener_pb2.Listener()
            names = []
            for packed in response.resources:
                packed.Unpack(message)
                names.append(message.name)
            if sorted(names) != self.names.get(follow):
                self.names[follow] = sorted(names)
                self.queue.put_nowait(
                    discovery_pb2.DiscoveryRequest(
                        node=self.node, type_url=follow, resource_names=sorted(names)
                    )
                )


async def scenario_one(run_dir: Path) -> None:
    config = run_dir / "one"
    config.mkdir()
    scale_config(config, 11, 550, 200)
    server, stop, task = await start_sds(config, max_streams_per_peer=2000)
    for s in range(200):
        server.registry.replace(
            Source.REGISTRATION,
            f"svc{s}",
            [Endpoint(f"10.0.{s}.{e}", 8080, Source.REGISTRATION) for e in range(1, 6)],
        )
    target = f"127.0.0.1:{server.settings.grpc_port}"
    channels = [grpc.aio.insecure_channel(target) for _ in range(11)]
    streams: list[tuple[int, Stream]] = []
    for g in range(11):
        count = 100
        for i in range(count):
            streams.append((g, Stream(channels[g], f"default/gw{g}", f"p{g}-{i}")))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s.received["rds"] for _, s in streams):
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    before = [Counter(s.received) for _, s in streams]
    translator = server.xds.translator
    docs = list(yaml.safe_load_all((config / "gw0.yaml").read_text()))
    durations = []
    changes = 10
    for change in range(changes):
        docs[1]["spec"]["rules"][0]["matches"][0]["path"]["value"] = f"/changed{change}"
        write(config / "gw0.yaml", *docs)
        want = before[0]["rds"] + change + 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            s.received["rds"] >= want for g, s in streams if g == 0
        ):
            await asyncio.sleep(0.01)
        durations.append(translator.last_duration * 1000)
    await asyncio.sleep(1.0)
    after = [Counter(s.received) for _, s in streams]
    on_gateway: Counter[str] = Counter()
    elsewhere: Counter[str] = Counter()
    for (g, _), b, a in zip(streams, before, after, strict=True):
        (on_gateway if g == 0 else elsewhere).update(a - b)
    print(
        f"one HTTPRoute changed ({changes} times), 100 proxies on its Gateway and 1,000 on 10"
        f" others: translation median {sorted(durations)[len(durations) // 2]:.2f} ms,"
        f" max {max(durations):.2f} ms (target <= 5 ms);"
        f" its Gateway's streams got {dict(on_gateway)} (target: rds only, {100 * changes}),"
        f" the others got {dict(elsewhere) or 'nothing'}"
    )
    for _, s in streams:
        s.queue.put_nowait(None)
        s.call.cancel()
    for channel in channels:
        await channel.close()
    stop.set()
    await task


async def scenario_switch(run_dir: Path, switches: int = 100) -> None:
    config = run_dir / "switch"
    config.mkdir()
    port = free_port()
    write(config / "gateway.yaml", gateway_doc("edge", port))
    server, stop, task = await start_sds(config)
    echoes = [Echo("a"), Echo("b")]
    backends = [await e.serve() for e in echoes]
    for echo in echoes:
        server.registry.replace(
            Source.REGISTRATION,
            echo.name.decode(),
            [Endpoint("127.0.0.1", echo.port, Source.REGISTRATION)],
        )
    envoy = await start_envoy(server, "default/edge", run_dir)
    write(config / "route.yaml", route_doc("r", "edge", "/", "a", echoes[0].port))
    outcomes: Counter[str] = Counter()
    stopping = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while not stopping.is_set():
                try:
                    response = await http.get(f"http://127.0.0.1:{port}/")
                    outcomes[
                        response.text if response.status_code == 200 else str(response.status_code)
                    ] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

    async with httpx.AsyncClient(timeout=2) as probe:
        await until(probe, f"http://127.0.0.1:{port}/", 200)
        clients = [asyncio.create_task(client()) for _ in range(2)]
        started = time.perf_counter()
        for i in range(switches):
            echo = echoes[(i + 1) % 2]
            write(config / "route.yaml", route_doc("r", "edge", "/", echo.name.decode(), echo.port))
            end = time.monotonic() + 10
            while time.monotonic() < end:
                if (await probe.get(f"http://127.0.0.1:{port}/")).text == echo.name.decode():
                    break
                await asyncio.sleep(0.002)
        stopping.set()
        await asyncio.gather(*clients)
    elapsed = time.perf_counter() - started
    served = outcomes["a"] + outcomes["b"]
    failed = sum(n for k, n in outcomes.items() if k not in ("a", "b"))
    print(
        f"backend switch under load: {switches} switches in {elapsed:.1f} s, 2 clients,"
        f" {served} requests served (a {outcomes['a']}, b {outcomes['b']}),"
        f" failed {failed} {dict((k, n) for k, n in outcomes.items() if k not in ('a', 'b'))}"
        " (target 0)"
    )
    await envoy.stop()
    for b in backends:
        b.should_exit = True
    stop.set()
    await task


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        nargs="*",
        default=["file", "scale", "one", "switch"],
        choices=["file", "scale", "one", "switch"],
    )
    args = parser.parse_args()
    print(f"bench/gateway_api.py on {machine()}; sds in this process (asyncio), xDS debounce 0")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            run_dir = Path(tmp)
            await {
                "file": scenario_file,
                "scale": scenario_scale,
                "one": scenario_one,
                "switch": scenario_switch,
            }[name](run_dir)


if __name__ == "__main__":
    asyncio.run(main())
