"""The Gateway API source against an API server that speaks the real list/watch protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import httpx
import pytest
from prometheus_client import REGISTRY as METRICS

from sds.gatewayapi.model import ObjectKey
from sds.registry import Registry, SourceStatus
from sds.sources.gateway_api import STATUS_NAME, GatewayApiSource
from sds.sources.reflector import Backoff, WatchSettings
from tests.conftest import RunningSds
from tests.fake_apiserver import (
    FakeApiServer,
    endpoint_slice,
    gateway,
    gateway_class,
    grpc_route,
    http_route,
    reference_grant,
    service,
)

WAIT = 5.0
FAST = WatchSettings(backoff=Backoff(initial=0.02, maximum=0.2), absent_interval=0.05)

EVERY_KIND = (
    (gateway_class(), ObjectKey("GatewayClass", "", "envoymesh")),
    (gateway(), ObjectKey("Gateway", "default", "edge")),
    (http_route("users"), ObjectKey("HTTPRoute", "default", "users")),
    (grpc_route("users-grpc"), ObjectKey("GRPCRoute", "default", "users-grpc")),
    (
        reference_grant("from-web", "default", from_namespace="web"),
        ObjectKey("ReferenceGrant", "default", "from-web"),
    ),
    (service("usersvc"), ObjectKey("Service", "default", "usersvc")),
)


class StartSource(Protocol):
    """Starts a GatewayApiSource on a fresh registry, waiting until it is ready."""

    def __call__(self, **options: Any) -> Awaitable[Registry]: ...


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def status(registry: Registry) -> SourceStatus:
    return registry.source_statuses().get(STATUS_NAME, SourceStatus(ready=False, reason="unset"))


def keys(registry: Registry) -> set[ObjectKey]:
    return set(registry.config.objects)


@pytest.fixture
async def start_source(apiserver: FakeApiServer) -> AsyncIterator[StartSource]:
    """Run GatewayApiSources against ``apiserver``; all cancelled and awaited at teardown."""
    tasks: list[asyncio.Task[None]] = []

    async def start(**options: Any) -> Registry:
        registry = Registry()
        settings: dict[str, Any] = {"kube_api_url": apiserver.url, "watch": FAST, **options}
        tasks.append(asyncio.create_task(GatewayApiSource(registry, **settings).run()))
        await eventually(lambda: status(registry).ready)
        return registry

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)


async def test_every_kind_is_listed(apiserver: FakeApiServer, start_source: StartSource) -> None:
    for obj, _ in EVERY_KIND:
        apiserver.apply(obj)

    registry = await start_source()

    await eventually(lambda: keys(registry) == {key for _, key in EVERY_KIND})


async def test_every_kind_is_watched_added_and_deleted(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source()

    for obj, _ in EVERY_KIND:
        apiserver.apply(obj)
    await eventually(lambda: keys(registry) == {key for _, key in EVERY_KIND})
    for _, key in EVERY_KIND:
        apiserver.delete(key.namespace, key.name, kind=key.kind)
    await eventually(lambda: keys(registry) == set())


async def test_a_dropped_watch_resumes_without_listing_again(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source()
    lists = dict(apiserver.lists_of)
    await eventually(lambda: apiserver.open_watches == 6)

    apiserver.drop_watches()
    apiserver.apply(http_route("users"))

    await eventually(lambda: ObjectKey("HTTPRoute", "default", "users") in keys(registry))
    assert apiserver.lists_of == lists
    assert apiserver.watches_of["HTTPRoute"] >= 2


async def test_gone_relists_and_forgets_what_was_deleted_meanwhile(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(http_route("old"))
    registry = await start_source()
    await eventually(lambda: apiserver.open_watches == 6)
    await eventually(lambda: ObjectKey("HTTPRoute", "default", "old") in keys(registry))
    routes_listed = apiserver.lists_of["HTTPRoute"]

    apiserver.silence_watches()
    apiserver.delete("default", "old", kind="HTTPRoute")
    apiserver.apply(http_route("new"))
    apiserver.compact()
    apiserver.drop_watches()

    await eventually(
        lambda: (
            {k for k in keys(registry) if k.kind == "HTTPRoute"}
            == {ObjectKey("HTTPRoute", "default", "new")}
        )
    )
    assert apiserver.lists_of["HTTPRoute"] == routes_listed + 1


async def test_a_cluster_without_the_crds_is_ready_and_names_the_kinds_absent(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.set_absent(True)
    apiserver.apply(service("usersvc"))

    registry = await start_source()

    await eventually(lambda: ObjectKey("Service", "default", "usersvc") in keys(registry))
    assert status(registry).ready
    for kind in ("GatewayClasses", "Gateways", "HTTPRoutes", "GRPCRoutes", "ReferenceGrants"):
        assert kind in status(registry).reason


async def test_crds_installed_later_are_picked_up(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.set_absent(True)
    registry = await start_source()

    apiserver.set_absent(False)
    apiserver.apply(http_route("users"))

    await eventually(lambda: ObjectKey("HTTPRoute", "default", "users") in keys(registry))
    await eventually(lambda: "absent" not in status(registry).reason)


async def test_a_forbidden_kind_is_reported_and_counted_and_the_others_go_on(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    before = METRICS.get_sample_value("sds_kubernetes_forbidden_total", {"kind": "HTTPRoutes"})
    apiserver.set_forbidden(True, ["HTTPRoute"])
    apiserver.apply(http_route("users"))
    apiserver.apply(gateway())

    registry = await start_source()

    await eventually(lambda: ObjectKey("Gateway", "default", "edge") in keys(registry))
    assert status(registry).ready
    assert "httproutes.gateway.networking.k8s.io" in status(registry).reason
    assert ObjectKey("HTTPRoute", "default", "users") not in keys(registry)
    after = METRICS.get_sample_value("sds_kubernetes_forbidden_total", {"kind": "HTTPRoutes"})
    assert (after or 0.0) > (before or 0.0)


async def test_an_object_the_schema_refuses_is_not_served(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    broken = http_route("broken")
    broken["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Glob"
    apiserver.apply(broken)
    apiserver.apply(http_route("fine"))

    registry = await start_source()

    await eventually(lambda: ObjectKey("HTTPRoute", "default", "fine") in keys(registry))
    assert ObjectKey("HTTPRoute", "default", "broken") not in keys(registry)


async def test_each_namespace_is_watched_on_its_own(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(http_route("mine", "team-a"))
    apiserver.apply(http_route("theirs", "team-b"))
    apiserver.apply(gateway_class())

    registry = await start_source(namespaces=["team-a"])

    await eventually(lambda: ObjectKey("GatewayClass", "", "envoymesh") in keys(registry))
    assert {k for k in keys(registry) if k.kind == "HTTPRoute"} == {
        ObjectKey("HTTPRoute", "team-a", "mine")
    }


async def test_sds_accepts_a_route_applied_to_the_cluster(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> None:
    apiserver.apply(
        endpoint_slice(
            "usersvc-abc", "default", "usersvc", addresses=["10.1.0.1"], ports=[("http", 8080)]
        )
    )
    sds: RunningSds = await start_sds(
        source=["kubernetes"], kube_api_url=apiserver.url, xds_debounce=0.0
    )
    for obj in (gateway_class(), gateway(), service("usersvc"), http_route("users", path="/user")):
        apiserver.apply(obj)
    async with httpx.AsyncClient(base_url=sds.url) as client:

        async def accepted() -> bool:
            routes = (await client.get("/debug/config")).json()["routes"]
            return any(
                c["type"] == "Accepted" and c["status"] == "True"
                for r in routes
                if r["name"] == "users"
                for p in r["parents"]
                for c in p["conditions"]
            )

        async with asyncio.timeout(10):
            while not await accepted():
                await asyncio.sleep(0.05)
        readyz = await client.get("/readyz")
    assert readyz.status_code == 200
