"""Real Envoy 1.40 following the registry over every xDS transport we serve."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import yaml

from envoymesh.envoyconf import render
from envoymesh.ports import free_port
from meshctl.envoy import EnvoyProxy, HostStatus
from sds.model import Endpoint, Health, Source
from tests.conftest import RunningSds

pytestmark = pytest.mark.envoy

VARIANTS = ["ads", "ads-delta", "eds-grpc", "eds-delta", "rest"]


def edge_config(variant: str, sds: RunningSds, admin_port: int, listen_port: int) -> str:
    """The shipped edge templates, for each way Envoy can reach sds."""
    values: dict[str, object] = {
        "NODE_ID": f"edge-{variant}",
        "LISTEN_ADDRESS": "127.0.0.1",
        "LISTEN_PORT": listen_port,
        "ADMIN_PORT": admin_port,
        "SERVICE_NAME": "usersvc",
        "SDS_ADDRESS": "127.0.0.1",
        "SDS_GRPC_PORT": sds.settings.grpc_port,
        "SDS_HTTP_PORT": sds.settings.http_port,
        "REFRESH_DELAY": "0.2s",
        "ADS_API_TYPE": "DELTA_GRPC" if variant == "ads-delta" else "GRPC",
    }
    if variant == "rest":
        return render("edge-eds-rest", values)
    config = render("edge-eds", values)
    if variant in ("ads", "ads-delta"):
        return config
    # EDS on its own gRPC service instead of ADS: same bootstrap, another config source.
    bootstrap = yaml.safe_load(config)
    del bootstrap["dynamic_resources"]
    [usersvc] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "usersvc"]
    usersvc["eds_cluster_config"]["eds_config"] = {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "DELTA_GRPC" if variant == "eds-delta" else "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "sds_xds"}}],
        },
    }
    return yaml.safe_dump(bootstrap)


def publish(sds: RunningSds, *endpoints: Endpoint) -> None:
    """What a Kubernetes source would do: the whole endpoint set of usersvc.default."""
    sds.registry.replace(Source.KUBERNETES, "usersvc.default", endpoints)


def pod(port: int, **fields: Any) -> Endpoint:
    return Endpoint("127.0.0.1", port, Source.KUBERNETES, **fields)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def hosts_of(edge: EnvoyProxy) -> list[HostStatus]:
    return (await edge.clusters()).get("usersvc", [])


async def wait_hosts(edge: EnvoyProxy, expected: set[tuple[int, str, int]]) -> None:
    """Until Envoy's usersvc hosts are exactly ``expected`` (port, health, weight)."""

    async def check() -> bool:
        return {(h.port, h.health, h.weight) for h in await hosts_of(edge)} == expected

    try:
        await eventually(check)
    except TimeoutError:
        seen = {(h.port, h.health, h.weight) for h in await hosts_of(edge)}
        raise AssertionError(f"Envoy has {seen}, expected {expected}") from None


async def start_edge(
    start_envoy: Callable[..., Any], variant: str, sds: RunningSds
) -> tuple[EnvoyProxy, str]:
    listen, admin = free_port(), free_port()
    edge: EnvoyProxy = await start_envoy(
        f"edge-{variant}", edge_config(variant, sds, admin, listen), admin
    )
    return edge, f"http://127.0.0.1:{listen}"


@pytest.mark.parametrize("variant", VARIANTS)
async def test_envoy_membership_follows_the_registry(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], variant: str
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0)
    publish(sds, pod(9001), pod(9002))
    edge, _ = await start_edge(start_envoy, variant, sds)
    await wait_hosts(edge, {(9001, "HEALTHY", 1), (9002, "HEALTHY", 1)})

    publish(sds, pod(9001), pod(9002), pod(9003))
    await wait_hosts(edge, {(9001, "HEALTHY", 1), (9002, "HEALTHY", 1), (9003, "HEALTHY", 1)})

    publish(sds, pod(9001), pod(9003))
    await wait_hosts(edge, {(9001, "HEALTHY", 1), (9003, "HEALTHY", 1)})

    publish(sds, pod(9001, health=Health.DRAINING), pod(9003, weight=5))
    await wait_hosts(edge, {(9001, "DRAINING", 1), (9003, "HEALTHY", 5)})


@pytest.mark.parametrize("variant", ["ads", "ads-delta"])
async def test_envoy_drops_every_host_when_the_service_disappears(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], variant: str
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0)
    publish(sds, pod(9001), pod(9002))
    edge, _ = await start_edge(start_envoy, variant, sds)
    await wait_hosts(edge, {(9001, "HEALTHY", 1), (9002, "HEALTHY", 1)})
    publish(sds)  # the Service is deleted: the registry forgets it
    await wait_hosts(edge, set())
    publish(sds, pod(9003))
    await wait_hosts(edge, {(9003, "HEALTHY", 1)})


async def test_envoy_reconnects_when_its_connection_ages_and_keeps_following(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any]
) -> None:
    sds: RunningSds = await start_sds(
        xds_debounce=0.0, max_connection_age=1.0, max_connection_age_grace=0.5
    )
    publish(sds, pod(9001))
    edge, _ = await start_edge(start_envoy, "ads", sds)
    await wait_hosts(edge, {(9001, "HEALTHY", 1)})
    [first] = [p.id for p in sds.server.proxies.all()]

    async def reconnected() -> bool:
        return any(p.id != first and p.state == "SYNCED" for p in sds.server.proxies.all())

    await eventually(reconnected, timeout=20)
    publish(sds, pod(9002))
    await wait_hosts(edge, {(9002, "HEALTHY", 1)})


@pytest.mark.parametrize("variant", VARIANTS)
async def test_traffic_through_envoy_reaches_the_registered_backends(
    start_sds: Callable[..., Any],
    start_envoy: Callable[..., Any],
    backends: list[int],
    variant: str,
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0)
    publish(sds, *(pod(p) for p in backends))
    edge, url = await start_edge(start_envoy, variant, sds)
    await wait_hosts(edge, {(p, "HEALTHY", 1) for p in backends})
    async with httpx.AsyncClient(base_url=url) as client:
        answers = Counter([(await client.get("/user/alice")).text for _ in range(9)])
        assert answers == {"backend-0": 3, "backend-1": 3, "backend-2": 3}

        publish(sds, pod(backends[1]), pod(backends[2]))
        await wait_hosts(edge, {(backends[1], "HEALTHY", 1), (backends[2], "HEALTHY", 1)})
        answers = Counter([(await client.get("/user/alice")).text for _ in range(6)])
        assert answers == {"backend-1": 3, "backend-2": 3}


async def test_envoy_keeps_routing_while_sds_is_down_and_catches_up_after(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], backends: list[int]
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0)
    publish(sds, pod(backends[0]), pod(backends[1]))
    edge, url = await start_edge(start_envoy, "ads", sds)
    await wait_hosts(edge, {(backends[0], "HEALTHY", 1), (backends[1], "HEALTHY", 1)})

    await sds.stop()
    async with httpx.AsyncClient(base_url=url) as client:
        during = Counter([(await client.get("/user/alice")).text for _ in range(4)])
        assert during == {"backend-0": 2, "backend-1": 2}

        # The world moved on while sds was away; the new sds knows it.
        back: RunningSds = await start_sds(
            xds_debounce=0.0,
            http_port=sds.settings.http_port,
            grpc_port=sds.settings.grpc_port,
        )
        publish(back, pod(backends[2]))
        await wait_hosts(edge, {(backends[2], "HEALTHY", 1)})
        assert (await client.get("/user/alice")).text == "backend-2"


async def subscription_stats(edge: EnvoyProxy) -> dict[str, int]:
    """Envoy's counters of the usersvc EDS subscription (``update_success``, ...)."""
    prefix = "cluster.usersvc."
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            f"{edge.admin_url}/stats", params={"format": "json", "filter": f"^{prefix}"}
        )
    return {
        stat["name"].removeprefix(prefix): stat["value"]
        for stat in response.json()["stats"]
        if isinstance(stat.get("value"), int)  # not the text stats (version_text)
    }


@pytest.mark.parametrize("variant", ["ads", "ads-delta", "rest"])
async def test_fresh_envoy_is_answered_at_once_while_sds_warms_up(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], variant: str
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, registration_warmup=60.0)

    edge, _ = await start_edge(start_envoy, variant, sds)

    stats = await subscription_stats(edge)
    assert stats["init_fetch_timeout"] == 0
    assert stats["update_success"] >= 1
    publish(sds, pod(9001))
    await wait_hosts(edge, {(9001, "HEALTHY", 1)})


async def test_debug_proxies_shows_a_synced_envoy(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any]
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0)
    publish(sds, pod(9001))
    edge, _ = await start_edge(start_envoy, "ads", sds)
    await wait_hosts(edge, {(9001, "HEALTHY", 1)})

    async def synced() -> bool:
        async with httpx.AsyncClient(base_url=sds.url) as client:
            proxies = (await client.get("/debug/proxies")).json()["proxies"]
        return [(p["node_id"], p["transport"], p["state"]) for p in proxies] == [
            ("edge-ads", "sotw", "SYNCED")
        ]

    await eventually(synced)
    # A change, pushed and ACKed, is what the convergence histogram measures.
    publish(sds, pod(9001), pod(9002))
    await wait_hosts(edge, {(9001, "HEALTHY", 1), (9002, "HEALTHY", 1)})
    await eventually(synced)
    async with httpx.AsyncClient(base_url=sds.url) as client:
        metrics = (await client.get("/metrics")).text
    # The gauge is process-wide and other tests' in-process servers share this process, so
    # it counts at least this Envoy's stream; /debug/proxies above showed exactly it.
    streams = re.search(r'^sds_xds_connected_streams\{transport="sotw"\} (\S+)$', metrics, re.M)
    assert streams is not None
    assert float(streams.group(1)) >= 1
    assert 'sds_proxy_convergence_time_seconds_count{transport="sotw"}' in metrics
