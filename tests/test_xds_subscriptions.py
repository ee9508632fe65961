"""The xDS cache and the one subscription model: per-name wake-ups, removals, the rules for
wildcard and empty lists on every transport, name validation, caps and short names."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.protobuf import json_format
from prometheus_client import REGISTRY

from sds.model import Endpoint, Source
from sds.registry import Registry
from sds.xds.resources import EDS_TYPE_URL
from sds.xds.subscription import Subscription, SubscriptionError
from tests.conftest import RunningSds, put
from tests.xds_client import XdsClient, addresses, assignments

TRANSPORTS = ["sotw", "delta", "rest", "fetch"]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def subscribed_names(
    sds: RunningSds, open_client: Callable[..., XdsClient], transport: str, names: list[str]
) -> set[str] | None:
    """What a first request for ``names`` gets on ``transport``; None when nothing comes."""
    if transport in ("sotw", "delta"):
        client = open_client(delta=transport == "delta")
        if transport == "delta":
            client.send(resource_names_subscribe=names)
        else:
            client.send(resource_names=names)
        try:
            return set(assignments(await client.receive(timeout=1.0)))
        except TimeoutError:
            return None
    request = {"node": {"id": "poller"}, "resource_names": names, "type_url": EDS_TYPE_URL}
    if transport == "rest":
        async with httpx.AsyncClient(base_url=sds.url) as http:
            answer = await http.post("/v3/discovery:endpoints", json=request)
        assert answer.status_code == 200
        response = json_format.ParseDict(
            answer.json(), discovery_pb2.DiscoveryResponse(), ignore_unknown_fields=True
        )
        return set(assignments(response))
    async with grpc.aio.insecure_channel(sds.grpc_target) as channel:
        response = await eds_pb2_grpc.EndpointDiscoveryServiceStub(channel).FetchEndpoints(
            json_format.ParseDict(request, discovery_pb2.DiscoveryRequest()), timeout=5
        )
    return set(assignments(response))


# ----- the registry's change sets -----------------------------------------------------------


def test_registry_hands_out_the_names_changed_since_a_revision() -> None:
    registry = Registry()
    registry.replace(Source.REGISTRATION, "a", [Endpoint("10.0.0.1", 80, Source.REGISTRATION)])
    seen = registry.revision
    registry.replace(Source.REGISTRATION, "b", [Endpoint("10.0.0.2", 80, Source.REGISTRATION)])
    registry.replace(Source.REGISTRATION, "a", [])
    assert registry.changes_since(seen) == {"a", "b"}
    assert registry.changes_since(registry.revision) == frozenset()


def test_readiness_change_counts_as_every_name_changed() -> None:
    registry = Registry()
    seen = registry.revision
    registry.set_source_status("registration", ready=True)
    assert registry.changes_since(seen) is None


def test_short_names_resolve_through_the_alias_index() -> None:
    registry = Registry()
    registry.replace(Source.KUBERNETES, "orders.a", [Endpoint("10.0.0.1", 80, Source.KUBERNETES)])
    assert registry.resolve("orders") == "orders.a"
    registry.replace(Source.KUBERNETES, "orders.b", [Endpoint("10.0.0.2", 80, Source.KUBERNETES)])
    assert registry.resolve("orders") == "orders"
    assert registry.qualified("orders") == {"orders.a", "orders.b"}


# ----- one subscription model ----------------------------------------------------------------


def test_subscription_rules() -> None:
    subscription = Subscription(max_names=3)
    assert subscription.replace(["a", "b"]) == set()
    assert subscription.replace([]) == {"a", "b"}
    assert subscription.empty
    subscription.replace(["*"])
    assert subscription.wildcard
    assert not subscription.names
    assert subscription.change(["c"], ["*"]) == set()
    assert (subscription.wildcard, subscription.names) == (False, {"c"})
    with pytest.raises(SubscriptionError) as too_many:
        subscription.change(["d", "e", "f"], [])
    assert too_many.value.exhausted
    with pytest.raises(SubscriptionError) as invalid:
        subscription.replace(["has space"])
    assert not invalid.value.exhausted
    assert subscription.names == {"c"}  # a refused request changes nothing


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_star_means_every_service_on_every_transport(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient], transport: str
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    assert await subscribed_names(fast_sds, open_client, transport, ["*"]) == {"a", "b"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_empty_list_means_no_resources_on_every_transport(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient], transport: str
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    got = await subscribed_names(fast_sds, open_client, transport, [])
    # Delta has nothing to say to a stream that subscribed to nothing; the others answer empty.
    assert got == (None if transport == "delta" else set())


@pytest.mark.parametrize("name", ["has space", "x" * 257, "tab\tname", "ünïcode"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_invalid_names_are_refused_on_every_transport(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient], transport: str, name: str
) -> None:
    before = sample("sds_xds_refused_total", reason="invalid_name")
    if transport == "rest":
        async with httpx.AsyncClient(base_url=fast_sds.url) as http:
            answer = await http.post("/v3/discovery:endpoints", json={"resource_names": [name]})
        assert answer.status_code == 400
        assert "invalid resource name" in answer.json()["error"]
    elif transport == "fetch":
        async with grpc.aio.insecure_channel(fast_sds.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await eds_pb2_grpc.EndpointDiscoveryServiceStub(channel).FetchEndpoints(
                    discovery_pb2.DiscoveryRequest(resource_names=[name]), timeout=5
                )
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        client = open_client(delta=transport == "delta")
        client.send(**{"resource_names_subscribe" if client.delta else "resource_names": [name]})
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await client.receive()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sample("sds_xds_refused_total", reason="invalid_name") == before + 1


# ----- per-name wake-ups ---------------------------------------------------------------------


async def test_a_change_wakes_and_pushes_only_the_streams_subscribed_to_it(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    for i in range(10):
        put(fast_sds, f"svc-{i}", f"10.0.0.{i + 1}:80")
    clients = [open_client(node=f"proxy-{i}") for i in range(30)]
    for i, client in enumerate(clients):
        client.send(resource_names=[f"svc-{i % 10}"])
    for i, client in enumerate(clients):
        client.ack(await client.receive(), resource_names=[f"svc-{i % 10}"])
    async with asyncio.timeout(10):
        while sum(p.state == "SYNCED" for p in fast_sds.server.proxies.all()) < 30:
            await asyncio.sleep(0.02)
    sent_before = {p.node_id: p.responses_sent for p in fast_sds.server.proxies.all()}
    woken_before = sample("sds_xds_stream_wakeups_total")

    put(fast_sds, "svc-3", "10.0.0.4:80", "10.0.0.99:80")
    for i in (3, 13, 23):
        response = await clients[i].receive()
        assert addresses(assignments(response)["svc-3"]) == [("10.0.0.4", 80), ("10.0.0.99", 80)]

    assert sample("sds_xds_stream_wakeups_total") - woken_before == 3
    sent_after = {p.node_id: p.responses_sent for p in fast_sds.server.proxies.all()}
    pushed = sorted(node for node, n in sent_after.items() if n != sent_before[node])
    assert pushed == ["proxy-13", "proxy-23", "proxy-3"]


async def test_a_qualified_change_wakes_the_subscribers_of_its_short_name(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    client = open_client()
    client.send(resource_names=["orders"])
    first = await client.receive()
    assert addresses(assignments(first)["orders"]) == []
    client.ack(first, resource_names=["orders"])
    fast_sds.registry.replace(
        Source.KUBERNETES, "orders.shop", [Endpoint("10.1.0.1", 80, Source.KUBERNETES)]
    )
    assert addresses(assignments(await client.receive())["orders"]) == [("10.1.0.1", 80)]


# ----- removals ------------------------------------------------------------------------------


async def test_sotw_wildcard_subscriber_learns_that_a_service_is_gone(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client()
    client.send(resource_names=["*"])
    first = await client.receive()
    assert set(assignments(first)) == {"a", "b"}
    client.ack(first, resource_names=["*"])
    put(fast_sds, "b")
    second = await client.receive()
    assert set(assignments(second)) == {"a"}
    client.ack(second, resource_names=["*"])
    put(fast_sds, "a")
    assert list((await client.receive()).resources) == []


async def test_delta_wildcard_subscriber_gets_removed_resources_for_a_service_gone(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client(delta=True)
    client.send(resource_names_subscribe=["*"])
    first = await client.receive()
    assert {r.name for r in first.resources} == {"a", "b"}
    client.ack(first)
    put(fast_sds, "b")
    second = await client.receive()
    assert list(second.removed_resources) == ["b"]
    assert list(second.resources) == []


async def test_delta_unsubscribed_names_are_listed_as_removed(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client(delta=True)
    client.send(resource_names_subscribe=["a", "b"])
    client.ack(await client.receive())
    client.send(resource_names_unsubscribe=["a"])
    response = await client.receive()
    assert list(response.removed_resources) == ["a"]
    assert list(response.resources) == []


async def test_delta_explicit_name_whose_service_is_gone_gets_an_empty_assignment(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    client = open_client(delta=True)
    client.send(resource_names_subscribe=["a"])
    client.ack(await client.receive())
    put(fast_sds, "a")
    response = await client.receive()
    assert list(response.removed_resources) == []
    assert addresses(assignments(response)["a"]) == []


# ----- caps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_too_many_names_end_that_stream_only(
    start_sds: Callable[..., Any], delta: bool
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, max_subscriptions=3)
    put(sds, "a", "10.0.0.1:80")
    before = sample("sds_xds_refused_total", reason="too_many_names")
    good, greedy = XdsClient(sds.grpc_target, delta=delta), XdsClient(sds.grpc_target, delta=delta)
    field = "resource_names_subscribe" if delta else "resource_names"
    try:
        good.send(**{field: ["a"]})
        first = await good.receive()
        greedy.send(**{field: ["a", "b", "c", "d"]})
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await greedy.receive()
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sample("sds_xds_refused_total", reason="too_many_names") == before + 1
        good.ack(first, **({} if delta else {"resource_names": ["a"]}))
        put(sds, "a", "10.0.0.2:80")
        assert addresses(assignments(await good.receive())["a"]) == [("10.0.0.2", 80)]
    finally:
        await good.close()
        await greedy.close()


async def test_too_many_streams_from_one_address_refuses_only_the_extra_one(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, max_streams_per_peer=2)
    put(sds, "a", "10.0.0.1:80")
    before = sample("sds_xds_refused_total", reason="too_many_streams")
    clients: list[XdsClient] = []
    try:
        for i in range(2):
            clients.append(XdsClient(sds.grpc_target, node=f"p{i}"))
            clients[i].send(resource_names=["a"])
            await clients[i].receive()
        clients.append(XdsClient(sds.grpc_target, node="extra"))
        clients[2].send(resource_names=["a"])
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await clients[2].receive()
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sample("sds_xds_refused_total", reason="too_many_streams") == before + 1
        await clients[0].close()
        async with asyncio.timeout(5):
            while len(sds.server.proxies.all()) > 1:
                await asyncio.sleep(0.02)
        again = XdsClient(sds.grpc_target, node="again")
        clients.append(again)
        again.send(resource_names=["a"])
        assert addresses(assignments(await again.receive())["a"]) == [("10.0.0.1", 80)]
    finally:
        for client in clients:
            await client.close()


# ----- short names that become ambiguous -----------------------------------------------------


async def test_subscribers_keep_their_target_while_a_short_name_is_ambiguous(
    fast_sds: RunningSds,
    open_client: Callable[..., XdsClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = fast_sds.registry
    registry.replace(Source.KUBERNETES, "users.prod", [Endpoint("10.1.0.1", 80, Source.KUBERNETES)])
    early = open_client(node="early")
    early.send(resource_names=["users"])
    first = await early.receive()
    assert addresses(assignments(first)["users"]) == [("10.1.0.1", 80)]
    early.ack(first, resource_names=["users"])
    kept_before = sample("sds_xds_ambiguous_kept_total")

    with caplog.at_level(logging.WARNING, logger="sds.xds"):
        registry.replace(
            Source.KUBERNETES, "users.staging", [Endpoint("10.2.0.1", 80, Source.KUBERNETES)]
        )
        await early.expect_silence()
    assert sample("sds_xds_ambiguous_kept_total") > kept_before
    assert sample("sds_xds_ambiguous_names") == 1
    assert any("ambiguous" in r.getMessage() for r in caplog.records)
    # A newcomer cannot know which one it means.
    late = open_client(node="late")
    late.send(resource_names=["users"])
    assert addresses(assignments(await late.receive())["users"]) == []

    # The one that stays in prod changes: the early subscriber follows it.
    registry.replace(Source.KUBERNETES, "users.prod", [Endpoint("10.1.0.2", 80, Source.KUBERNETES)])
    second = await early.receive()
    assert addresses(assignments(second)["users"]) == [("10.1.0.2", 80)]
    early.ack(second, resource_names=["users"])

    # prod goes away: the name is unambiguous again and means staging.
    registry.replace(Source.KUBERNETES, "users.prod", [])
    assert addresses(assignments(await early.receive())["users"]) == [("10.2.0.1", 80)]
    assert sample("sds_xds_ambiguous_names") == 0
