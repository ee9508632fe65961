"""Listeners, RouteConfigurations and Clusters over ADS, as a raw client sees them.

Make before break, the wildcard and deletion rules of SotW and delta, per-type NACKs and
REST, checked response by response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import struct_pb2

from sds.model import Endpoint, Source
from sds.xds.node import GATEWAY_METADATA
from sds.xds.resources import CDS_TYPE_URL, EDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL
from tests.conftest import RunningSds, gateway_yaml, put
from tests.xds_client import XdsClient, addresses, assignments

GROUP = "gateway.networking.k8s.io"
ROUTE = "default/edge/8080"


def route_to(service: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "edge"}],
                "rules": [{"backendRefs": [{"name": service, "port": 80}]}],
            },
        }
    )


def names(response: Any) -> list[str]:
    """The names of a response's Clusters or RouteConfigurations."""
    found = []
    for item in response.resources:
        packed = item.resource if hasattr(item, "resource") else item
        message: Any = (
            cluster_pb2.Cluster()
            if packed.type_url == CDS_TYPE_URL
            else route_pb2.RouteConfiguration()
        )
        packed.Unpack(message)
        found.append(message.name)
    return sorted(found)


def route_clusters(response: Any) -> set[str]:
    """Every cluster the RouteConfigurations of a response send to."""
    found = set()
    for item in response.resources:
        packed = item.resource if hasattr(item, "resource") else item
        config = route_pb2.RouteConfiguration()
        packed.Unpack(config)
        for host in config.virtual_hosts:
            for route in host.routes:
                found.add(route.route.cluster)
    return found


@pytest.fixture
async def gateway_sds(tmp_path: Path, start_sds: Callable[..., Any]) -> tuple[RunningSds, Path]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "gateway.yaml").write_text(gateway_yaml(8080))
    (config / "route.yaml").write_text(route_to("svc-a"))
    sds: RunningSds = await start_sds(config_dir=str(config), xds_debounce=0.0)
    put(sds, "svc-a", "127.0.0.1:80")
    put(sds, "svc-b", "127.0.0.2:80")
    return sds, config


async def config_shows(sds: RunningSds, check: Callable[[dict[str, Any]], bool]) -> None:
    """Wait until ``/debug/config`` satisfies ``check`` (sds read the files written)."""
    async with asyncio.timeout(20), httpx.AsyncClient() as http:
        while not check((await http.get(f"{sds.url}/debug/config")).json()):
            await asyncio.sleep(0.02)


def gateway_client(sds: RunningSds, *, delta: bool = False) -> XdsClient:
    client = XdsClient(sds.grpc_target, delta=delta, node="edge-1")
    metadata = struct_pb2.Struct()
    metadata.update({GATEWAY_METADATA: "default/edge"})
    client.node.metadata.CopyFrom(metadata)
    return client


async def synced(client: XdsClient) -> dict[str, Any]:
    """Subscribe as Envoy does (CDS, EDS, LDS, RDS), ACKing each; the last responses."""
    last: dict[str, Any] = {}
    client.send(type_url=CDS_TYPE_URL)
    last["cds"] = await client.receive()
    client.ack(last["cds"], type_url=CDS_TYPE_URL)
    client.send(type_url=EDS_TYPE_URL, resource_names=names(last["cds"]))
    last["eds"] = await client.receive()
    client.ack(last["eds"], type_url=EDS_TYPE_URL, resource_names=names(last["cds"]))
    client.send(type_url=LDS_TYPE_URL)
    last["lds"] = await client.receive()
    client.ack(last["lds"], type_url=LDS_TYPE_URL)
    client.send(type_url=RDS_TYPE_URL, resource_names=[ROUTE])
    last["rds"] = await client.receive()
    client.ack(last["rds"], type_url=RDS_TYPE_URL, resource_names=[ROUTE])
    return last


async def test_make_before_break_new_cluster_and_endpoints_acked_before_the_route_old_one_last(
    gateway_sds: tuple[RunningSds, Path],
) -> None:
    sds, config = gateway_sds
    client = gateway_client(sds)
    try:
        first = await synced(client)
        assert route_clusters(first["rds"]) == {"default/svc-a/80"}
        (config / "route.yaml").write_text(route_to("svc-b"))
        clusters = await client.receive(timeout=10)
        assert clusters.type_url == CDS_TYPE_URL
        # The route the proxy has still sends to svc-a: both clusters, and no route yet.
        assert names(clusters) == ["default/svc-a/80", "default/svc-b/80"]
        client.ack(clusters, type_url=CDS_TYPE_URL)
        client.send(type_url=EDS_TYPE_URL, resource_names=names(clusters))
        endpoints = await client.receive()
        assert endpoints.type_url == EDS_TYPE_URL
        await client.expect_silence()  # the new cluster's endpoints are not acknowledged yet
        client.ack(endpoints, type_url=EDS_TYPE_URL, resource_names=names(clusters))
        routes = await client.receive()
        assert routes.type_url == RDS_TYPE_URL
        assert route_clusters(routes) == {"default/svc-b/80"}
        await client.expect_silence()  # svc-a stays until that route is acknowledged
        client.ack(routes, type_url=RDS_TYPE_URL, resource_names=[ROUTE])
        shrunk = await client.receive()
        assert shrunk.type_url == CDS_TYPE_URL
        assert names(shrunk) == ["default/svc-b/80"]
    finally:
        await client.close()


async def test_listeners_empty_first_request_is_the_wildcard_and_a_deleted_one_leaves_it(
    gateway_sds: tuple[RunningSds, Path],
) -> None:
    sds, config = gateway_sds
    client = gateway_client(sds)
    try:
        first = await synced(client)
        assert len(first["lds"].resources) == 1
        (config / "gateway.yaml").unlink()
        while True:
            response = await client.receive(timeout=10)
            client.ack(response, type_url=response.type_url)
            if response.type_url == LDS_TYPE_URL:
                break
        assert list(response.resources) == []
    finally:
        await client.close()


async def test_delta_names_a_removed_cluster_in_removed_resources(
    gateway_sds: tuple[RunningSds, Path],
) -> None:
    sds, config = gateway_sds
    client = gateway_client(sds, delta=True)
    try:
        client.send(type_url=CDS_TYPE_URL)
        clusters = await client.receive()
        assert [r.name for r in clusters.resources] == ["default/svc-a/80"]
        client.ack(clusters, type_url=CDS_TYPE_URL)
        (config / "route.yaml").unlink()
        removed = await client.receive(timeout=10)
        assert list(removed.removed_resources) == ["default/svc-a/80"]
    finally:
        await client.close()


async def test_a_nack_of_one_type_holds_no_other_back(
    gateway_sds: tuple[RunningSds, Path],
) -> None:
    sds, config = gateway_sds
    client = gateway_client(sds)
    try:
        await synced(client)
        (config / "route.yaml").write_text(route_to("svc-b"))
        clusters = await client.receive(timeout=10)
        client.nack(clusters, "refused for the test", type_url=CDS_TYPE_URL)
        client.send(type_url=EDS_TYPE_URL, resource_names=["default/svc-a/80", "default/svc-b/80"])
        endpoints = await client.receive()
        assert endpoints.type_url == EDS_TYPE_URL
        async with httpx.AsyncClient() as http:
            proxy = (await http.get(f"{sds.url}/debug/proxies")).json()["proxies"][0]
        assert proxy["type_states"]["cds"]["state"] == "NACKED"
        assert proxy["type_states"]["cds"]["error"] == "refused for the test"
        assert proxy["type_states"]["lds"]["state"] == "SYNCED"
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("path", "type_url"),
    [
        ("clusters", CDS_TYPE_URL),
        ("listeners", LDS_TYPE_URL),
        ("routes", RDS_TYPE_URL),
    ],
)
async def test_rest_serves_each_type_of_the_nodes_gateway_and_304_when_current(
    gateway_sds: tuple[RunningSds, Path], path: str, type_url: str
) -> None:
    sds, _ = gateway_sds
    node = {"id": "rest-1", "metadata": {GATEWAY_METADATA: "default/edge"}}
    request: dict[str, Any] = {"node": node, "type_url": type_url}
    if type_url == RDS_TYPE_URL:
        request["resource_names"] = [ROUTE]
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{sds.url}/v3/discovery:{path}", json=request)
        assert answer.status_code == 200
        body = answer.json()
        assert len(body["resources"]) == 1
        again = await http.post(
            f"{sds.url}/v3/discovery:{path}",
            json={**request, "version_info": body["version_info"]},
        )
        assert again.status_code == 304
        stranger = await http.post(
            f"{sds.url}/v3/discovery:{path}", json={**request, "node": {"id": "other"}}
        )
        assert stranger.json().get("resources", []) == []


async def test_proxies_of_one_gateway_never_receive_another_gateways_listeners(
    gateway_sds: tuple[RunningSds, Path],
) -> None:
    sds, config = gateway_sds
    (config / "other.yaml").write_text(gateway_yaml(9090, name="other"))
    await config_shows(sds, lambda c: len(c["gateways"]) == 2)
    client = gateway_client(sds)
    try:
        first = await synced(client)
        assert len(first["lds"].resources) == 1
        listener = listener_pb2.Listener()
        first["lds"].resources[0].Unpack(listener)
        assert listener.name == ROUTE
    finally:
        await client.close()


async def test_a_kubernetes_service_is_a_backend_with_the_endpoints_its_source_found(
    gateway_sds: tuple[RunningSds, Path],
) -> None:
    sds, config = gateway_sds
    sds.registry.replace(
        Source.KUBERNETES, "svc-k.default", [Endpoint("10.1.0.7", 8443, Source.KUBERNETES)]
    )
    (config / "route.yaml").write_text(route_to("svc-k"))
    await config_shows(sds, lambda c: c["gateways"][0]["clusters"] == ["default/svc-k/80"])
    client = gateway_client(sds)
    try:
        first = await synced(client)
        assert names(first["cds"]) == ["default/svc-k/80"]
        assert addresses(assignments(first["eds"])["default/svc-k/80"]) == [("10.1.0.7", 8443)]
    finally:
        await client.close()


async def test_rest_honours_max_subscriptions(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(max_subscriptions=2)
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{sds.url}/v3/discovery:endpoints",
            json={"node": {"id": "n"}, "resource_names": ["a", "b", "c"]},
        )
    assert answer.status_code == 400
    assert "more than 2" in answer.json()["error"]


async def test_while_sources_sync_a_proxy_that_had_clusters_is_not_answered_a_fresh_one_is(
    tmp_path: Path, start_sds: Callable[..., Any]
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "gateway.yaml").write_text(gateway_yaml(8080))
    (config / "route.yaml").write_text(route_to("svc-a"))
    # Registrations come back one heartbeat at a time after a restart: a long warm-up.
    sds: RunningSds = await start_sds(
        config_dir=str(config), xds_debounce=0.0, registration_warmup=60.0
    )
    put(sds, "svc-a", "127.0.0.1:80")  # one replica's heartbeat is back already
    await config_shows(sds, lambda c: c["gateways"][0]["clusters"] == ["default/svc-a/80"])
    reconnecting, fresh = gateway_client(sds), gateway_client(sds)
    try:
        reconnecting.send(type_url=CDS_TYPE_URL, version_info="from-the-previous-sds")
        fresh.send(type_url=CDS_TYPE_URL)
        assert names(await fresh.receive()) == ["default/svc-a/80"]
        await reconnecting.expect_silence()
    finally:
        await reconnecting.close()
        await fresh.close()
