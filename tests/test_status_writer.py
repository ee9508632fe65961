"""Gateway API status written to the fake API server through the status subresource."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from sds.gatewayapi.model import ObjectKey
from sds.registry import Registry
from sds.sources.gateway_api import GatewayApiSource
from sds.sources.reflector import Backoff, WatchSettings
from sds.status_writer import StatusSettings, StatusWriter
from sds.xds.cache import XdsCache
from tests.fake_apiserver import (
    FakeApiServer,
    gateway,
    gateway_class,
    http_route,
    reference_grant,
    service,
)

WAIT = 5.0
FAST = WatchSettings(backoff=Backoff(initial=0.02, maximum=0.2), absent_interval=0.05)
OURS = "envoymesh.io/gateway-controller"
GROUP = "gateway.networking.k8s.io"


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def status_of(apiserver: FakeApiServer, kind: str, name: str, namespace: str = "default") -> Any:
    obj = apiserver.get(kind, namespace, name)
    return (obj or {}).get("status") or {}


def our_parents(apiserver: FakeApiServer, name: str) -> list[dict[str, Any]]:
    parents = status_of(apiserver, "HTTPRoute", name).get("parents") or []
    return [p for p in parents if p.get("controllerName") == OURS]


def condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next((c for c in conditions if c["type"] == kind), {})


def route_condition(apiserver: FakeApiServer, name: str, kind: str) -> dict[str, Any]:
    parents = our_parents(apiserver, name)
    return condition(parents[0]["conditions"], kind) if parents else {}


def source_keys(writer: StatusWriter) -> set[ObjectKey]:
    return set(writer.source.objects)


@contextlib.asynccontextmanager
async def running_writer(
    apiserver: FakeApiServer, gateway_addresses: tuple[str, ...] = ()
) -> AsyncIterator[StatusWriter]:
    """A Gateway API source, the translation and a status writer against ``apiserver``."""
    registry = Registry()
    source = GatewayApiSource(registry, kube_api_url=apiserver.url, watch=FAST)
    cache = XdsCache(registry)
    status = StatusWriter(
        registry,
        cache.translator,
        source,
        kube_api_url=apiserver.url,
        settings=StatusSettings(settle=0.02, resync=1.0),
        gateway_addresses=gateway_addresses,
    )
    tasks = [asyncio.create_task(job) for job in (source.run(), cache.run(), status.run())]
    try:
        yield status
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)


@pytest.fixture
async def writer(apiserver: FakeApiServer) -> AsyncIterator[StatusWriter]:
    """A status writer with the default settings against ``apiserver``."""
    async with running_writer(apiserver) as status:
        yield status


def apply_edge(apiserver: FakeApiServer) -> None:
    for obj in (gateway_class(), gateway(), service("usersvc"), http_route("users")):
        apiserver.apply(obj)


async def test_a_route_is_accepted_under_our_controller_name(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)

    await eventually(
        lambda: route_condition(apiserver, "users", "Accepted").get("status") == "True"
    )
    parents = our_parents(apiserver, "users")
    assert len(parents) == 1
    assert parents[0]["parentRef"]["name"] == "edge"
    assert route_condition(apiserver, "users", "ResolvedRefs")["status"] == "True"
    assert route_condition(apiserver, "users", "Accepted")["observedGeneration"] == 1


async def test_the_gateway_class_is_accepted(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)

    await eventually(
        lambda: (
            condition(
                status_of(apiserver, "GatewayClass", "envoymesh", "").get("conditions") or [],
                "Accepted",
            ).get("status")
            == "True"
        )
    )


async def test_the_gateway_and_its_listener_are_accepted_and_programmed(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)

    await eventually(lambda: bool(status_of(apiserver, "Gateway", "edge").get("listeners")))
    await eventually(
        lambda: status_of(apiserver, "Gateway", "edge")["listeners"][0]["attachedRoutes"] == 1
    )
    shown = status_of(apiserver, "Gateway", "edge")
    assert condition(shown["conditions"], "Accepted")["status"] == "True"
    assert condition(shown["conditions"], "Programmed")["status"] == "True"
    listener = shown["listeners"][0]
    assert listener["name"] == "http"
    assert {"group": GROUP, "kind": "HTTPRoute"} in listener["supportedKinds"]
    for kind in ("Accepted", "Programmed", "ResolvedRefs"):
        assert condition(listener["conditions"], kind)["status"] == "True"


async def test_a_gateway_of_another_controller_gets_no_status(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apiserver.apply(gateway_class("theirs", controller="example.com/other"))
    apiserver.apply(gateway("foreign", class_name="theirs"))
    apply_edge(apiserver)

    await eventually(lambda: bool(our_parents(apiserver, "users")))
    assert status_of(apiserver, "Gateway", "foreign") == {}
    assert status_of(apiserver, "GatewayClass", "theirs", "") == {}


async def test_other_controllers_entries_are_kept(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    route = http_route("users")
    route["status"] = {
        "parents": [
            {
                "parentRef": {"name": "elsewhere"},
                "controllerName": "example.com/other",
                "conditions": [
                    {
                        "type": "Accepted",
                        "status": "True",
                        "reason": "Accepted",
                        "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                        "observedGeneration": 1,
                    }
                ],
            }
        ]
    }
    apiserver.apply(route)
    apply_edge(apiserver)

    await eventually(lambda: bool(our_parents(apiserver, "users")))
    controllers = [
        p["controllerName"] for p in status_of(apiserver, "HTTPRoute", "users")["parents"]
    ]
    assert controllers == ["example.com/other", OURS]


async def test_a_missing_backend_then_created_is_reflected(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    for obj in (gateway_class(), gateway(), http_route("users", backend="missing")):
        apiserver.apply(obj)
    await eventually(
        lambda: (
            route_condition(apiserver, "users", "ResolvedRefs").get("reason") == "BackendNotFound"
        )
    )

    apiserver.apply(service("missing"))

    await eventually(
        lambda: route_condition(apiserver, "users", "ResolvedRefs").get("status") == "True"
    )


async def test_a_spec_change_bumps_the_observed_generation(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)
    await eventually(lambda: bool(our_parents(apiserver, "users")))

    apiserver.apply(http_route("users", path="/user"))

    await eventually(
        lambda: route_condition(apiserver, "users", "Accepted").get("observedGeneration") == 2
    )


async def test_nothing_is_written_when_nothing_changed(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)
    await eventually(lambda: bool(our_parents(apiserver, "users")))
    await eventually(lambda: writer.recompute() == 0)
    writes = apiserver.status_writes

    apiserver.apply(http_route("users"))  # the same spec: a new resourceVersion, no change
    apiserver.apply(service("unrelated"))
    await eventually(lambda: ObjectKey("Service", "default", "unrelated") in source_keys(writer))
    await eventually(lambda: writer.recompute() == 0)

    assert apiserver.status_writes == writes
    assert apiserver.status_writes_of[("HTTPRoute", "default", "users")] == 1


async def test_no_status_is_written_until_every_kind_is_listed(
    apiserver: FakeApiServer,
) -> None:
    apply_edge(apiserver)
    apiserver.list_failures_to_inject["Service"] = 5  # routes are listed long before it

    async with running_writer(apiserver) as writer:
        await eventually(lambda: writer.source.settled)
        await eventually(
            lambda: route_condition(apiserver, "users", "ResolvedRefs").get("status") == "True"
        )

    assert apiserver.list_failures_to_inject["Service"] == 0
    # Never written as BackendNotFound while usersvc was still being listed.
    assert apiserver.status_writes_of[("HTTPRoute", "default", "users")] == 1


async def test_a_conflict_is_retried_with_a_fresh_read(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apiserver.conflicts_to_inject = 2

    apply_edge(apiserver)

    await eventually(lambda: bool(our_parents(apiserver, "users")))
    # The conflicts may have hit the Gateway's or the GatewayClass's writes, in flight beside
    # the route's: their fresh reads can come after the route's status is in.
    await eventually(lambda: apiserver.object_reads >= 2)
    assert apiserver.conflicts_to_inject == 0
    await eventually(lambda: writer.recompute() == 0)


async def test_a_status_write_sends_the_watched_resource_version_without_a_read(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)

    await eventually(lambda: bool(our_parents(apiserver, "users")))
    await eventually(lambda: writer.recompute() == 0)
    assert apiserver.status_writes_of[("HTTPRoute", "default", "users")] == 1
    assert apiserver.object_reads == 0


async def test_a_route_changed_under_a_pending_write_is_read_and_written_again(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)
    await eventually(lambda: bool(our_parents(apiserver, "users")))
    # Another controller's entry arrives after ours; our next write must keep it.
    route = apiserver.get("HTTPRoute", "default", "users")
    assert route is not None
    theirs = {
        "parentRef": {"name": "other"},
        "controllerName": "example.com/other",
        "conditions": [],
    }
    status = {"parents": [*route["status"]["parents"], theirs]}
    async with client.ApiClient(client.Configuration(host=apiserver.url)) as api_client:
        await client.CustomObjectsApi(api_client).replace_namespaced_custom_object_status(
            GROUP, "v1", "default", "httproutes", "users", {"status": status}
        )
    apiserver.conflicts_to_inject = 1  # as if the watch had not shown that write yet

    apiserver.apply(http_route("users", path="/moved"))

    await eventually(
        lambda: route_condition(apiserver, "users", "Accepted").get("observedGeneration") == 2
    )
    controllers = {
        p["controllerName"] for p in status_of(apiserver, "HTTPRoute", "users")["parents"]
    }
    assert controllers == {OURS, "example.com/other"}


async def test_the_api_server_refuses_a_status_breaking_the_schema(
    apiserver: FakeApiServer,
) -> None:
    apiserver.apply(http_route("users"))
    bad = {"status": {"parents": [{"parentRef": {"name": "edge"}, "conditions": []}]}}
    async with client.ApiClient(client.Configuration(host=apiserver.url)) as api_client:
        api = client.CustomObjectsApi(api_client)
        with pytest.raises(ApiException) as refused:
            await api.replace_namespaced_custom_object_status(
                GROUP, "v1", "default", "httproutes", "users", bad
            )
    assert refused.value.status == 422


async def test_the_api_server_refuses_a_json_patch_that_is_not_a_list(
    apiserver: FakeApiServer,
) -> None:
    apiserver.apply(http_route("users"))
    async with client.ApiClient(client.Configuration(host=apiserver.url)) as api_client:
        api = client.CustomObjectsApi(api_client)
        with pytest.raises(ApiException) as refused:
            await api.patch_namespaced_custom_object_status(
                GROUP, "v1", "default", "httproutes", "users", {"status": {}}
            )
    assert refused.value.status == 400


async def test_the_api_server_refuses_a_stale_resource_version(
    apiserver: FakeApiServer,
) -> None:
    stored = apiserver.apply(http_route("users"))
    apiserver.apply(http_route("users", path="/moved"))
    body = {"metadata": {"resourceVersion": stored["metadata"]["resourceVersion"]}, "status": {}}
    async with client.ApiClient(client.Configuration(host=apiserver.url)) as api_client:
        api = client.CustomObjectsApi(api_client)
        with pytest.raises(ApiException) as refused:
            await api.replace_namespaced_custom_object_status(
                GROUP, "v1", "default", "httproutes", "users", body
            )
    assert refused.value.status == 409


def edge_service(address: str) -> dict[str, Any]:
    """The edge Envoys' Service, labelled for the Gateway, with a load balancer address."""
    obj = service("edge-envoy")
    obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] = "edge"
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": address}]}}
    return obj


def gateway_addresses(apiserver: FakeApiServer) -> list[str]:
    return [a["value"] for a in status_of(apiserver, "Gateway", "edge").get("addresses") or ()]


async def test_the_gateway_addresses_are_its_labelled_services(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apiserver.apply(edge_service("203.0.113.7"))
    apply_edge(apiserver)

    await eventually(lambda: gateway_addresses(apiserver) == ["203.0.113.7"])


async def test_a_new_load_balancer_address_reaches_the_gateway_status(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apiserver.apply(edge_service("203.0.113.7"))
    apply_edge(apiserver)
    await eventually(lambda: gateway_addresses(apiserver) == ["203.0.113.7"])

    apiserver.delete("default", "edge-envoy", kind="Service")
    apiserver.apply(edge_service("203.0.113.8"))

    await eventually(lambda: gateway_addresses(apiserver) == ["203.0.113.8"])


async def test_gateway_address_settings_override_the_labelled_service(
    apiserver: FakeApiServer,
) -> None:
    apiserver.apply(edge_service("203.0.113.7"))
    apply_edge(apiserver)

    async with running_writer(apiserver, ("198.51.100.1", "edge.example.com")):
        await eventually(
            lambda: gateway_addresses(apiserver) == ["198.51.100.1", "edge.example.com"]
        )

    types = [a["type"] for a in status_of(apiserver, "Gateway", "edge")["addresses"]]
    assert types == ["IPAddress", "Hostname"]


async def test_a_route_to_a_missing_gateway_is_not_accepted_no_matching_parent(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)
    apiserver.apply(http_route("lost", gateway_name="nowhere"))

    await eventually(
        lambda: route_condition(apiserver, "lost", "Accepted").get("reason") == "NoMatchingParent"
    )
    assert route_condition(apiserver, "lost", "Accepted")["status"] == "False"


async def test_a_cross_namespace_backend_without_a_grant_is_ref_not_permitted(
    apiserver: FakeApiServer, writer: StatusWriter
) -> None:
    apply_edge(apiserver)
    apiserver.apply(service("usersvc", "backends"))
    route = http_route("users")
    route["spec"]["rules"][0]["backendRefs"][0]["namespace"] = "backends"
    apiserver.apply(route)
    await eventually(
        lambda: (
            route_condition(apiserver, "users", "ResolvedRefs").get("reason") == "RefNotPermitted"
        )
    )

    apiserver.apply(reference_grant("from-default", "backends", from_namespace="default"))

    await eventually(
        lambda: route_condition(apiserver, "users", "ResolvedRefs").get("status") == "True"
    )
