"""The live view's HTTP side: the page and its headers, the JSON endpoints, the event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from envoy.config.core.v3.base_pb2 import Node

from sds.model import Health
from sds.ui.live import MAX_DELTA_PROXIES, quantile
from sds.ui.router import MAX_CLIENTS
from sds.xds.proxies import ProxyTracker
from tests.conftest import SDS_AUTH, RunningSds, put
from tests.xds_client import XdsClient

DEADLINE = 10.0


class Events:
    """An open ``/ui/api/events`` stream, read event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, dict[str, Any]]:
        """The next event (comments and pings skipped): its name and its data."""
        name, data = "message", ""
        async for line in self._lines:
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif not line and data:
                return name, json.loads(data)
        raise AssertionError("the stream ended")

    async def until(self, found: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first delta ``found`` accepts; fails after DEADLINE seconds."""
        async with asyncio.timeout(DEADLINE):
            while True:
                name, data = await self.next()
                if name == "delta" and found(data):
                    return data


@contextlib.asynccontextmanager
async def events(sds: RunningSds) -> AsyncIterator[Events]:
    """The event stream of ``sds``, its snapshot already read and checked."""
    async with (
        httpx.AsyncClient(base_url=sds.url, timeout=DEADLINE) as client,
        client.stream("GET", "/ui/api/events") as response,
    ):
        assert response.status_code == 200
        stream = Events(response)
        name, _ = await stream.next()
        assert name == "snapshot"
        yield stream


def changed(data: dict[str, Any], panel: str) -> list[dict[str, Any]]:
    return list(data.get(panel, {}).get("changed", []))


@pytest.fixture
async def http(sds: RunningSds) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sds.url, timeout=DEADLINE) as client:
        yield client


# ----- the page -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ui", "/ui/services", "/ui/proxies?node=a", "/ui/push"])
async def test_every_panel_url_serves_the_page_with_a_strict_policy(
    http: httpx.AsyncClient, path: str
) -> None:
    response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


async def test_the_page_loads_nothing_from_elsewhere_and_has_no_inline_script(
    http: httpx.AsyncClient,
) -> None:
    page = (await http.get("/ui")).text
    assert re.findall(r"<script(?![^>]*\bsrc=)", page) == []
    assert re.findall(r"(?:src|href)=\"(?:https?:)?//", page) == []
    assert " style=" not in page


async def test_assets_are_served_with_their_types_and_cached_for_good(
    http: httpx.AsyncClient,
) -> None:
    page = (await http.get("/ui")).text
    links = re.findall(r"\"(/ui/static/[^\"]+)\"", page)
    assert len(links) == 2
    for link in links:
        response = await http.get(link)
        assert response.status_code == 200
        kind = "text/javascript" if ".js?" in link else "text/css"
        assert response.headers["content-type"].startswith(kind)
        assert "immutable" in response.headers["cache-control"]
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_the_script_never_parses_data_as_html(http: httpx.AsyncClient) -> None:
    script = (await http.get("/ui/static/app.js")).text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


async def test_an_unknown_asset_is_a_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/ui/static/secrets.txt")
    assert response.status_code == 404
    assert response.json() == {"error": "no such asset"}


async def test_with_the_ui_off_nothing_under_ui_answers(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(ui="off")
    assert sds.server.ui is None
    async with httpx.AsyncClient(base_url=sds.url) as client:
        for path in ("/ui", "/ui/proxies", "/ui/api/services", "/ui/api/events"):
            assert (await client.get(path)).status_code == 404
        document = (await client.get("/openapi.json")).json()
    assert not [p for p in document["paths"] if p.startswith("/ui")]


# ----- services -----------------------------------------------------------------------------


async def test_services_show_health_zone_weight_tags_and_source(
    sds: RunningSds, http: httpx.AsyncClient
) -> None:
    put(
        sds,
        "usersvc",
        "10.0.0.1:80",
        zone="eu-1a",
        weight=7,
        tags=(("version", "v2"),),
        health=Health.DRAINING,
    )
    page = (await http.get("/ui/api/services")).json()
    [service] = page["services"]
    [endpoint] = service["endpoints"]
    assert service["name"] == "usersvc"
    assert service["health"] == {"HEALTHY": 0, "DRAINING": 1, "UNHEALTHY": 0}
    assert endpoint["zone"] == "eu-1a"
    assert endpoint["weight"] == 7
    assert endpoint["tags"] == {"version": "v2"}
    assert endpoint["source"] == "registration"
    assert page["totals"] == {
        "services": 1,
        "endpoints": 1,
        "health": {"HEALTHY": 0, "DRAINING": 1, "UNHEALTHY": 0},
    }


async def test_registered_hosts_show_their_last_heartbeat(http: httpx.AsyncClient) -> None:
    before = time.time()
    registered = await http.post(
        "/v1/registration/usersvc", json={"ip": "10.0.0.1", "port": 80}, headers=SDS_AUTH
    )
    assert registered.status_code == 200
    [endpoint] = (await http.get("/ui/api/services")).json()["services"][0]["endpoints"]
    assert endpoint["last_heartbeat"] >= before - 1


async def test_services_are_filtered_by_name_or_address_and_paged(
    sds: RunningSds, http: httpx.AsyncClient
) -> None:
    for i in range(5):
        put(sds, f"svc-{i}", f"10.0.1.{i + 1}:80")
    put(sds, "other", "10.9.9.9:80")
    page = (await http.get("/ui/api/services", params={"filter": "SVC", "limit": 2})).json()
    assert (page["total"], [s["name"] for s in page["services"]]) == (5, ["svc-0", "svc-1"])
    page = (await http.get("/ui/api/services?filter=svc&offset=4&limit=2")).json()
    assert [s["name"] for s in page["services"]] == ["svc-4"]
    page = (await http.get("/ui/api/services", params={"filter": "10.9.9"})).json()
    assert [s["name"] for s in page["services"]] == ["other"]
    assert page["totals"]["services"] == 6


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=201", "offset=-1", "limit=ten", "filter=" + "x" * 201]
)
async def test_a_bad_page_request_is_a_400_naming_the_field(
    http: httpx.AsyncClient, query: str
) -> None:
    for path in ("/ui/api/services", "/ui/api/proxies"):
        response = await http.get(f"{path}?{query}")
        assert response.status_code == 400
        assert query.split("=", maxsplit=1)[0] in response.json()["error"]


# ----- proxies ------------------------------------------------------------------------------


async def test_proxies_show_each_client_with_its_state_and_last_push(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    synced, nacker = open_client(node="edge-1"), open_client(node="edge-2", delta=True)
    synced.send(resource_names=["usersvc"])
    synced.ack(await synced.receive(), resource_names=["usersvc"])
    nacker.send(resource_names_subscribe=["usersvc"])
    nacker.nack(await nacker.receive(), "unknown field <b>x</b>")
    async with httpx.AsyncClient(base_url=fast_sds.url) as client:
        async with asyncio.timeout(DEADLINE):
            while True:
                page = (await client.get("/ui/api/proxies")).json()
                states = {p["node_id"]: p["state"] for p in page["proxies"]}
                if states == {"edge-1": "SYNCED", "edge-2": "NACKED"}:
                    break
                await asyncio.sleep(0.05)
    by_node = {p["node_id"]: p for p in page["proxies"]}
    assert by_node["edge-2"]["last_nack"] == "unknown field <b>x</b>"
    assert by_node["edge-2"]["types"] == {
        "eds": {"state": "NACKED", "error": "unknown field <b>x</b>"}
    }
    assert by_node["edge-1"]["types"] == {"eds": {"state": "SYNCED", "error": ""}}
    assert by_node["edge-1"]["transport"] == "sotw"
    assert by_node["edge-2"]["transport"] == "delta"
    assert by_node["edge-1"]["cluster"] == "tests"
    assert by_node["edge-1"]["subscribed"] == ["usersvc"]
    assert page["totals"] == {
        "proxies": 2,
        "by_state": {"SYNCED": 1, "STALE": 0, "NACKED": 1},
        "by_transport": {"delta": 1, "sotw": 1},
    }


async def test_proxies_are_filtered_by_node_state_and_text(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    for node in ("gw-a", "gw-b", "sidecar-c"):
        client = open_client(node=node)
        client.send(resource_names=["usersvc"])
        await client.receive()
    async with httpx.AsyncClient(base_url=fast_sds.url) as http:
        exact = (await http.get("/ui/api/proxies", params={"node": "gw-b"})).json()
        text = (await http.get("/ui/api/proxies", params={"filter": "GW-"})).json()
        stale = (await http.get("/ui/api/proxies", params={"state": "STALE", "limit": 1})).json()
        bad = await http.get("/ui/api/proxies", params={"state": "BROKEN"})
    assert [p["node_id"] for p in exact["proxies"]] == ["gw-b"]
    assert [p["node_id"] for p in text["proxies"]] == ["gw-a", "gw-b"]
    assert (stale["total"], len(stale["proxies"])) == (3, 1)
    assert bad.status_code == 400


def test_the_tracker_records_changes_only_while_watched() -> None:
    tracker = ProxyTracker()
    status = tracker.connect(Node(id="n"), "sotw", "ads")
    assert tracker.take_touched() == set()
    assert not tracker.touched.is_set()
    tracker.watch(True)
    tracker.touch(status)
    assert tracker.touched.is_set()
    assert tracker.take_touched() == {status.id}
    tracker.disconnect(status)
    assert tracker.take_touched() == {status.id}
    assert tracker.get(status.id) is None


# ----- the event stream ---------------------------------------------------------------------


async def test_the_stream_opens_with_a_snapshot_of_totals_and_push_history(
    sds: RunningSds,
) -> None:
    put(sds, "usersvc", "10.0.0.1:80", "10.0.0.2:80")
    async with (
        httpx.AsyncClient(base_url=sds.url) as client,
        client.stream("GET", "/ui/api/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert "content-security-policy" in response.headers
        name, snapshot = await Events(response).next()
    assert name == "snapshot"
    assert snapshot["services"]["endpoints"] == 2
    assert snapshot["proxies"]["proxies"] == 0
    assert snapshot["push"]["interval"] == 1.0
    assert isinstance(snapshot["seq"], int)


async def test_a_changed_service_is_a_delta_with_its_new_view(sds: RunningSds) -> None:
    async with events(sds) as stream:
        put(sds, "usersvc", "10.0.0.1:80")
        delta = await stream.until(lambda d: bool(changed(d, "services")))
        [service] = changed(delta, "services")
        assert service["name"] == "usersvc"
        assert delta["services"]["totals"]["endpoints"] == 1
        put(sds, "usersvc")
        delta = await stream.until(lambda d: "services" in d)
        assert delta["services"]["removed"] == ["usersvc"]


async def test_deltas_are_numbered_and_page_answers_say_which_they_reflect(
    sds: RunningSds,
) -> None:
    async with events(sds) as stream:
        put(sds, "a", "10.0.0.1:80")
        first = await stream.until(lambda d: "services" in d)
        put(sds, "b", "10.0.0.2:80")
        second = await stream.until(lambda d: "services" in d)
        async with httpx.AsyncClient(base_url=sds.url) as client:
            page = (await client.get("/ui/api/services")).json()
    assert first["seq"] < second["seq"] <= page["seq"]


async def test_a_proxy_connecting_acking_and_leaving_are_deltas_by_id(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    async with events(fast_sds) as stream:
        client = open_client(node="edge-live")
        client.send(resource_names=["usersvc"])
        client.ack(await client.receive(), resource_names=["usersvc"])
        delta = await stream.until(
            lambda d: any(p["state"] == "SYNCED" for p in changed(d, "proxies"))
        )
        [proxy] = changed(delta, "proxies")
        assert proxy["node_id"] == "edge-live"
        await client.close()
        delta = await stream.until(lambda d: bool(d.get("proxies", {}).get("removed")))
        assert delta["proxies"]["removed"] == [proxy["id"]]
        assert delta["proxies"]["totals"]["proxies"] == 0


async def test_a_nack_is_a_delta_with_the_error_text(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client(node="nacker")
    client.send(resource_names=["usersvc"])
    response = await client.receive()
    async with events(fast_sds) as stream:
        client.nack(response, "bad endpoint", resource_names=["usersvc"])
        delta = await stream.until(
            lambda d: any(p["state"] == "NACKED" for p in changed(d, "proxies"))
        )
    [proxy] = changed(delta, "proxies")
    assert proxy["last_nack"] == "bad endpoint"
    assert delta["proxies"]["totals"]["by_state"]["NACKED"] == 1


async def test_more_proxy_changes_than_a_delta_carries_ask_for_a_reload(
    sds: RunningSds,
) -> None:
    tracker = sds.server.proxies
    async with events(sds) as stream:
        statuses = [
            tracker.connect(Node(id=f"n{i}"), "sotw", "ads") for i in range(MAX_DELTA_PROXIES + 1)
        ]
        delta = await stream.until(lambda d: "proxies" in d)
        for status in statuses:
            tracker.disconnect(status)
    assert delta["proxies"]["reload"] is True
    assert delta["proxies"]["totals"]["proxies"] == MAX_DELTA_PROXIES + 1


async def test_the_push_path_is_sampled_every_second(
    fast_sds: RunningSds, open_client: Callable[..., XdsClient]
) -> None:
    put(fast_sds, "usersvc", "10.0.0.1:80")
    client = open_client(node="pusher")
    client.send(resource_names=["usersvc"])
    response = await client.receive()
    client.ack(response, resource_names=["usersvc"])
    async with events(fast_sds) as stream:
        put(fast_sds, "usersvc", "10.0.0.2:80")
        client.ack(await client.receive(), resource_names=["usersvc"])
        delta = await stream.until(
            lambda d: any(s["pushes_per_second"] > 0 and s["acks"] for s in d.get("push", []))
        )
    [sample] = [s for s in delta["push"] if s["acks"]]
    assert 0 < sample["p50"] <= sample["p99"] <= 0.1
    async with httpx.AsyncClient(base_url=fast_sds.url) as http:
        history = (await http.get("/ui/api/push")).json()
    assert history["interval"] == 1.0
    assert sample in history["samples"]


def test_quantiles_interpolate_within_buckets_as_prometheus_does() -> None:
    bounds = [0.1, 0.5, 1.0, float("inf")]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 10, 10, 10]) == pytest.approx(0.05)
    assert quantile(0.5, bounds, [0, 4, 8, 8]) == pytest.approx(0.5)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 1.0


async def test_streams_beyond_the_cap_are_refused_with_a_503(sds: RunningSds) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(MAX_CLIENTS):
            await stack.enter_async_context(events(sds))
        async with httpx.AsyncClient(base_url=sds.url) as client:
            refused = await client.get("/ui/api/events")
            document = (await client.get("/openapi.json")).json()
    assert refused.status_code == 503
    documented = document["paths"]["/ui/api/events"]["get"]["responses"]["503"]["content"]
    assert list(documented) == [refused.headers["content-type"]]
    assert "too many" in refused.json()["error"]


async def test_a_closed_stream_frees_its_place(sds: RunningSds) -> None:
    assert sds.server.ui is not None
    hub = sds.server.ui
    async with events(sds):
        assert hub.clients == 1
    async with asyncio.timeout(DEADLINE):
        while hub.clients:
            put(sds, "wake", "10.0.0.1:80")  # a write is how a server notices a closed peer
            await asyncio.sleep(0.05)
            put(sds, "wake")


async def test_open_streams_end_when_sds_stops(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds()
    async with events(sds) as stream:
        started = time.monotonic()
        await sds.stop()
        with pytest.raises((AssertionError, httpx.HTTPError)):
            await stream.next()
    assert time.monotonic() - started < 5
