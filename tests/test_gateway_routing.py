"""HTTPRoutes from a config directory, served by a real Envoy that sds configures entirely.

The cases follow the Gateway API conformance suite's core HTTPRoute tests (and a few
Extended ones): each test writes routes into the config directory, waits until the Envoy
serves them (never restarting it), and checks which backend answered and what it received.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import yaml

from meshctl.routes import fetch_config, format_routes
from tests.conftest import GatewayMesh

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

DEADLINE = 20.0
GROUP = "gateway.networking.k8s.io"


def route(name: str, rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """An HTTPRoute attached to Gateway default/edge."""
    namespace = spec.pop("namespace", "default")
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"parentRefs": [{"name": "edge", "namespace": "default"}], "rules": rules, **spec},
    }


def documents(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs)


async def get(mesh: GatewayMesh, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(mesh.url + path, **kwargs)


async def eventually(check: Callable[[], Awaitable[Any]], deadline: float = DEADLINE) -> Any:
    """Run ``check`` until it returns something truthy (it may fail meanwhile)."""
    async with asyncio.timeout(deadline):
        while True:
            try:
                result = await check()
                if result:
                    return result
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.05)


async def backend_of(mesh: GatewayMesh, path: str, **kwargs: Any) -> str | int:
    """The backend that answered ``path``, or the status when no backend did."""
    response = await get(mesh, path, **kwargs)
    if response.status_code != 200:
        return response.status_code
    name: str = response.json()["backend"]
    return name


async def serves(mesh: GatewayMesh, path: str, expected: str | int, **kwargs: Any) -> None:
    """Wait until ``path`` reaches ``expected`` (a backend's name or a status)."""

    async def check() -> bool:
        return await backend_of(mesh, path, **kwargs) == expected

    await eventually(check)


async def route_status(mesh: GatewayMesh, name: str) -> dict[str, dict[str, Any]]:
    """The conditions of route ``name`` under Gateway default/edge, by type."""
    async with httpx.AsyncClient(timeout=5) as client:
        data = (await client.get(f"{mesh.sds.url}/debug/config")).json()
    for found in data["routes"]:
        if found["name"] == name:
            return {c["type"]: c for c in found["parents"][0]["conditions"]}
    return {}


@pytest.fixture
async def mesh(start_gateway: Callable[..., Any], echo_backends: Callable[..., Any]) -> GatewayMesh:
    """Gateway default/edge with registered echo services svc-a and svc-b."""
    gateway: GatewayMesh = await start_gateway()
    for name in ("svc-a", "svc-b"):
        await gateway.register(name, await echo_backends(name))
    return gateway


async def test_a_route_written_to_the_directory_is_served_without_a_restart(
    mesh: GatewayMesh,
) -> None:
    mesh.write("route.yaml", documents(route("a", [{"backendRefs": [mesh.ref("svc-a")]}])))
    await serves(mesh, "/anything", "svc-a")


async def test_a_request_no_rule_matches_gets_404(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "a",
                [
                    {
                        "matches": [{"path": {"type": "Exact", "value": "/one"}}],
                        "backendRefs": [mesh.ref("svc-a")],
                    }
                ],
            )
        ),
    )
    await serves(mesh, "/one", "svc-a")
    assert await backend_of(mesh, "/two") == 404


async def test_exact_paths_match_only_themselves(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "exact",
                [
                    {
                        "matches": [{"path": {"type": "Exact", "value": "/one"}}],
                        "backendRefs": [mesh.ref("svc-a")],
                    },
                    {
                        "matches": [{"path": {"type": "Exact", "value": "/two"}}],
                        "backendRefs": [mesh.ref("svc-b")],
                    },
                ],
            )
        ),
    )
    await serves(mesh, "/two", "svc-b")
    assert await backend_of(mesh, "/one") == "svc-a"
    assert await backend_of(mesh, "/one/example") == 404
    assert await backend_of(mesh, "/Two") == 404


async def test_a_path_prefix_matches_whole_segments_and_the_longest_wins(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "prefix",
                [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                        "backendRefs": [mesh.ref("svc-a")],
                    },
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/abc/"}}],
                        "backendRefs": [mesh.ref("svc-b")],
                    },
                ],
            )
        ),
    )
    await serves(mesh, "/abc", "svc-b")
    assert await backend_of(mesh, "/abc/") == "svc-b"
    assert await backend_of(mesh, "/abc/x") == "svc-b"
    assert await backend_of(mesh, "/abcd") == "svc-a"


async def test_precedence_across_routes_follows_the_spec(mesh: GatewayMesh) -> None:
    """Exact before prefix, then header count, across two routes (MatchingAcrossRoutes)."""
    first = route(
        "first",
        [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/x"}}],
                "backendRefs": [mesh.ref("svc-a")],
            },
            {
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/x"},
                        "headers": [{"name": "Version", "value": "two"}],
                    }
                ],
                "backendRefs": [mesh.ref("svc-b")],
            },
        ],
    )
    second = route(
        "second",
        [
            {
                "matches": [{"path": {"type": "Exact", "value": "/x/exact"}}],
                "backendRefs": [mesh.ref("svc-b")],
            }
        ],
    )
    mesh.write("routes.yaml", documents(first, second))
    await serves(mesh, "/x/exact", "svc-b")
    assert await backend_of(mesh, "/x/other") == "svc-a"
    assert await backend_of(mesh, "/x/other", headers={"version": "two"}) == "svc-b"


async def test_headers_methods_and_query_parameters_are_matched(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "m",
                [
                    {
                        "matches": [{"headers": [{"name": "X-Env", "value": "canary"}]}],
                        "backendRefs": [mesh.ref("svc-b")],
                    },
                    {"matches": [{"method": "POST"}], "backendRefs": [mesh.ref("svc-b")]},
                    {
                        "matches": [{"queryParams": [{"name": "v", "value": "2"}]}],
                        "backendRefs": [mesh.ref("svc-b")],
                    },
                    {"backendRefs": [mesh.ref("svc-a")]},
                ],
            )
        ),
    )
    await serves(mesh, "/", "svc-b", headers={"x-env": "canary"})
    assert await backend_of(mesh, "/") == "svc-a"
    assert await backend_of(mesh, "/?v=2") == "svc-b"
    assert await backend_of(mesh, "/?v=3") == "svc-a"
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.post(mesh.url + "/")).json()["backend"] == "svc-b"


async def test_route_hostnames_select_the_virtual_host_and_ignore_the_port(
    mesh: GatewayMesh,
) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route("web", [{"backendRefs": [mesh.ref("svc-a")]}], hostnames=["web.example.com"]),
            route("any", [{"backendRefs": [mesh.ref("svc-b")]}], hostnames=["*.example.com"]),
        ),
    )
    await serves(mesh, "/", "svc-a", headers={"host": "web.example.com"})
    assert await backend_of(mesh, "/", headers={"host": "web.example.com:8443"}) == "svc-a"
    assert await backend_of(mesh, "/", headers={"host": "api.example.com"}) == "svc-b"
    assert await backend_of(mesh, "/", headers={"host": "example.org"}) == 404


async def test_weights_split_the_traffic(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "w", [{"backendRefs": [mesh.ref("svc-a", weight=3), mesh.ref("svc-b", weight=1)]}]
            )
        ),
    )
    await serves(mesh, "/", "svc-b")
    counts: Counter[str | int] = Counter()
    for _ in range(200):
        counts[await backend_of(mesh, "/")] += 1
    assert set(counts) == {"svc-a", "svc-b"}
    assert 110 <= counts["svc-a"] <= 185


async def test_header_modifiers_change_the_request_and_the_response(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "h",
                [
                    {
                        "filters": [
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {
                                    "set": [{"name": "X-Set", "value": "new"}],
                                    "add": [{"name": "X-Add", "value": "added"}],
                                    "remove": ["X-Drop"],
                                },
                            },
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {
                                    "set": [{"name": "X-Served", "value": "edge"}]
                                },
                            },
                        ],
                        "backendRefs": [mesh.ref("svc-a")],
                    }
                ],
            )
        ),
    )
    await serves(mesh, "/", "svc-a")

    async def modified() -> bool:
        response = await get(mesh, "/", headers={"x-set": "old", "x-drop": "gone"})
        got = response.json()["headers"]
        return (
            got.get("x-set") == "new"
            and got.get("x-add") == "added"
            and "x-drop" not in got
            and response.headers.get("x-served") == "edge"
        )

    assert await eventually(modified)


async def test_redirects_carry_the_hostname_scheme_port_path_and_status(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "r",
                [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                        "filters": [
                            {
                                "type": "RequestRedirect",
                                "requestRedirect": {
                                    "scheme": "https",
                                    "hostname": "new.example.com",
                                    "port": 8443,
                                    "path": {
                                        "type": "ReplacePrefixMatch",
                                        "replacePrefixMatch": "/new",
                                    },
                                    "statusCode": 301,
                                },
                            }
                        ],
                    },
                    {"backendRefs": [mesh.ref("svc-a")]},
                ],
            )
        ),
    )
    await serves(mesh, "/", "svc-a")
    response = await get(mesh, "/old/page")
    assert response.status_code == 301
    assert response.headers["location"] == "https://new.example.com:8443/new/page"


async def test_url_rewrite_replaces_the_prefix_and_the_host(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route(
                "rw",
                [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                        "filters": [
                            {
                                "type": "URLRewrite",
                                "urlRewrite": {
                                    "hostname": "internal",
                                    "path": {
                                        "type": "ReplacePrefixMatch",
                                        "replacePrefixMatch": "/v2",
                                    },
                                },
                            }
                        ],
                        "backendRefs": [mesh.ref("svc-a")],
                    }
                ],
            )
        ),
    )
    await serves(mesh, "/api/users", "svc-a")
    got = (await get(mesh, "/api/users")).json()
    assert got["path"] == "/v2/users"
    assert got["headers"]["host"] == "internal"


async def test_a_backend_that_does_not_exist_gets_500_and_backend_not_found(
    mesh: GatewayMesh,
) -> None:
    mesh.write("route.yaml", documents(route("missing", [{"backendRefs": [mesh.ref("nobody")]}])))
    await serves(mesh, "/", 500)
    status = await route_status(mesh, "missing")
    assert status["Accepted"]["status"] == "True"
    assert status["ResolvedRefs"]["reason"] == "BackendNotFound"
    assert "!BackendNotFound" in format_routes(await fetch_config(mesh.sds.url))


async def test_an_invalid_backend_keeps_its_share_of_the_weight_as_500(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml",
        documents(route("half", [{"backendRefs": [mesh.ref("svc-a"), mesh.ref("nobody")]}])),
    )
    await serves(mesh, "/", "svc-a")
    outcomes = Counter([await backend_of(mesh, "/") for _ in range(100)])
    assert set(outcomes) == {"svc-a", 500}


async def test_a_backend_with_no_endpoint_on_its_port_gets_503(mesh: GatewayMesh) -> None:
    mesh.write(
        "route.yaml", documents(route("p", [{"backendRefs": [mesh.ref("svc-a", port=9999)]}]))
    )
    await serves(mesh, "/", 503)
    assert (await route_status(mesh, "p"))["ResolvedRefs"]["status"] == "True"


async def test_a_cross_namespace_backend_needs_a_reference_grant_and_losing_it_revokes_access(
    mesh: GatewayMesh,
) -> None:
    other = route(
        "cross", [{"backendRefs": [mesh.ref("svc-a", namespace="default")]}], namespace="team"
    )
    gateway = yaml.safe_load((mesh.config_dir / "gateway.yaml").read_text())
    gateway["spec"]["listeners"][0]["allowedRoutes"] = {"namespaces": {"from": "All"}}
    mesh.write("gateway.yaml", documents(gateway))
    mesh.write("route.yaml", documents(other))
    await serves(mesh, "/", 500)
    assert (await route_status(mesh, "cross"))["ResolvedRefs"]["reason"] == "RefNotPermitted"
    grant = {
        "apiVersion": f"{GROUP}/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": "team-to-default", "namespace": "default"},
        "spec": {
            "from": [{"group": GROUP, "kind": "HTTPRoute", "namespace": "team"}],
            "to": [{"group": "", "kind": "Service"}],
        },
    }
    mesh.write("grant.yaml", documents(grant))
    await serves(mesh, "/", "svc-a")
    mesh.remove("grant.yaml")
    await serves(mesh, "/", 500)


async def test_a_route_deleted_goes_back_to_404(mesh: GatewayMesh) -> None:
    mesh.write("route.yaml", documents(route("a", [{"backendRefs": [mesh.ref("svc-a")]}])))
    await serves(mesh, "/", "svc-a")
    mesh.remove("route.yaml")
    await serves(mesh, "/", 404)


async def test_a_bad_file_leaves_what_it_said_served_and_says_why(mesh: GatewayMesh) -> None:
    mesh.write("route.yaml", documents(route("a", [{"backendRefs": [mesh.ref("svc-a")]}])))
    await serves(mesh, "/", "svc-a")
    broken = route("a", [{"backendRefs": [mesh.ref("svc-b")]}])
    broken["spec"]["rules"][0]["matches"] = [{"path": {"type": "Sideways", "value": "/"}}]
    mesh.write("route.yaml", documents(broken))

    async def reported() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5) as client:
            problems: list[dict[str, Any]] = (
                await client.get(f"{mesh.sds.url}/debug/config")
            ).json()["problems"]
        return problems

    problems = await eventually(reported)
    assert problems[0]["file"] == "route.yaml"
    assert "spec.rules[0].matches[0].path.type" in problems[0]["path"]
    assert await backend_of(mesh, "/") == "svc-a"
    async with httpx.AsyncClient(timeout=5) as client:
        ready = (await client.get(f"{mesh.sds.url}/readyz")).json()
    assert "route.yaml" in ready["sources"]["config"]["reason"]
    mesh.write("route.yaml", "kind: [unclosed\n")
    await eventually(reported)
    assert await backend_of(mesh, "/") == "svc-a"


async def test_a_regex_envoy_would_refuse_is_not_accepted_and_never_reaches_envoy(
    mesh: GatewayMesh,
) -> None:
    mesh.write(
        "route.yaml",
        documents(
            route("ok", [{"backendRefs": [mesh.ref("svc-a")]}]),
            route(
                "bad",
                [
                    {
                        "matches": [{"path": {"type": "RegularExpression", "value": "/(a"}}],
                        "backendRefs": [mesh.ref("svc-b")],
                    }
                ],
            ),
        ),
    )
    await serves(mesh, "/", "svc-a")

    async def refused() -> bool:
        status = await route_status(mesh, "bad")
        return status["Accepted"]["reason"] == "UnsupportedValue"

    assert await eventually(refused)
    async with httpx.AsyncClient(timeout=5) as client:
        proxies = (await client.get(f"{mesh.sds.url}/debug/proxies")).json()["proxies"]
    states = proxies[0]["type_states"]
    assert {t: s["state"] for t, s in states.items()} == {
        "cds": "SYNCED",
        "eds": "SYNCED",
        "lds": "SYNCED",
        "rds": "SYNCED",
    }


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_switching_a_route_between_backends_under_load_fails_no_request(
    start_gateway: Callable[..., Any], echo_backends: Callable[..., Any], delta: bool
) -> None:
    """Make before break: the new cluster and its endpoints are acknowledged before the
    route moves to it, and the old one goes only after the route left it."""
    mesh: GatewayMesh = await start_gateway(delta=delta)
    for name in ("svc-a", "svc-b"):
        await mesh.register(name, await echo_backends(name))
    mesh.write("route.yaml", documents(route("r", [{"backendRefs": [mesh.ref("svc-a")]}])))
    await serves(mesh, "/", "svc-a")
    failures: Counter[int] = Counter()
    seen: Counter[str] = Counter()
    stop = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while not stop.is_set():
                response = await http.get(mesh.url + "/")
                if response.status_code == 200:
                    seen[response.json()["backend"]] += 1
                else:
                    failures[response.status_code] += 1

    clients = [asyncio.create_task(client()) for _ in range(2)]
    try:
        for switch in range(10):
            target = "svc-b" if switch % 2 == 0 else "svc-a"
            mesh.write("route.yaml", documents(route("r", [{"backendRefs": [mesh.ref(target)]}])))
            await serves(mesh, "/", target)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert not failures
    assert seen["svc-a"]
    assert seen["svc-b"]
