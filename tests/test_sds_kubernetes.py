"""The sds server with its Kubernetes source: what the cluster says, every surface serves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import RunningSds
from tests.fake_apiserver import FakeApiServer, endpoint_slice
from tests.xds_client import XdsClient, addresses, assignments


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_pods_of_a_service_are_served_by_v1_and_xds(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> None:
    apiserver.apply(
        endpoint_slice(
            "usersvc-abc",
            "envoymesh",
            "usersvc",
            addresses=["10.1.0.1", "10.1.0.2"],
            ports=[("http", 8080), ("admin", 9901)],
        )
    )
    sds: RunningSds = await start_sds(
        source=["kubernetes"], kube_api_url=apiserver.url, port_name="http", xds_debounce=0.0
    )
    async with httpx.AsyncClient(base_url=sds.url) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await wait_for(ready)
        for name in ("usersvc", "usersvc.envoymesh"):
            hosts = (await client.get(f"/v1/registration/{name}")).json()["hosts"]
            assert [(h["ip_address"], h["port"]) for h in hosts] == [
                ("10.1.0.1", 8080),
                ("10.1.0.2", 8080),
            ]
    xds = XdsClient(sds.grpc_target)
    try:
        xds.send(resource_names=["usersvc.envoymesh"])
        first = await xds.receive()
        assert addresses(assignments(first)["usersvc.envoymesh"]) == [
            ("10.1.0.1", 8080),
            ("10.1.0.2", 8080),
        ]
        xds.ack(first, resource_names=["usersvc.envoymesh"])
        apiserver.apply(
            endpoint_slice(
                "usersvc-abc",
                "envoymesh",
                "usersvc",
                addresses=["10.1.0.2"],
                ports=[("http", 8080)],
            )
        )
        pushed = await xds.receive()
        assert addresses(assignments(pushed)["usersvc.envoymesh"]) == [("10.1.0.2", 8080)]
    finally:
        await xds.close()


async def test_missing_rbac_grant_shows_in_readyz_until_granted(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> None:
    apiserver.set_forbidden(True)
    sds: RunningSds = await start_sds(source=["kubernetes"], kube_api_url=apiserver.url)
    async with httpx.AsyncClient(base_url=sds.url) as client:

        async def forbidden_reported() -> bool:
            response = await client.get("/readyz")
            reason = response.json()["sources"].get("kubernetes", {}).get("reason", "")
            return response.status_code == 503 and "endpointslices" in reason

        await wait_for(forbidden_reported)
        apiserver.set_forbidden(False)

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await wait_for(ready, timeout=15)


async def test_readyz_names_services_with_several_ports_and_no_port_name(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> None:
    apiserver.apply(
        endpoint_slice(
            "usersvc-abc",
            "envoymesh",
            "usersvc",
            addresses=["10.1.0.1"],
            ports=[("http", 8080), ("admin", 9901)],
        )
    )
    sds: RunningSds = await start_sds(source=["kubernetes"], kube_api_url=apiserver.url)
    async with httpx.AsyncClient(base_url=sds.url) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await wait_for(ready)
        reason = (await client.get("/readyz")).json()["sources"]["kubernetes"]["reason"]
    assert "usersvc.envoymesh (admin, http)" in reason
    assert "--port-name" in reason
