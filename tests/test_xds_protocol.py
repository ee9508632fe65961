"""The xDS protocol as a raw gRPC client sees it: SotW and delta, ADS and EDS, REST."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.protobuf import json_format

from sds.model import Endpoint, Health, Source
from sds.xds.resources import EDS_TYPE_URL
from tests.conftest import SDS_AUTH, RunningSds, put
from tests.xds_client import XdsClient, addresses, assignments

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


@pytest.mark.parametrize("ads", [True, False], ids=["ads", "eds"])
async def test_sotw_first_request_gets_the_subscribed_assignments(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient], ads: bool
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80", "10.0.0.2:80")
    client = open_client(ads=ads)
    client.send(resource_names=["usersvc"])
    response = await client.receive()
    assert response.type_url == EDS_TYPE_URL
    assert response.version_info
    assert response.nonce
    cla = assignments(response)["usersvc"]
    assert addresses(cla) == [("10.0.0.1", 80), ("10.0.0.2", 80)]


async def test_sotw_pushes_on_change_of_a_subscribed_service(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client()
    client.send(resource_names=["usersvc"])
    first = await client.receive()
    client.ack(first, resource_names=["usersvc"])
    put(fast_sds, "usersvc", "10.0.0.1:80", "10.0.0.3:80")
    second = await client.receive()
    assert second.version_info != first.version_info
    assert second.nonce != first.nonce
    assert addresses(assignments(second)["usersvc"]) == [("10.0.0.1", 80), ("10.0.0.3", 80)]


async def test_sotw_ack_brings_no_new_response(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client()
    client.send(resource_names=["usersvc"])
    client.ack(await client.receive(), resource_names=["usersvc"])
    await client.expect_silence()


async def test_change_to_an_unsubscribed_service_sends_nothing(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client()
    client.send(resource_names=["usersvc"])
    client.ack(await client.receive(), resource_names=["usersvc"])
    put(fast_sds, "othersvc", "10.9.0.1:80")
    await client.expect_silence()


async def test_heartbeat_only_change_sends_nothing(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    async with httpx.AsyncClient(base_url=fast_sds.url, headers=SDS_AUTH) as http:
        await http.post("/v1/registration/usersvc", json={"ip": "10.0.0.1", "port": 80})
        client = open_client()
        client.send(resource_names=["usersvc"])
        client.ack(await client.receive(), resource_names=["usersvc"])
        await http.post("/v1/registration/usersvc", json={"ip": "10.0.0.1", "port": 80})
        await client.expect_silence()


async def test_unknown_service_gets_an_empty_assignment_at_once(
    open_client: Callable[..., XdsClient],
) -> None:
    client = open_client()
    client.send(resource_names=["ghost"])
    cla = assignments(await client.receive())["ghost"]
    assert list(cla.endpoints) == []


async def test_plain_name_resolves_to_the_unique_kubernetes_service(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    fast_sds.registry.replace(
        Source.KUBERNETES, "usersvc.prod", [Endpoint("10.1.0.1", 8080, Source.KUBERNETES)]
    )
    client = open_client()
    client.send(resource_names=["usersvc", "usersvc.prod"])
    response = assignments(await client.receive())
    assert addresses(response["usersvc"]) == [("10.1.0.1", 8080)]
    assert addresses(response["usersvc.prod"]) == [("10.1.0.1", 8080)]


async def test_health_weight_zone_and_canary_are_mapped(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    fast_sds.registry.replace(
        Source.KUBERNETES,
        "usersvc.prod",
        [
            Endpoint("10.1.0.1", 80, Source.KUBERNETES, zone="a", weight=7, canary=True),
            Endpoint("10.1.0.2", 80, Source.KUBERNETES, zone="b", health=Health.DRAINING),
            Endpoint("10.1.0.3", 80, Source.KUBERNETES, zone="b", health=Health.UNHEALTHY),
        ],
    )
    client = open_client()
    client.send(resource_names=["usersvc"])
    cla = assignments(await client.receive())["usersvc"]
    by_zone = {group.locality.zone: list(group.lb_endpoints) for group in cla.endpoints}
    [canary] = by_zone["a"]
    assert canary.load_balancing_weight.value == 7
    assert canary.health_status == health_check_pb2.HEALTHY
    assert canary.metadata.filter_metadata["envoy.lb"]["canary"] is True
    assert [lb.health_status for lb in by_zone["b"]] == [
        health_check_pb2.DRAINING,
        health_check_pb2.UNHEALTHY,
    ]


async def test_nack_is_recorded_and_not_retried(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client(node="nacker")
    client.send(resource_names=["usersvc"])
    response = await client.receive()
    client.nack(response, "bad endpoint", resource_names=["usersvc"])
    await client.expect_silence()
    async with httpx.AsyncClient(base_url=fast_sds.url, headers=SDS_AUTH) as http:
        [proxy] = (await http.get("/debug/proxies")).json()["proxies"]
        metrics = (await http.get("/metrics")).text
    assert proxy["node_id"] == "nacker"
    assert proxy["state"] == "NACKED"
    assert proxy["last_nack"] == "bad endpoint"
    assert 'sds_xds_nacks_total{transport="sotw"}' in metrics


async def test_change_after_a_nack_is_pushed(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client()
    client.send(resource_names=["usersvc"])
    client.nack(await client.receive(), "nope", resource_names=["usersvc"])
    put(fast_sds, "usersvc", "10.0.0.2:80")
    assert addresses(assignments(await client.receive())["usersvc"]) == [("10.0.0.2", 80)]


async def test_stale_nonce_is_ignored(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client()
    client.send(resource_names=["usersvc"])
    first = await client.receive()
    put(fast_sds, "usersvc", "10.0.0.2:80")
    second = await client.receive()
    # A request answering the superseded response, even with a new subscription, is stale.
    client.send(response_nonce=first.nonce, resource_names=["usersvc", "othersvc"])
    await client.expect_silence()
    client.ack(second, resource_names=["usersvc", "othersvc"])
    third = await client.receive()
    assert set(assignments(third)) == {"usersvc", "othersvc"}


async def test_subscription_change_is_answered_with_the_new_set(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client()
    client.send(resource_names=["a"])
    first = await client.receive()
    client.ack(first, resource_names=["a", "b"])
    assert set(assignments(await client.receive())) == {"a", "b"}


async def test_unknown_type_on_ads_gets_an_empty_answer(
    open_client: Callable[..., XdsClient],
) -> None:
    client = open_client()
    client.send(type_url=CLUSTER_TYPE_URL)
    response = await client.receive()
    assert response.type_url == CLUSTER_TYPE_URL
    assert list(response.resources) == []


async def test_other_type_on_the_eds_service_is_invalid_argument(
    open_client: Callable[..., XdsClient],
) -> None:
    client = open_client(ads=False)
    client.send(type_url=CLUSTER_TYPE_URL)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await client.receive()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ads_request_without_type_url_is_invalid_argument(
    open_client: Callable[..., XdsClient],
) -> None:
    client = open_client()
    client.send(type_url="")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await client.receive()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_disconnecting_mid_stream_leaves_the_server_serving(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    gone = open_client(node="gone")
    gone.send(resource_names=["usersvc"])
    await gone.receive()
    await gone.close()
    put(fast_sds, "usersvc", "10.0.0.2:80")
    async with asyncio.timeout(5):
        while fast_sds.server.proxies.all():
            await asyncio.sleep(0.05)
    fresh = open_client(node="fresh")
    fresh.send(resource_names=["usersvc"])
    assert addresses(assignments(await fresh.receive())["usersvc"]) == [("10.0.0.2", 80)]


@pytest.mark.parametrize("ads", [True, False], ids=["ads", "eds"])
async def test_delta_sends_only_changed_resources_with_versions(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient], ads: bool
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client(delta=True, ads=ads)
    client.send(resource_names_subscribe=["a", "b"])
    first = await client.receive()
    versions = {r.name: r.version for r in first.resources}
    assert set(versions) == {"a", "b"}
    assert all(versions.values())
    client.ack(first)
    put(fast_sds, "b", "10.0.0.2:80", "10.0.0.3:80")
    second = await client.receive()
    assert [r.name for r in second.resources] == ["b"]
    assert second.resources[0].version != versions["b"]
    assert addresses(assignments(second)["b"]) == [("10.0.0.2", 80), ("10.0.0.3", 80)]


async def test_delta_reconnect_with_current_versions_gets_nothing_to_do(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    first_stream = open_client(delta=True)
    first_stream.send(resource_names_subscribe=["a"])
    first = await first_stream.receive()
    version = first.resources[0].version
    again = open_client(delta=True)
    again.send(resource_names_subscribe=["a"], initial_resource_versions={"a": version})
    await again.expect_silence()
    put(fast_sds, "a", "10.0.0.9:80")
    assert [r.name for r in (await again.receive()).resources] == ["a"]


async def test_delta_subscribe_later_sends_just_the_new_one(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client(delta=True)
    client.send(resource_names_subscribe=["a"])
    client.ack(await client.receive())
    client.send(resource_names_subscribe=["b"])
    assert [r.name for r in (await client.receive()).resources] == ["b"]


async def test_delta_unsubscribed_resource_is_no_longer_pushed(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    client = open_client(delta=True)
    client.send(resource_names_subscribe=["a"])
    client.ack(await client.receive())
    # Subscribing to b in the same request gives an answer that shows it was processed.
    client.send(resource_names_unsubscribe=["a"], resource_names_subscribe=["b"])
    assert [r.name for r in (await client.receive()).resources] == ["b"]
    put(fast_sds, "a", "10.0.0.2:80")
    await client.expect_silence()


async def test_burst_of_changes_is_coalesced_into_few_pushes(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.2)
    client = XdsClient(sds.grpc_target)
    try:
        client.send(resource_names=["usersvc"])
        client.ack(await client.receive(), resource_names=["usersvc"])
        for i in range(1, 21):
            put(sds, "usersvc", *(f"10.0.0.{n}:80" for n in range(1, i + 1)))
            await asyncio.sleep(0)  # the loop runs between changes, well within the window
        pushed = await client.receive()
        assert len(addresses(assignments(pushed)["usersvc"])) == 20
        client.ack(pushed, resource_names=["usersvc"])
        await client.expect_silence(0.5)
    finally:
        await client.close()


async def test_fetch_endpoints_answers_once(fast_sds: RunningSds) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    async with grpc.aio.insecure_channel(fast_sds.grpc_target) as channel:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
        response = await stub.FetchEndpoints(
            discovery_pb2.DiscoveryRequest(resource_names=["usersvc"], type_url=EDS_TYPE_URL),
            timeout=5,
        )
    assert addresses(assignments(response)["usersvc"]) == [("10.0.0.1", 80)]


async def test_rest_answers_then_304_while_current(fast_sds: RunningSds) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    request = {
        "node": {"id": "rest-edge", "cluster": "edge"},
        "resource_names": ["usersvc"],
        "type_url": EDS_TYPE_URL,
    }
    async with httpx.AsyncClient(base_url=fast_sds.url, headers=SDS_AUTH) as http:
        first = await http.post("/v3/discovery:endpoints", json=request)
        assert first.status_code == 200
        body = first.json()
        response = json_format.ParseDict(
            body, discovery_pb2.DiscoveryResponse(), ignore_unknown_fields=True
        )
        assert addresses(assignments(response)["usersvc"]) == [("10.0.0.1", 80)]
        assert body["resources"][0]["@type"] == EDS_TYPE_URL
        current = await http.post(
            "/v3/discovery:endpoints", json={**request, "version_info": body["version_info"]}
        )
        assert current.status_code == 304
        put(fast_sds, "usersvc", "10.0.0.2:80")
        changed = await http.post(
            "/v3/discovery:endpoints", json={**request, "version_info": body["version_info"]}
        )
        assert changed.status_code == 200
        proxies = (await http.get("/debug/proxies")).json()["proxies"]
    assert [(p["node_id"], p["transport"]) for p in proxies] == [("rest-edge", "rest")]


async def test_rest_accepts_camel_case_requests(fast_sds: RunningSds) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    async with httpx.AsyncClient(base_url=fast_sds.url, headers=SDS_AUTH) as http:
        response = await http.post(
            "/v3/discovery:endpoints",
            json={"resourceNames": ["usersvc"], "typeUrl": EDS_TYPE_URL, "versionInfo": ""},
        )
    assert response.status_code == 200
    assert len(response.json()["resources"]) == 1


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"resource_names": "usersvc"}', b'{"type_url": "type.googleapis.com/x"}'],
    ids=["malformed", "wrong-type", "other-type-url"],
)
async def test_rest_bad_request_is_400_with_message(fast_sds: RunningSds, body: bytes) -> None:
    async with httpx.AsyncClient(base_url=fast_sds.url, headers=SDS_AUTH) as http:
        response = await http.post(
            "/v3/discovery:endpoints", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]


async def test_sotw_empty_resource_list_after_subscribing_means_nothing(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client()
    client.send(resource_names=["a"])
    first = await client.receive()
    client.ack(first, resource_names=[])
    second = await client.receive()
    assert list(second.resources) == []
    client.ack(second, resource_names=[])
    put(fast_sds, "b", "10.0.0.3:80")
    await client.expect_silence()


async def test_star_subscribes_to_every_service(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "a", "10.0.0.1:80")
    put(fast_sds, "b", "10.0.0.2:80")
    client = open_client()
    client.send(resource_names=["*"])
    assert set(assignments(await client.receive())) == {"a", "b"}


# ----- warm-up: a fresh start is not a restart ------------------------------------------------


async def test_fresh_proxy_gets_empty_answers_at_once_during_the_warmup(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0, xds_debounce=0.0)
    put(sds, "known", "10.0.0.1:80")
    client = XdsClient(sds.grpc_target)
    try:
        client.send(resource_names=["known", "ghost"])
        first = await client.receive()
    finally:
        await client.close()
    assert set(assignments(first)) == {"known", "ghost"}
    assert list(assignments(first)["ghost"].endpoints) == []


async def test_reconnecting_proxy_keeps_its_endpoints_until_the_warmup_ends(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=5.0, xds_debounce=0.0)
    # Only one of its hosts has checked in again so far: not an answer to give yet.
    put(sds, "known", "10.0.0.1:80")
    client = XdsClient(sds.grpc_target)
    try:
        # The version it accepted from the sds before this one restarted.
        client.send(resource_names=["known", "ghost"], version_info="0123456789abcdef")
        await client.expect_silence()
        put(sds, "known", "10.0.0.1:80", "10.0.0.2:80")
        after = await client.receive(timeout=10)
    finally:
        await client.close()
    assert addresses(assignments(after)["known"]) == [("10.0.0.1", 80), ("10.0.0.2", 80)]
    assert list(assignments(after)["ghost"].endpoints) == []


async def test_proxy_reconnecting_with_a_version_from_this_sds_is_answered_at_once(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0, xds_debounce=0.0)
    put(sds, "known", "10.0.0.1:80")
    fresh = XdsClient(sds.grpc_target)
    try:
        fresh.send(resource_names=["known"])
        given = await fresh.receive()
    finally:
        await fresh.close()
    put(sds, "known", "10.0.0.1:80", "10.0.0.2:80")
    again = XdsClient(sds.grpc_target)
    try:
        again.send(resource_names=["known"], version_info=given.version_info)
        answer = await again.receive()
    finally:
        await again.close()
    assert addresses(assignments(answer)["known"]) == [("10.0.0.1", 80), ("10.0.0.2", 80)]


async def test_reconnecting_proxy_gets_names_it_adds_at_once(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0, xds_debounce=0.0)
    put(sds, "known", "10.0.0.1:80")
    client = XdsClient(sds.grpc_target)
    try:
        client.send(resource_names=["known", "ghost"], version_info="0123456789abcdef")
        await client.expect_silence()
        client.send(resource_names=["known", "ghost", "new"], version_info="0123456789abcdef")
        added = await client.receive()
    finally:
        await client.close()
    assert set(assignments(added)) == {"new"}


async def test_delta_reconnect_withholds_only_what_the_proxy_had(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0, xds_debounce=0.0)
    put(sds, "known", "10.0.0.1:80")
    client = XdsClient(sds.grpc_target, delta=True)
    try:
        client.send(
            resource_names_subscribe=["known", "ghost", "new"],
            initial_resource_versions={"known": "0123456789abcdef", "ghost": "fedcba9876543210"},
        )
        first = await client.receive()
        assert [r.name for r in first.resources] == ["new"]
        client.ack(first)
        put(sds, "known", "10.0.0.1:80", "10.0.0.2:80")
        await client.expect_silence()
    finally:
        await client.close()


async def rest_poll(http: httpx.AsyncClient, version: str = "") -> httpx.Response:
    return await http.post(
        "/v3/discovery:endpoints",
        json={"resource_names": ["ghost"], "type_url": EDS_TYPE_URL, "version_info": version},
    )


async def test_rest_answers_a_fresh_poller_at_once_during_the_warmup(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0)
    async with httpx.AsyncClient(base_url=sds.url) as http:
        first = await rest_poll(http)
        again = await rest_poll(http, first.json()["version_info"])
        put(sds, "ghost", "10.0.0.1:80")
        grown = await rest_poll(http, first.json()["version_info"])
    assert first.status_code == 200
    assert first.json()["resources"][0]["cluster_name"] == "ghost"
    assert again.status_code == 304
    assert grown.status_code == 200
    assert "10.0.0.1" in grown.text


async def test_rest_says_503_to_a_poller_that_had_endpoints_during_the_warmup(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(registration_warmup=30.0)
    async with httpx.AsyncClient(base_url=sds.url) as http:
        response = await rest_poll(http, "0123456789abcdef")
    assert response.status_code == 503


async def test_v1_says_503_during_the_warmup_unless_the_etag_shows_no_hosts(
    start_sds: Callable[..., Any],
) -> None:
    settled: RunningSds = await start_sds()
    warming: RunningSds = await start_sds(registration_warmup=30.0)
    async with httpx.AsyncClient() as http:
        # ETags are content hashes: the same on every sds.
        empty_etag = (await http.get(f"{settled.url}/v1/registration/ghost")).headers["etag"]
        plain = await http.get(f"{warming.url}/v1/registration/ghost")
        had_hosts = await http.get(
            f"{warming.url}/v1/registration/ghost", headers={"if-none-match": 'W/"other"'}
        )
        had_none = await http.get(
            f"{warming.url}/v1/registration/ghost", headers={"if-none-match": empty_etag}
        )
        ready = await http.get(f"{warming.url}/readyz")
        await http.post(
            f"{warming.url}/v1/registration/known",
            json={"ip": "10.0.0.1", "port": 80},
            headers=SDS_AUTH,
        )
        known = await http.get(f"{warming.url}/v1/registration/known")
    assert plain.status_code == had_hosts.status_code == 503
    assert "synced" in plain.json()["error"]
    assert had_none.status_code == 304
    assert ready.status_code == 503
    assert "warming up" in ready.json()["sources"]["registration"]["reason"]
    assert len(known.json()["hosts"]) == 1
