"""The live view's HTTP side: the page and its headers, the JSON endpoints, the event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import Node

from envoymesh.ports import free_port
from sds.model import Health
from sds.ui.live import MAX_DELTA_PROXIES, ProxyCounts, quantile
from sds.ui.router import MAX_CLIENTS
from sds.ui.views import proxy_totals
from sds.xds.proxies import ProxyTracker
from tests.conftest import SDS_AUTH, RunningSds, gateway_yaml, put
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


@pytest.mark.parametrize(
    "path", ["/ui", "/ui/services", "/ui/proxies?node=a", "/ui/routes?filter=edge", "/ui/push"]
)
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
    for path in ("/ui/api/services", "/ui/api/proxies", "/ui/api/routes"):
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


# ----- routes -------------------------------------------------------------------------------

GROUP = "gateway.networking.k8s.io"


def http_route(name: str, *backends: tuple[str, int], parent: str = "edge") -> dict[str, Any]:
    """An HTTPRoute on Gateway ``default/<parent>`` sending ``/name`` to weighted backends."""
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": parent}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": f"/{name}"}}],
                    "backendRefs": [
                        {"name": service, "port": 8080, "weight": weight}
                        for service, weight in backends
                    ],
                }
            ],
        },
    }


@dataclass
class ConfigSds:
    """An sds over a config directory holding Gateway ``default/edge``."""

    sds: RunningSds
    directory: Path

    def write(self, name: str, *documents: dict[str, Any]) -> None:
        """Write one file of the directory atomically."""
        partial = self.directory / f".{name}.partial"
        partial.write_text(yaml.safe_dump_all(documents))
        partial.replace(self.directory / name)


@pytest.fixture
async def config_sds(start_sds: Callable[..., Any], tmp_path: Path) -> ConfigSds:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "gateway.yaml").write_text(gateway_yaml(free_port()))
    sds: RunningSds = await start_sds(config_dir=str(directory), xds_debounce=0.0)
    return ConfigSds(sds, directory)


async def routes_until(
    sds: RunningSds, found: Callable[[dict[str, Any]], bool], query: str = ""
) -> dict[str, Any]:
    """The first ``/ui/api/routes`` answer ``found`` accepts (files are read asynchronously)."""
    async with asyncio.timeout(DEADLINE), httpx.AsyncClient(base_url=sds.url) as client:
        while True:
            page: dict[str, Any] = (await client.get(f"/ui/api/routes{query}")).json()
            if found(page):
                return page
            await asyncio.sleep(0.05)


def route_named(page: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in page["routes"] if r["name"] == name), None)


def reasons(route: dict[str, Any]) -> dict[str, tuple[str, str]]:
    [parent] = route["parents"]
    return {c["type"]: (c["status"], c["reason"]) for c in parent["conditions"]}


async def test_routes_show_the_gateway_its_listener_and_each_rules_weighted_clusters(
    config_sds: ConfigSds,
) -> None:
    put(config_sds.sds, "a", "10.0.0.1:8080")
    put(config_sds.sds, "b", "10.0.0.2:8080")
    config_sds.write("route.yaml", http_route("shop", ("a", 3), ("b", 1)))
    page = await routes_until(config_sds.sds, lambda p: route_named(p, "shop") is not None)
    [gateway] = page["gateways"]
    [listener] = gateway["listeners"]
    route = route_named(page, "shop")
    assert route is not None
    assert (gateway["namespace"], gateway["name"]) == ("default", "edge")
    assert (listener["name"], listener["attached_routes"]) == ("http", 1)
    assert listener["supported_kinds"] == ["HTTPRoute", "GRPCRoute"]
    assert reasons(route) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    assert route["failing"] is False
    assert route["parents"][0]["parent_ref"]["name"] == "edge"
    assert route["rules"] == [
        {
            "index": 0,
            "backends": [
                {"cluster": "default/a/8080", "weight": 3},
                {"cluster": "default/b/8080", "weight": 1},
            ],
        }
    ]
    assert page["totals"] == {"gateways": 1, "routes": 1, "failing": 0, "problems": 0}


async def test_a_listener_without_conflicts_is_healthy_though_conflicted_is_false(
    config_sds: ConfigSds,
) -> None:
    page = await routes_until(config_sds.sds, lambda p: bool(p["gateways"]))
    [listener] = page["gateways"][0]["listeners"]
    by_type = {c["type"]: (c["status"], c["healthy"]) for c in listener["conditions"]}
    assert by_type["Conflicted"] == ("False", True)
    assert by_type["Accepted"] == ("True", True)


async def test_a_route_whose_backend_is_missing_shows_backend_not_found(
    config_sds: ConfigSds,
) -> None:
    config_sds.write("route.yaml", http_route("ghostly", ("ghost", 1)))
    page = await routes_until(config_sds.sds, lambda p: route_named(p, "ghostly") is not None)
    route = route_named(page, "ghostly")
    assert route is not None
    assert reasons(route)["ResolvedRefs"] == ("False", "BackendNotFound")
    assert "ghost" in route["parents"][0]["conditions"][1]["message"]
    assert route["failing"] is True
    assert route["rules"][0]["backends"] == [{"cluster": None, "weight": 1}]
    assert page["totals"]["failing"] == 1


async def test_a_grpc_route_attached_to_a_service_is_listed_with_its_status(
    config_sds: ConfigSds,
) -> None:
    put(config_sds.sds, "greeter", "10.0.0.3:50051")
    config_sds.write(
        "grpc.yaml",
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "greet", "namespace": "default"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
                "rules": [{"backendRefs": [{"name": "greeter", "port": 50051}]}],
            },
        },
    )
    page = await routes_until(
        config_sds.sds, lambda p: route_named(p, "greet") is not None, "?kind=GRPCRoute"
    )
    route = route_named(page, "greet")
    assert route is not None
    assert route["kind"] == "GRPCRoute"
    assert route["parents"][0]["parent_ref"]["kind"] == "Service"
    assert reasons(route)["Accepted"] == ("True", "Accepted")
    assert route["rules"][0]["backends"] == [{"cluster": "default/greeter/50051", "weight": 1}]


async def test_routes_are_filtered_by_kind_and_name_and_paged(config_sds: ConfigSds) -> None:
    config_sds.write("routes.yaml", *(http_route(f"r{i}", ("a", 1)) for i in range(5)))
    await routes_until(config_sds.sds, lambda p: p["total"] == 5)
    async with httpx.AsyncClient(base_url=config_sds.sds.url) as client:
        second = (await client.get("/ui/api/routes", params={"offset": 2, "limit": 2})).json()
        named = (await client.get("/ui/api/routes", params={"filter": "DEFAULT/R3"})).json()
        by_parent = (await client.get("/ui/api/routes", params={"filter": "default/edge"})).json()
        grpc = (await client.get("/ui/api/routes", params={"kind": "GRPCRoute"})).json()
        bad = await client.get("/ui/api/routes", params={"kind": "TCPRoute"})
    assert [r["name"] for r in second["routes"]] == ["r2", "r3"]
    assert (second["total"], second["offset"], second["limit"]) == (5, 2, 2)
    assert [r["name"] for r in named["routes"]] == ["r3"]
    assert named["gateways_total"] == 0
    assert (by_parent["total"], by_parent["gateways_total"]) == (5, 1)
    assert grpc["total"] == 0
    assert bad.status_code == 400
    assert "kind" in bad.json()["error"]


async def test_a_refused_file_is_listed_with_its_path_and_message(config_sds: ConfigSds) -> None:
    (config_sds.directory / "broken.yaml").write_text("kind: HTTPRoute\nspec: [unclosed\n")
    page = await routes_until(config_sds.sds, lambda p: bool(p["problems"]))
    [problem] = page["problems"]
    assert problem["file"] == "broken.yaml"
    assert "does not parse" in problem["message"]
    assert problem["path"].startswith("line ")
    assert page["totals"]["problems"] == 1


async def test_the_snapshot_carries_route_totals(config_sds: ConfigSds) -> None:
    await routes_until(config_sds.sds, lambda p: p["totals"]["gateways"] == 1)
    async with (
        httpx.AsyncClient(base_url=config_sds.sds.url) as client,
        client.stream("GET", "/ui/api/events") as response,
    ):
        name, snapshot = await Events(response).next()
    assert name == "snapshot"
    assert snapshot["routes"] == {"gateways": 1, "routes": 0, "failing": 0, "problems": 0}


async def test_writing_a_route_file_is_a_routes_delta(config_sds: ConfigSds) -> None:
    await routes_until(config_sds.sds, lambda p: p["totals"]["gateways"] == 1)
    async with events(config_sds.sds) as stream:
        config_sds.write("route.yaml", http_route("fresh", ("a", 1)))
        delta = await stream.until(
            lambda d: d.get("routes", {}).get("totals", {}).get("routes") == 1
        )
    assert delta["routes"]["reload"] is True


async def test_a_backend_appearing_is_a_routes_delta_that_resolves_the_route(
    config_sds: ConfigSds,
) -> None:
    config_sds.write("route.yaml", http_route("waiting", ("late", 1)))
    await routes_until(config_sds.sds, lambda p: p["totals"]["failing"] == 1)
    async with events(config_sds.sds) as stream:
        put(config_sds.sds, "late", "10.0.0.9:8080")
        delta = await stream.until(lambda d: "routes" in d)
    assert delta["routes"]["totals"]["failing"] == 0
    page = await routes_until(config_sds.sds, lambda p: True)
    route = route_named(page, "waiting")
    assert route is not None
    assert reasons(route)["ResolvedRefs"] == ("True", "ResolvedRefs")


async def test_a_refused_file_is_a_routes_delta(config_sds: ConfigSds) -> None:
    await routes_until(config_sds.sds, lambda p: p["totals"]["gateways"] == 1)
    async with events(config_sds.sds) as stream:
        (config_sds.directory / "broken.yaml").write_text("{nope")
        delta = await stream.until(lambda d: "routes" in d)
    assert delta["routes"]["totals"]["problems"] == 1


# ----- ten thousand proxies -----------------------------------------------------------------

FLEET = 10_000


def fleet(tracker: ProxyTracker) -> list[Any]:
    """FLEET connected statuses: every third one has an ACKed push (SYNCED)."""
    statuses = []
    for i in range(FLEET):
        status = tracker.connect(Node(id=f"proxy-{i}", cluster="fleet"), "sotw", "ads")
        if i % 3 == 0:
            status.last_version_sent = status.last_version_acked = "v1"
        statuses.append(status)
    return statuses


async def test_ten_thousand_proxies_are_paged_with_exact_totals(sds: RunningSds) -> None:
    fleet(sds.server.proxies)
    async with httpx.AsyncClient(base_url=sds.url) as client:
        page = (await client.get("/ui/api/proxies", params={"offset": 9_990, "limit": 50})).json()
        synced = (await client.get("/ui/api/proxies", params={"state": "SYNCED"})).json()
    assert (page["total"], len(page["proxies"])) == (FLEET, 10)
    assert page["proxies"][-1]["node_id"] == f"proxy-{FLEET - 1}"
    assert (synced["total"], len(synced["proxies"])) == (3_334, 50)
    assert page["totals"]["by_state"] == {"SYNCED": 3_334, "STALE": 6_666, "NACKED": 0}


async def test_one_proxy_changing_among_ten_thousand_is_a_delta_of_one(sds: RunningSds) -> None:
    statuses = fleet(sds.server.proxies)
    async with events(sds) as stream:
        changing = statuses[1]
        changing.last_version_sent = changing.last_version_acked = "v2"
        sds.server.proxies.touch(changing)
        delta = await stream.until(lambda d: "proxies" in d)
    [proxy] = delta["proxies"]["changed"]
    assert proxy["node_id"] == "proxy-1"
    assert delta["proxies"]["removed"] == []
    assert delta["proxies"]["totals"]["by_state"] == {"SYNCED": 3_335, "STALE": 6_665, "NACKED": 0}
    assert len(json.dumps(delta)) < 5_000


def test_proxy_counters_agree_with_a_recount_and_cost_less(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tracker = ProxyTracker()
    statuses = fleet(tracker)
    counts = ProxyCounts()
    counts.recount(tracker.all())
    started = time.perf_counter()
    for status in statuses[:100]:
        status.last_version_sent = "v9"
        counts.update(status.id, status)
    tracker.disconnect(statuses[-1])
    counts.update(statuses[-1].id, None)
    counted = time.perf_counter() - started
    started = time.perf_counter()
    recounted = proxy_totals(tracker.all())
    walked = time.perf_counter() - started
    assert counts.totals() == recounted
    with capsys.disabled():
        print(
            f"\n{FLEET} proxies: 101 changes through counters {counted * 1e3:.2f} ms;"
            f" one recount over every proxy (what each delta did) {walked * 1e3:.2f} ms"
        )
