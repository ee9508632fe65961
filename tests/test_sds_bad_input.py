"""Bad text never reaches a handler: NUL, lone surrogates and invalid UTF-8 anywhere → 400."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import SDS_AUTH, RunningSds, SdsProcess

JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def registration(**fields: Any) -> bytes:
    return json.dumps({"ip": "10.0.0.1", "port": 80, **fields}).encode()


# (method, path, body, headers): each is refused with 400 before anything is stored.
BAD_REQUESTS: dict[str, tuple[str, str, bytes, dict[str, str]]] = {
    "v1 read, NUL in path": ("GET", "/v1/registration/users%00vc", b"", {}),
    "v1 read, invalid UTF-8 in path": ("GET", "/v1/registration/%FF", b"", {}),
    "v1 read, encoded surrogate in path": ("GET", "/v1/registration/%ED%A0%80", b"", {}),
    "v1 read, invalid UTF-8 in query": ("GET", "/v1/registration/usersvc?x=%FF", b"", {}),
    "v1 read, NUL in query": ("GET", "/v1/registration/usersvc?x=%00", b"", {}),
    "v1 repo read, invalid UTF-8": ("GET", "/v1/registration/repo/r%C3", b"", {}),
    "register, invalid UTF-8 in path": ("POST", "/v1/registration/%FF", registration(), JSON),
    "register, invalid UTF-8 in JSON": (
        "POST",
        "/v1/registration/usersvc",
        registration(revision="r").replace(b'"r"', b'"\xff"'),
        JSON,
    ),
    "register, lone surrogate in revision": (
        "POST",
        "/v1/registration/usersvc",
        registration(revision="\ud800"),
        JSON,
    ),
    "register, lone low surrogate in a tag": (
        "POST",
        "/v1/registration/usersvc",
        registration(tags={"team": "\udc00"}),
        JSON,
    ),
    "register, reversed surrogate pair": (
        "POST",
        "/v1/registration/usersvc",
        b'{"ip": "10.0.0.1", "port": 80, "revision": "\\ude00\\ud83d"}',
        JSON,
    ),
    "register, lone surrogate in service_repo_name": (
        "POST",
        "/v1/registration/usersvc",
        registration(service_repo_name="repo\udbff"),
        JSON,
    ),
    "register, NUL escape in a tag name": (
        "POST",
        "/v1/registration/usersvc",
        registration(tags={"a\u0000b": "v"}),
        JSON,
    ),
    "register, raw NUL in JSON": (
        "POST",
        "/v1/registration/usersvc",
        b'{"ip": "10.0.0.1", "port": 80, "revision": "a\x00"}',
        JSON,
    ),
    "register, form with invalid UTF-8": (
        "POST",
        "/v1/registration/usersvc",
        b"ip=10.0.0.1&port=80&revision=%FF",
        FORM,
    ),
    "register, form with an encoded surrogate": (
        "POST",
        "/v1/registration/usersvc",
        b"ip=10.0.0.1&port=80&service_repo_name=%ED%A0%80",
        FORM,
    ),
    "register, form with NUL": (
        "POST",
        "/v1/registration/usersvc",
        b"ip=10.0.0.1%00&port=80",
        FORM,
    ),
    "register, form tags JSON with a lone surrogate": (
        "POST",
        "/v1/registration/usersvc",
        b"ip=10.0.0.1&port=80&tags=" + b'{"az": "\\ud800"}'.replace(b"\\", b"%5C"),
        FORM,
    ),
    "register, multipart with invalid UTF-8": (
        "POST",
        "/v1/registration/usersvc",
        b'--b\r\nContent-Disposition: form-data; name="ip"\r\n\r\n10.0.0.1\r\n'
        b'--b\r\nContent-Disposition: form-data; name="port"\r\n\r\n80\r\n'
        b'--b\r\nContent-Disposition: form-data; name="revision"\r\n\r\n\xe9t\xe9\r\n--b--\r\n',
        {"content-type": "multipart/form-data; boundary=b"},
    ),
    "deregister, invalid UTF-8 in path": ("DELETE", "/v1/registration/usersvc/%FF", b"", {}),
    "deregister, NUL in port": ("DELETE", "/v1/registration/usersvc/10.0.0.1/8%000", b"", {}),
    "weight, lone surrogate": (
        "POST",
        "/v1/loadbalancing/usersvc",
        b'{"load_balancing_weight": "\\ud800"}',
        JSON,
    ),
    "weight, invalid UTF-8 in path": (
        "POST",
        "/v1/loadbalancing/usersvc/%FE",
        b'{"load_balancing_weight": 5}',
        JSON,
    ),
    "REST xDS, invalid UTF-8 body": (
        "POST",
        "/v3/discovery:endpoints",
        b'{"resource_names": ["\xff\xfe"]}',
        JSON,
    ),
    "REST xDS, lone surrogate in node id": (
        "POST",
        "/v3/discovery:endpoints",
        b'{"node": {"id": "edge\\ud800"}, "type_url": "' + EDS.encode() + b'"}',
        JSON,
    ),
    "REST xDS, NUL in resource name": (
        "POST",
        "/v3/discovery:endpoints",
        b'{"resource_names": ["users\\u0000vc"]}',
        JSON,
    ),
    "REST xDS, invalid UTF-8 in query": ("POST", "/v3/discovery:endpoints?%C0", b"{}", JSON),
    "debug, invalid UTF-8 in query": ("GET", "/debug/proxies?node=%FF", b"", {}),
    "metrics, NUL in query": ("GET", "/metrics?name=%00", b"", {}),
    "readiness, invalid UTF-8 in query": ("GET", "/readyz?%80", b"", {}),
}


@pytest.fixture
async def client(sds: RunningSds) -> Any:
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as http:
        yield http


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_text_is_400_and_nothing_is_stored(
    sds: RunningSds, client: httpx.AsyncClient, case: str
) -> None:
    method, path, body, headers = BAD_REQUESTS[case]
    response = await client.request(method, path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    assert sds.registry.counts() == (0, 0)
    assert (await client.get("/debug/proxies")).json()["proxies"] == []


async def test_bad_text_does_not_touch_a_registered_host(
    sds: RunningSds, client: httpx.AsyncClient
) -> None:
    good = registration(revision="r1", tags={"team": "a"})
    assert (await client.post("/v1/registration/usersvc", content=good, headers=JSON)).is_success
    before = (await client.get("/v1/registration/usersvc")).json()["hosts"]
    for bad in (registration(revision="\ud800"), registration(tags={"team": "b\udfff"})):
        response = await client.post("/v1/registration/usersvc", content=bad, headers=JSON)
        assert response.status_code == 400
    after = (await client.get("/v1/registration/usersvc")).json()["hosts"]
    assert [h["revision"] for h in after] == [h["revision"] for h in before] == ["r1"]
    assert after[0]["tags"]["team"] == "a"


@pytest.mark.parametrize(
    ("revision", "stored"),
    [
        ('"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair is one character
        ('"\\\\ud800"', "\\ud800"),  # an escaped backslash, then plain text
        ('"caf\\u00e9"', "café"),
    ],
)
async def test_clean_escapes_are_accepted(
    client: httpx.AsyncClient, revision: str, stored: str
) -> None:
    body = b'{"ip": "10.0.0.1", "port": 80, "revision": ' + revision.encode() + b"}"
    assert (await client.post("/v1/registration/usersvc", content=body, headers=JSON)).is_success
    [host] = (await client.get("/v1/registration/usersvc")).json()["hosts"]
    assert host["revision"] == stored


@pytest.mark.parametrize(
    "body",
    [b"[]", b'"text"', b"null", b"12", b'{"resource_names": 5}', b'{"node": 5}', b"{"],
)
async def test_rest_xds_answers_400_to_any_non_request(
    client: httpx.AsyncClient, body: bytes
) -> None:
    response = await client.post("/v3/discovery:endpoints", content=body, headers=JSON)
    assert response.status_code == 400
    assert response.json()["error"]


async def test_the_issue_cases_are_400_on_a_real_sds_process(
    sds_process: Callable[..., Any],
) -> None:
    sds: SdsProcess = await sds_process(env={"SDS_WRITE_TOKEN": "bad-input-token"})
    headers = {"authorization": "Bearer bad-input-token", **JSON}
    async with httpx.AsyncClient(base_url=sds.url, headers=headers) as client:
        for field in ("revision", "service_repo_name"):
            response = await client.post(
                "/v1/registration/usersvc", content=registration(**{field: "x\ud800"})
            )
            assert response.status_code == 400
        tag = await client.post(
            "/v1/registration/usersvc", content=registration(tags={"t": "\ud800"})
        )
        assert tag.status_code == 400
        rest = await client.post("/v3/discovery:endpoints", content=b'{"version_info": "\xc3("}')
        assert rest.status_code == 400
        assert (await client.get("/v1/registration/usersvc")).json()["hosts"] == []
        metrics = (await client.get("/metrics")).text
    assert 'status="500"' not in metrics
    assert "Traceback" not in sds.log()
