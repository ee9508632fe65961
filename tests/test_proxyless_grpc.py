"""Proxyless gRPC: ``xds:///NAME`` clients get their routes, clusters and endpoints from sds.

The clients are real grpcio channels, each in its own process (grpcio holds one xDS client
per process), bootstrapped by ``sds bootstrap --grpc`` and calling test servers that answer
with their own name; the rest drives sds's ADS stream directly where a rule is about what
sds sends rather than what gRPC does with it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from google.protobuf import json_format

from envoymesh.ports import free_port
from sds.model import Endpoint, Source
from sds.registry import Registry
from sds.translate.translator import Translator
from sds.xds.cache import XdsCache
from sds.xds.resources import CDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL
from tests.conftest import SDS_AUTH, SDS_WRITE_TOKEN, GrpcCaller, RunningSds, put
from tests.xds_client import XdsClient

WHO = "/envoymesh.test.Echo/Who"
OTHER = "/envoymesh.test.Echo/Other"
GROUP = "gateway.networking.k8s.io"
slow = pytest.mark.slow


async def grpc_bootstrap(target: str) -> str:
    """What ``sds bootstrap --grpc`` prints for sds's gRPC address ``target``."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sds", "bootstrap", "--grpc", "--xds-server", target),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return out.decode()


def grpc_route(name: str, service: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    """A GRPCRoute attached to Service ``default/service`` (GAMMA)."""
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": service}],
            "rules": rules,
        },
    }


async def sds_with_routes(
    start_sds: Callable[..., Any], tmp_path: Path, *docs: dict[str, Any], **overrides: Any
) -> RunningSds:
    """An sds (no debounce) serving a config directory that holds ``docs``."""
    config_dir = tmp_path / f"config-{free_port()}"
    config_dir.mkdir()
    (config_dir / "routes.yaml").write_text(yaml.safe_dump_all(docs))
    sds: RunningSds = await start_sds(config_dir=str(config_dir), xds_debounce=0.0, **overrides)
    return sds


def answered_by(calls: list[dict[str, Any]]) -> set[Any]:
    return {call.get("who") for call in calls}


async def backends(start: Callable[..., Any], *names: str) -> dict[str, int]:
    return {name: await start(name) for name in names}


# ----- names -----------------------------------------------------------------------------------


def registry_of_usersvc() -> Registry:
    """usersvc as both deployments have it: registered replicas and a Kubernetes Service."""
    registry = Registry()
    registry.replace(
        Source.REGISTRATION,
        "usersvc-grpc",
        [
            Endpoint("10.0.0.1", 5100, Source.REGISTRATION),
            Endpoint("10.0.0.2", 5101, Source.REGISTRATION),
        ],
    )
    registry.replace(
        Source.KUBERNETES, "usersvc.prod", [Endpoint("10.1.0.1", 5001, Source.KUBERNETES)]
    )
    return registry


@pytest.mark.parametrize(
    ("name", "cluster"),
    [
        ("usersvc-grpc", "default/usersvc-grpc/*"),
        ("usersvc-grpc:5100", "default/usersvc-grpc/5100"),
        ("usersvc", "prod/usersvc/*"),
        ("usersvc.prod", "prod/usersvc/*"),
        ("usersvc.prod.svc:5001", "prod/usersvc/5001"),
        ("usersvc.prod.svc.cluster.local:5001", "prod/usersvc/5001"),
        ("usersvc.prod:5002", "prod/usersvc/none"),
        ("nosuch", None),
        ("usersvc.other", None),
        ("usersvc.prod.example", None),
        ("usersvc:0", None),
        ("usersvc:http", None),
    ],
)
async def test_a_target_name_stands_for_the_service_and_port_sds_knows(
    name: str, cluster: str | None
) -> None:
    target = Translator(registry_of_usersvc()).mesh.target(name)
    assert (target.cluster.name if target else None) == cluster


async def test_every_port_target_has_every_host_and_a_missing_port_none() -> None:
    cache = XdsCache(registry_of_usersvc())
    assert cache.resource("default/usersvc-grpc/*").endpoint_count == 2
    assert cache.resource("default/usersvc-grpc/5101").endpoint_count == 1
    assert cache.resource("prod/usersvc/*").endpoint_count == 1
    assert cache.resource("prod/usersvc/none").endpoint_count == 0


async def test_sds_bootstrap_grpc_asks_to_ignore_resource_deletion() -> None:
    document = json.loads(await grpc_bootstrap("127.0.0.1:18000"))
    server = document["xds_servers"][0]
    assert server["server_uri"] == "127.0.0.1:18000"
    assert server["channel_creds"] == [{"type": "insecure"}]
    assert "ignore_resource_deletion" in server["server_features"]
    assert document["node"]["id"]


# ----- what sds sends a gRPC client ------------------------------------------------------------


async def attached(sds: RunningSds, route: str) -> dict[str, Any]:
    """Wait until GRPCRoute ``route`` is accepted with every backend resolved; every route
    of ``/debug/config`` by name."""
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=sds.url) as http:
        while True:
            routes = {r["name"]: r for r in (await http.get("/debug/config")).json()["routes"]}
            states = [
                c["status"]
                for parent in routes[route]["parents"]
                for c in parent["conditions"]
                if c["type"] in ("Accepted", "ResolvedRefs")
            ]
            if states == ["True", "True"]:
                return routes
            await asyncio.sleep(0.05)


async def config_of(client: XdsClient, type_url: str, names: list[str]) -> list[dict[str, Any]]:
    """Ask for ``names`` of one type; the resources of the answer, as JSON."""
    client.send(type_url=type_url, resource_names=names)
    response = await client.receive()
    found = []
    for packed in response.resources:
        message = json_format.MessageToDict(packed, preserving_proto_field_name=True)
        found.append(message)
    return found


async def test_no_envoy_only_field_reaches_a_grpc_client(
    start_sds: Callable[..., Any], tmp_path: Path
) -> None:
    route = grpc_route(
        "by-service",
        "echo",
        [
            {
                "matches": [{"method": {"service": "envoymesh.test.Echo"}}],
                "backendRefs": [{"name": "blue", "port": 9001}],
            }
        ],
    )
    sds = await sds_with_routes(start_sds, tmp_path, route)
    put(sds, "echo", "127.0.0.1:9000")
    put(sds, "blue", "127.0.0.1:9001")
    await attached(sds, "by-service")
    client = XdsClient(sds.grpc_target, node="grpc-client")
    try:
        (listener,) = await config_of(client, LDS_TYPE_URL, ["echo"])
        (routes,) = await config_of(client, RDS_TYPE_URL, ["echo"])
        clusters = await config_of(client, CDS_TYPE_URL, ["default/blue/9001", "default/echo/*"])
    finally:
        await client.close()
    assert "api_listener" in listener
    assert "address" not in listener
    assert "filter_chains" not in listener
    assert len(clusters) == 2
    text = json.dumps([listener, routes, clusters])
    for field in (
        "path_separated_prefix",
        "retry_policy",
        "outlier_detection",
        "circuit_breakers",
        "connect_timeout",
        "typed_extension_protocol_options",
    ):
        assert field not in text
    # ROUND_ROBIN is the default (omitted from the JSON): gRPC refuses LEAST_REQUEST and others.
    assert all(c["type"] == "EDS" and "lb_policy" not in c for c in clusters)
    matched = routes["virtual_hosts"][0]["routes"][0]
    assert matched["match"]["safe_regex"]["regex"] == r"/envoymesh\.test\.Echo(/.*)?"
    assert matched["route"]["cluster"] == "default/blue/9001"


async def test_a_nack_is_shown_in_debug_proxies(fast_sds: RunningSds) -> None:
    put(fast_sds, "echo", "127.0.0.1:9000")
    client = XdsClient(fast_sds.grpc_target, node="grpc-nacker")
    try:
        client.send(type_url=LDS_TYPE_URL, resource_names=["echo"])
        response = await client.receive()
        client.nack(response, "listener refused", resource_names=["echo"], type_url=LDS_TYPE_URL)
        async with asyncio.timeout(10), httpx.AsyncClient(base_url=fast_sds.url) as http:
            while True:
                proxies = (await http.get("/debug/proxies")).json()["proxies"]
                (proxy,) = [p for p in proxies if p["node_id"] == "grpc-nacker"]
                if proxy["type_states"]["lds"]["state"] == "NACKED":
                    break
                await asyncio.sleep(0.05)
    finally:
        await client.close()
    assert proxy["type_states"]["lds"]["error"] == "listener refused"


async def test_while_sources_sync_a_client_that_had_listeners_loses_none(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=60.0, xds_debounce=0.0)
    put(sds, "echo", "127.0.0.1:9000")
    client = XdsClient(sds.grpc_target, node="grpc-reconnected")
    try:
        client.send(
            type_url=LDS_TYPE_URL, resource_names=["echo", "later"], version_info="earlier-sds"
        )
        await client.expect_silence(0.5)
    finally:
        await client.close()


async def test_while_sources_sync_a_fresh_client_gets_what_is_known(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=60.0, xds_debounce=0.0)
    put(sds, "echo", "127.0.0.1:9000")
    client = XdsClient(sds.grpc_target, node="grpc-fresh")
    try:
        listeners = await config_of(client, LDS_TYPE_URL, ["echo", "later"])
    finally:
        await client.close()
    assert [listener["name"] for listener in listeners] == ["echo"]


async def test_debug_config_shows_a_grpcroute_attached_to_a_service(
    start_sds: Callable[..., Any], tmp_path: Path
) -> None:
    split = grpc_route("split", "echo", [{"backendRefs": [{"name": "blue", "port": 9001}]}])
    orphan = grpc_route("orphan", "ghost", [{"backendRefs": [{"name": "blue", "port": 9001}]}])
    sds = await sds_with_routes(start_sds, tmp_path, split, orphan)
    put(sds, "echo", "127.0.0.1:9000")
    put(sds, "blue", "127.0.0.1:9001")
    routes = await attached(sds, "split")
    (parent,) = routes["split"]["parents"]
    conditions = {c["type"]: c for c in parent["conditions"]}
    assert parent["parentRef"]["kind"] == "Service"
    assert conditions["Accepted"]["status"] == "True"
    assert routes["split"]["rules"][0]["backends"] == [
        {"cluster": "default/blue/9001", "weight": 1}
    ]
    (orphaned,) = routes["orphan"]["parents"]
    accepted = next(c for c in orphaned["conditions"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "NoMatchingParent")


# ----- real gRPC clients -----------------------------------------------------------------------


@slow
async def test_calls_spread_evenly_over_every_replica(
    fast_sds: RunningSds, grpc_backends: Callable[..., Any], grpc_clients: Callable[..., Any]
) -> None:
    ports = await backends(grpc_backends, "r0", "r1", "r2")
    put(fast_sds, "echo", *(f"127.0.0.1:{p}" for p in ports.values()))
    client: GrpcCaller = await grpc_clients(await grpc_bootstrap(fast_sds.grpc_target), "echo", WHO)
    await client.until(lambda calls: answered_by(calls) == set(ports))
    counts = Counter(call["who"] for call in await client.next_calls(300))
    assert set(counts) == set(ports)
    assert all(90 <= n <= 110 for n in counts.values()), counts


@slow
async def test_a_removed_endpoint_stops_getting_calls_and_an_added_one_starts(
    fast_sds: RunningSds, grpc_backends: Callable[..., Any], grpc_clients: Callable[..., Any]
) -> None:
    ports = await backends(grpc_backends, "r0", "r1", "r2")
    hosts = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    put(fast_sds, "echo", hosts["r0"], hosts["r1"])
    client: GrpcCaller = await grpc_clients(await grpc_bootstrap(fast_sds.grpc_target), "echo", WHO)
    await client.until(lambda calls: answered_by(calls) == {"r0", "r1"})
    put(fast_sds, "echo", hosts["r1"], hosts["r2"])
    await client.until(lambda calls: answered_by(calls) == {"r1", "r2"})
    after = await client.next_calls(100)
    assert answered_by(after) == {"r1", "r2"}
    assert all(call["code"] == "OK" for call in client.calls)


@slow
async def test_a_grpcroute_weight_split_holds(
    start_sds: Callable[..., Any],
    tmp_path: Path,
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
) -> None:
    ports = await backends(grpc_backends, "echo", "blue", "green")
    split = grpc_route(
        "split",
        "echo",
        [
            {
                "backendRefs": [
                    {"name": "blue", "port": ports["blue"], "weight": 80},
                    {"name": "green", "port": ports["green"], "weight": 20},
                ]
            }
        ],
    )
    sds = await sds_with_routes(start_sds, tmp_path, split)
    for name, port in ports.items():
        put(sds, name, f"127.0.0.1:{port}")
    client: GrpcCaller = await grpc_clients(await grpc_bootstrap(sds.grpc_target), "echo", WHO)
    await client.until(lambda calls: answered_by(calls) == {"blue", "green"}, window=50)
    counts = Counter(call["who"] for call in await client.next_calls(500))
    assert set(counts) == {"blue", "green"}
    assert 0.72 <= counts["blue"] / 500 <= 0.88, counts


@slow
async def test_a_method_match_routes_that_method_to_its_backend(
    start_sds: Callable[..., Any],
    tmp_path: Path,
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
) -> None:
    ports = await backends(grpc_backends, "echo", "green")
    by_method = grpc_route(
        "by-method",
        "echo",
        [
            {
                "matches": [{"method": {"service": "envoymesh.test.Echo", "method": "Other"}}],
                "backendRefs": [{"name": "green", "port": ports["green"]}],
            }
        ],
    )
    sds = await sds_with_routes(start_sds, tmp_path, by_method)
    for name, port in ports.items():
        put(sds, name, f"127.0.0.1:{port}")
    client: GrpcCaller = await grpc_clients(
        await grpc_bootstrap(sds.grpc_target), "echo", WHO, OTHER
    )
    await client.until(lambda calls: all(c["code"] == "OK" for c in calls))
    calls = await client.next_calls(40)
    assert {c["who"] for c in calls if c["method"] == WHO} == {"echo"}
    assert {c["who"] for c in calls if c["method"] == OTHER} == {"green"}


@slow
async def test_an_sds_restart_keeps_every_call_succeeding(
    sds_process: Callable[..., Any],
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
) -> None:
    ports = await backends(grpc_backends, "r0", "r1", "r2")
    addresses = (free_port(), free_port())
    flags = ("--allow-loopback", "--xds-debounce", "0")
    # Registrations come back within the warm-up, as the replicas' heartbeats would.
    env = {"SDS_WRITE_TOKEN": SDS_WRITE_TOKEN, "SDS_REGISTRATION_WARMUP": "3"}

    async def start_and_register() -> Any:
        sds = await sds_process(*flags, env=env, ports=addresses)
        async with httpx.AsyncClient(base_url=sds.url, timeout=10) as http:
            for port in ports.values():
                registered = await http.post(
                    "/v1/registration/echo",
                    json={"ip": "127.0.0.1", "port": port},
                    headers=SDS_AUTH,
                )
                assert registered.status_code == 200
        return sds

    sds = await start_and_register()
    client: GrpcCaller = await grpc_clients(await grpc_bootstrap(sds.grpc_target), "echo", WHO)
    await client.until(lambda calls: answered_by(calls) == set(ports))
    before = len(client.calls)
    await sds.proc.stop(timeout=10)
    await client.next_calls(50)  # calls go on while no sds runs
    restarted = await start_and_register()
    async with asyncio.timeout(30), httpx.AsyncClient(base_url=restarted.url) as http:
        # The client is back on the new sds, and has what it knows once ready.
        while (await http.get("/readyz")).status_code != 200 or [
            p["state"] for p in (await http.get("/debug/proxies")).json()["proxies"]
        ] != ["SYNCED"]:
            await asyncio.sleep(0.1)
    await client.next_calls(200)
    during = client.calls[before:]
    assert [c for c in during if c["code"] != "OK"] == []
    assert answered_by(during[-30:]) == set(ports)
