"""The v1 SDS API and self-registration, over real HTTP against an in-process sds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest

from sds.model import Endpoint, Health, Source
from tests.conftest import DATA, SDS_AUTH, RunningSds

V1_SCHEMA = json.loads((DATA / "envoy-v1-sds.schema.json").read_text())


def lyft_form(ip: str, port: int = 80, **extra: Any) -> dict[str, str]:
    tags = extra.pop("tags", {"az": "us-east-1a", "instance_id": "i-1", "region": "us-east-1"})
    return {"ip": ip, "port": str(port), "revision": "abc123", "tags": json.dumps(tags), **extra}


async def hosts(client: httpx.AsyncClient, service: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/registration/{service}")
    assert response.status_code == 200
    body = response.json()
    jsonschema.validate(body, V1_SCHEMA)
    result: list[dict[str, Any]] = body["hosts"]
    return result


@pytest.fixture
async def client(sds: RunningSds) -> Any:
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as http:
        yield http


async def test_lyft_form_registration_is_served_as_v1_hosts(client: httpx.AsyncClient) -> None:
    posted = await client.post(
        "/v1/registration/usersvc", data=lyft_form("10.0.0.1", service_repo_name="users-repo")
    )
    assert posted.status_code == 200
    response = await client.get("/v1/registration/usersvc")
    body = response.json()
    jsonschema.validate(body, V1_SCHEMA)
    assert body["service"] == "usersvc"
    assert body["env"] == "production"
    [host] = body["hosts"]
    assert host["ip_address"] == "10.0.0.1"
    assert host["port"] == 80
    assert host["revision"] == "abc123"
    assert host["service_repo_name"] == "users-repo"
    assert host["last_check_in"]
    assert host["tags"]["az"] == "us-east-1a"
    assert host["tags"]["canary"] is False
    assert host["tags"]["load_balancing_weight"] == 1
    assert host["tags"]["instance_id"] == "i-1"


async def test_json_body_registration_works_like_the_form(client: httpx.AsyncClient) -> None:
    posted = await client.post(
        "/v1/registration/usersvc",
        json={"ip": "10.0.0.2", "port": 8080, "tags": {"az": "b", "canary": True}},
    )
    assert posted.status_code == 200
    [host] = await hosts(client, "usersvc")
    assert (host["ip_address"], host["port"]) == ("10.0.0.2", 8080)
    assert host["tags"]["canary"] is True
    assert host["tags"]["az"] == "b"


async def test_ipv6_hosts_are_accepted_in_canonical_form(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", json={"ip": "FD00:0::1", "port": 80})
    [host] = await hosts(client, "usersvc")
    assert host["ip_address"] == "fd00::1"


async def test_instances_are_keyed_by_ip_and_port(client: httpx.AsyncClient) -> None:
    for port in (80, 81):
        await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1", port))
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1", 80))
    assert [(h["ip_address"], h["port"]) for h in await hosts(client, "usersvc")] == [
        ("10.0.0.1", 80),
        ("10.0.0.1", 81),
    ]


async def test_hosts_come_in_a_stable_address_order(client: httpx.AsyncClient) -> None:
    for ip in ("10.0.0.10", "10.0.0.9", "10.0.0.100", "fd00::1", "10.0.0.1"):
        await client.post("/v1/registration/usersvc", json={"ip": ip, "port": 80})
    assert [h["ip_address"] for h in await hosts(client, "usersvc")] == [
        "10.0.0.1",
        "10.0.0.9",
        "10.0.0.10",
        "10.0.0.100",
        "fd00::1",
    ]


async def test_tags_merge_on_repost(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    await client.post(
        "/v1/registration/usersvc", data=lyft_form("10.0.0.1", tags={"az": "us-east-1b"})
    )
    [host] = await hosts(client, "usersvc")
    assert host["tags"]["az"] == "us-east-1b"
    assert host["tags"]["instance_id"] == "i-1"


async def test_unknown_service_has_no_hosts(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/registration/ghost")
    assert response.status_code == 200
    assert response.json()["hosts"] == []
    assert response.headers["etag"]


async def test_only_healthy_endpoints_are_listed(
    sds: RunningSds, client: httpx.AsyncClient
) -> None:
    sds.registry.replace(
        Source.KUBERNETES,
        "usersvc.default",
        [
            Endpoint("10.1.0.1", 80, Source.KUBERNETES, health=Health.HEALTHY),
            Endpoint("10.1.0.2", 80, Source.KUBERNETES, health=Health.DRAINING),
            Endpoint("10.1.0.3", 80, Source.KUBERNETES, health=Health.UNHEALTHY),
        ],
    )
    assert [h["ip_address"] for h in await hosts(client, "usersvc.default")] == ["10.1.0.1"]


async def test_kubernetes_services_answer_to_plain_and_qualified_names(
    sds: RunningSds, client: httpx.AsyncClient
) -> None:
    sds.registry.replace(
        Source.KUBERNETES, "usersvc.prod", [Endpoint("10.1.0.1", 80, Source.KUBERNETES)]
    )
    assert [h["ip_address"] for h in await hosts(client, "usersvc")] == ["10.1.0.1"]
    assert [h["ip_address"] for h in await hosts(client, "usersvc.prod")] == ["10.1.0.1"]
    sds.registry.replace(
        Source.KUBERNETES, "usersvc.staging", [Endpoint("10.2.0.1", 80, Source.KUBERNETES)]
    )
    assert await hosts(client, "usersvc") == []
    assert [h["ip_address"] for h in await hosts(client, "usersvc.staging")] == ["10.2.0.1"]


async def test_etag_gives_304_until_something_changes(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    first = await client.get("/v1/registration/usersvc")
    etag = first.headers["etag"]
    unchanged = await client.get("/v1/registration/usersvc", headers={"if-none-match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""

    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.2"))
    changed = await client.get("/v1/registration/usersvc", headers={"if-none-match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert len(changed.json()["hosts"]) == 2


async def test_heartbeat_is_not_a_change(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    etag = (await client.get("/v1/registration/usersvc")).headers["etag"]
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    again = await client.get("/v1/registration/usersvc", headers={"if-none-match": etag})
    assert again.status_code == 304


async def test_delete_ip_removes_every_port(client: httpx.AsyncClient) -> None:
    for port in (80, 81):
        await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1", port))
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.2"))
    response = await client.delete("/v1/registration/usersvc/10.0.0.1")
    assert response.status_code == 200
    assert response.json() == {"removed": 2}
    assert [h["ip_address"] for h in await hosts(client, "usersvc")] == ["10.0.0.2"]


async def test_delete_one_port_keeps_the_others(client: httpx.AsyncClient) -> None:
    for port in (80, 81):
        await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1", port))
    assert (await client.delete("/v1/registration/usersvc/10.0.0.1/80")).status_code == 200
    assert [h["port"] for h in await hosts(client, "usersvc")] == [81]


async def test_delete_unknown_host_is_404(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/registration/usersvc/10.9.9.9")
    assert response.status_code == 404
    assert "10.9.9.9" in response.json()["error"]
    assert (await client.delete("/v1/registration/usersvc/10.9.9.9/80")).status_code == 404


async def test_hosts_expire_after_ttl_without_any_read(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(host_ttl=0.3)
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
        await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.2"))
        assert len(sds.registry.snapshot("usersvc").endpoints) == 2
        for _ in range(6):
            await asyncio.sleep(0.1)
            await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.2"))
        assert [e.address for e in sds.registry.snapshot("usersvc").endpoints] == ["10.0.0.2"]
        metrics = (await client.get("/metrics")).text
    expired = next(
        line for line in metrics.splitlines() if line.startswith("sds_expired_hosts_total")
    )
    assert float(expired.split()[-1]) >= 1


async def test_repo_query_lists_hosts_of_every_service_of_a_repo(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/v1/registration/users", data=lyft_form("10.0.0.1", service_repo_name="r"))
    await client.post("/v1/registration/auth", data=lyft_form("10.0.0.2", service_repo_name="r"))
    await client.post("/v1/registration/misc", data=lyft_form("10.0.0.3", service_repo_name="x"))
    body = (await client.get("/v1/registration/repo/r")).json()
    assert sorted((h["service"], h["ip_address"]) for h in body["hosts"]) == [
        ("auth", "10.0.0.2"),
        ("users", "10.0.0.1"),
    ]


async def test_weight_of_one_host_can_be_set(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.2"))
    response = await client.post(
        "/v1/loadbalancing/usersvc/10.0.0.1", data={"load_balancing_weight": "40"}
    )
    assert response.status_code == 204
    weights = {
        h["ip_address"]: h["tags"]["load_balancing_weight"] for h in await hosts(client, "usersvc")
    }
    assert weights == {"10.0.0.1": 40, "10.0.0.2": 1}


async def test_weight_survives_heartbeats(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    await client.post("/v1/loadbalancing/usersvc", json={"load_balancing_weight": 7})
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    [host] = await hosts(client, "usersvc")
    assert host["tags"]["load_balancing_weight"] == 7


@pytest.mark.parametrize("weight", ["0", "101", "-3", "heavy", "1.5"])
async def test_weight_outside_1_to_100_is_400(client: httpx.AsyncClient, weight: str) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    response = await client.post(
        "/v1/loadbalancing/usersvc/10.0.0.1", data={"load_balancing_weight": weight}
    )
    assert response.status_code == 400
    assert "load_balancing_weight" in response.json()["error"]


async def test_weight_of_unknown_host_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/loadbalancing/usersvc/10.0.0.1", data={"load_balancing_weight": "5"}
    )
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/registration/bad%20name", {"ip": "10.0.0.1", "port": "80"}, "service name"),
        ("/v1/registration/a.b", {"ip": "10.0.0.1", "port": "80"}, "service name"),
        ("/v1/registration/usersvc", {"ip": "10.0.0.300", "port": "80"}, "invalid ip"),
        ("/v1/registration/usersvc", {"ip": "localhost", "port": "80"}, "invalid ip"),
        ("/v1/registration/usersvc", {"ip": "10.0.0.1", "port": "0"}, "port"),
        ("/v1/registration/usersvc", {"ip": "10.0.0.1", "port": "70000"}, "port"),
        ("/v1/registration/usersvc", {"ip": "10.0.0.1", "port": "http"}, "port"),
        ("/v1/registration/usersvc", {"ip": "10.0.0.1"}, "required"),
        ("/v1/registration/usersvc", {"port": "80"}, "required"),
        (
            "/v1/registration/usersvc",
            {"ip": "10.0.0.1", "port": "80", "tags": "{not json"},
            "Invalid json supplied in tags",
        ),
        ("/v1/registration/usersvc", {"ip": "10.0.0.1", "port": "80", "tags": "[1]"}, "object"),
        (
            "/v1/registration/usersvc",
            {"ip": "10.0.0.1", "port": "80", "tags": '{"canary": "maybe"}'},
            "canary",
        ),
        (
            "/v1/registration/usersvc",
            {"ip": "10.0.0.1", "port": "80", "tags": '{"load_balancing_weight": 500}'},
            "load_balancing_weight",
        ),
    ],
)
async def test_bad_registration_is_400_with_a_message(
    client: httpx.AsyncClient, path: str, body: dict[str, str], message: str
) -> None:
    response = await client.post(path, data=body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert (await client.get("/v1/registration/usersvc")).json()["hosts"] == []


async def test_invalid_service_name_in_read_is_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/registration/-oops")
    assert response.status_code == 400
    assert "service name" in response.json()["error"]


async def test_malformed_json_body_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/registration/usersvc",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


async def test_unsupported_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/registration/usersvc", content=b"ip=1", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415


async def test_huge_body_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/registration/usersvc", json={"ip": "10.0.0.1", "port": 80, "x": "y" * 2_000_000}
    )
    assert response.status_code == 413


async def test_writes_need_the_token_when_one_is_set(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(write_token="s3cret")
    form = lyft_form("10.0.0.1")
    async with httpx.AsyncClient(base_url=sds.url) as client:
        missing = await client.post("/v1/registration/usersvc", data=form)
        wrong = await client.post(
            "/v1/registration/usersvc", data=form, headers={"authorization": "Bearer nope"}
        )
        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert (await client.delete("/v1/registration/usersvc/10.0.0.1")).status_code == 401
        assert (await client.get("/v1/registration/usersvc")).json()["hosts"] == []

        good = await client.post(
            "/v1/registration/usersvc", data=form, headers={"authorization": "Bearer s3cret"}
        )
        assert good.status_code == 200
        assert len((await client.get("/v1/registration/usersvc")).json()["hosts"]) == 1


async def test_health_endpoints_answer(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthcheck")).text == "OK"
    assert (await client.get("/v1/health")).json() == {"ok": True, "msg": "SDS healthy!"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["sources"]["registration"]["ready"] is True


async def test_metrics_count_registrations_and_requests(client: httpx.AsyncClient) -> None:
    await client.post("/v1/registration/usersvc", data=lyft_form("10.0.0.1"))
    await client.get("/v1/registration/usersvc")
    text = (await client.get("/metrics")).text
    assert 'sds_registrations_total{kind="new"}' in text
    assert "sds_registry_endpoints 1.0" in text
    assert (
        'sds_http_requests_total{method="GET",route="/v1/registration/{service}",status="200"}'
        in text
    )


async def test_unknown_route_and_method_are_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]
    wrong = await client.put("/v1/registration/usersvc")
    assert wrong.status_code == 405
    assert wrong.json()["error"]


async def test_etag_means_the_same_hosts_on_any_sds(start_sds: Callable[..., Any]) -> None:
    first: RunningSds = await start_sds()
    second: RunningSds = await start_sds()
    async with httpx.AsyncClient(headers=SDS_AUTH) as client:
        for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            await client.post(f"{first.url}/v1/registration/usersvc", data=lyft_form(ip))
        for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.4"):
            await client.post(f"{second.url}/v1/registration/usersvc", data=lyft_form(ip))
        etag = (await client.get(f"{first.url}/v1/registration/usersvc")).headers["etag"]
        other = await client.get(
            f"{second.url}/v1/registration/usersvc", headers={"if-none-match": etag}
        )
        assert other.status_code == 200
        await client.delete(f"{second.url}/v1/registration/usersvc/10.0.0.4")
        await client.post(f"{second.url}/v1/registration/usersvc", data=lyft_form("10.0.0.3"))
        same = await client.get(
            f"{second.url}/v1/registration/usersvc", headers={"if-none-match": etag}
        )
        assert same.status_code == 304


@pytest.mark.parametrize("field", ["body", "tags"])
async def test_deeply_nested_json_is_400(client: httpx.AsyncClient, field: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    if field == "body":
        response = await client.post(
            "/v1/registration/usersvc",
            content=deep.encode(),
            headers={"content-type": "application/json"},
        )
    else:
        response = await client.post(
            "/v1/registration/usersvc", data={"ip": "10.0.0.1", "port": "80", "tags": deep}
        )
    assert response.status_code == 400
