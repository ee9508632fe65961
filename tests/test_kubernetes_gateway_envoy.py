"""A Gateway and an HTTPRoute applied to the cluster, served by a real Envoy sds configures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from envoymesh.ports import free_port
from sds.bootstrap import envoy_bootstrap
from tests.conftest import RunningSds
from tests.fake_apiserver import FakeApiServer, endpoint_slice, gateway, gateway_class, http_route
from tests.fake_apiserver import service as k8s_service

pytestmark = [pytest.mark.envoy, pytest.mark.slow]
OURS = "envoymesh.io/gateway-controller"


async def test_a_route_applied_to_the_cluster_is_served_by_envoy_and_accepted(
    apiserver: FakeApiServer,
    start_sds: Callable[..., Any],
    start_envoy: Callable[..., Any],
    echo_backends: Callable[..., Any],
) -> None:
    backend = await echo_backends("usersvc")
    listener_port = free_port()
    edge = gateway()
    edge["spec"]["listeners"][0]["port"] = listener_port
    edge["spec"]["addresses"] = [{"type": "IPAddress", "value": "127.0.0.1"}]
    for obj in (
        gateway_class(),
        edge,
        k8s_service("usersvc", ports=[("http", backend)]),
        endpoint_slice(
            "usersvc-abc", "default", "usersvc", addresses=["127.0.0.1"], ports=[("http", backend)]
        ),
        http_route("users", path="/user", port=backend),
    ):
        apiserver.apply(obj)
    sds: RunningSds = await start_sds(
        source=["kubernetes"], kube_api_url=apiserver.url, port_name="http", xds_debounce=0.0
    )
    admin = free_port()
    bootstrap = envoy_bootstrap(
        "default/edge", sds.grpc_target, node_id=f"edge-{admin}", admin_port=admin
    )
    await start_envoy(f"edge-{admin}", json.dumps(bootstrap), admin)

    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(20):
        while True:
            try:
                response = await client.get(f"http://127.0.0.1:{listener_port}/user/1")
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    assert response.json()["backend"] == "usersvc"

    async with asyncio.timeout(10):
        while not any(
            c["type"] == "Accepted" and c["status"] == "True"
            for p in (
                (apiserver.get("HTTPRoute", "default", "users") or {}).get("status") or {}
            ).get("parents", [])
            if p["controllerName"] == OURS
            for c in p["conditions"]
        ):
            await asyncio.sleep(0.05)
