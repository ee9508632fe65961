"""Running a fleet: connection age, replica identity, push-path metrics, logs and debugging."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from tests.conftest import RunningSds, put
from tests.xds_client import XdsClient, assignments


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_responses_carry_the_replica_identifier_from_the_pod_name(
    start_sds: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAME", "sds-7f9c-abcde")
    sds: RunningSds = await start_sds(xds_debounce=0.0)
    for delta in (False, True):
        client = XdsClient(sds.grpc_target, delta=delta)
        try:
            client.send(**{"resource_names_subscribe" if delta else "resource_names": ["a"]})
            response = await client.receive()
        finally:
            await client.close()
        assert response.control_plane.identifier == "envoymesh-sds/sds-7f9c-abcde"


async def test_an_aged_connection_is_closed_and_the_proxy_can_reconnect(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(
        xds_debounce=0.0, max_connection_age=0.5, max_connection_age_grace=0.5
    )
    put(sds, "a", "10.0.0.1:80")
    client = XdsClient(sds.grpc_target)
    try:
        client.send(resource_names=["a"])
        client.ack(await client.receive(), resource_names=["a"])
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await client.receive(timeout=10)
        assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        await client.close()
    again = XdsClient(sds.grpc_target)
    try:
        again.send(resource_names=["a"])
        assert set(assignments(await again.receive())) == {"a"}
    finally:
        await again.close()


async def test_debug_proxies_for_one_node_shows_names_versions_and_nonces(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    mine = open_client(node="edge-1")
    mine.send(resource_names=["a", "b"])
    response = await mine.receive()
    other = open_client(node="edge-2")
    other.send(resource_names=["a"])
    await other.receive()
    async with httpx.AsyncClient(base_url=fast_sds.url) as http:
        [proxy] = (await http.get("/debug/proxies", params={"node": "edge-1"})).json()["proxies"]
        everyone = (await http.get("/debug/proxies")).json()["proxies"]
    assert {p["node_id"] for p in everyone} == {"edge-1", "edge-2"}
    assert all("types" not in p for p in everyone)
    [eds] = proxy["types"].values()
    assert eds["subscribed"] == ["a", "b"]
    assert eds["nonce_sent"] == response.nonce
    assert eds["version_sent"] == response.version_info
    assert set(eds["sent"]) == {"a", "b"}
    assert all(eds["sent"].values())


async def test_stream_connect_and_disconnect_are_logged_with_the_node_id(
    fast_sds: RunningSds, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sds.xds"):
        client = XdsClient(fast_sds.grpc_target, node="edge-logged")
        client.send(resource_names=["a"])
        await client.receive()
        await client.close()
        async with asyncio.timeout(5):
            while fast_sds.server.proxies.all():
                await asyncio.sleep(0.02)
    events = [
        (r.getMessage(), getattr(r, "node_id", None))
        for r in caplog.records
        if r.getMessage() in ("proxy connected", "proxy disconnected")
    ]
    assert events == [("proxy connected", "edge-logged"), ("proxy disconnected", "edge-logged")]


async def test_pushes_withheld_by_the_warmup_are_counted(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0, xds_debounce=0.0)
    before = sample("sds_xds_withheld_resources_total", transport="sotw")
    client = XdsClient(sds.grpc_target)
    try:
        # A proxy that had the resource from an earlier sds keeps it while sources sync.
        client.send(resource_names=["ghost"], version_info="from-an-earlier-sds")
        await client.expect_silence()
    finally:
        await client.close()
    assert sample("sds_xds_withheld_resources_total", transport="sotw") == before + 1


async def test_metrics_show_event_loop_lag_and_streams_per_transport(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    for delta in (False, True):
        client = open_client(delta=delta)
        client.send(**{"resource_names_subscribe" if delta else "resource_names": ["a"]})
        await client.receive()
    async with asyncio.timeout(5):
        while sample("sds_event_loop_lag_seconds_count") == 0:
            await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=fast_sds.url) as http:
        text = (await http.get("/metrics")).text
    # Process-wide gauges: streams of earlier tests' servers may still be closing.
    assert sample("sds_xds_connected_streams", transport="sotw") >= 1
    assert sample("sds_xds_connected_streams", transport="delta") >= 1
    assert "sds_event_loop_lag_seconds_bucket" in text
