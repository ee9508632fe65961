"""The OpenAPI document says what sds really answers, checked by driving every operation."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import SDS_AUTH, RunningSds

# Values for each path parameter: good ones and every kind of bad one.
PARAMETERS = {
    "service": ["usersvc", "other", "bad%20name", "%FF", "-x", "a.b.c"],
    "service_repo_name": ["repo", "%ED%A0%80", "r%00"],
    "ip": ["10.0.0.1", "10.0.0.300", "169.254.169.254", "%00"],
    "port": ["80", "0", "http"],
    "name": ["app.js", "nope.js", "%FF"],
}
QUERIES = ["", "?x=%FF"]
JSON = "application/json"
BODIES: list[tuple[bytes, str]] = [
    (b"", ""),
    (b'{"ip": "10.0.0.1", "port": 80, "load_balancing_weight": 5}', JSON),
    (b'{"ip": "10.0.0.2", "port": 80, "revision": "\\ud800"}', JSON),
    (b'{"ip": "10.0.0.300", "port": 80}', JSON),
    (b"{nope", JSON),
    (b"[]", JSON),
    (b'{"resource_names": ["\xff"]}', JSON),
    (b"ip=10.0.0.1&port=80&load_balancing_weight=500", "application/x-www-form-urlencoded"),
    (b"ip=10.0.0.1", "text/plain"),
    (b"x" * (2 * 1024 * 1024), JSON),
]
AUTHS: list[dict[str, str]] = [{}, {"authorization": "Bearer wrong"}, SDS_AUTH]
HOST = {"ip": "10.0.0.1", "port": 80}


def documented(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    ]


def requests(method: str, template: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Invalid inputs for one operation, one thing wrong at a time (path, query, body, auth)."""
    names = re.findall(r"{(\w+)}", template)

    def path(**values: str) -> str:
        result = template
        for name in names:
            result = result.replace(f"{{{name}}}", values.get(name, PARAMETERS[name][0]))
        return result

    good_body, good_type = BODIES[1] if method == "POST" else (b"", "")
    good = {"content-type": good_type} if good_type else {}
    cases = [
        (path(**{name: value}), good_body, {**SDS_AUTH, **good})
        for name in names
        for value in PARAMETERS[name]
    ]
    cases += [(path() + query, good_body, {**SDS_AUTH, **good}) for query in QUERIES]
    for (body, content_type), auth in itertools.product(
        BODIES if method in ("POST", "DELETE") else [(b"", "")], AUTHS
    ):
        headers = {**auth, "content-type": content_type} if content_type else dict(auth)
        cases.append((path(), body, headers))
    return cases


async def drive(
    client: httpx.AsyncClient, method: str, template: str
) -> set[tuple[int, str | None]]:
    """Every (status, media type) the operation answered to the invalid inputs."""
    seen: set[tuple[int, str | None]] = set()
    for path, body, headers in requests(method, template):
        # The host the good inputs address is there again for each request.
        await client.post("/v1/registration/usersvc", json=HOST, headers=SDS_AUTH)
        request = client.build_request(
            method, path, content=body, headers={**headers, "if-none-match": "*"}
        )
        # Only the head is read: an event stream's body never ends.
        response = await client.send(request, stream=True)
        await response.aclose()
        media = response.headers.get("content-type")
        seen.add((response.status_code, media.split(";")[0].strip() if media else None))
    return seen


@pytest.fixture
async def servers(start_sds: Callable[..., Any]) -> list[RunningSds]:
    """A secure sds at its bound of services, one without a token, one warming up."""
    return [
        await start_sds(max_services=1),
        await start_sds(write_token=None),
        await start_sds(registration_warmup=600.0),
    ]


async def test_every_answer_to_invalid_input_is_documented(servers: list[RunningSds]) -> None:
    async with httpx.AsyncClient(base_url=servers[0].url) as client:
        document = (await client.get("/openapi.json")).json()
    operations = documented(document)
    assert len(operations) >= 13
    answered: set[int] = set()
    for server in servers:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for method, template, operation in operations:
                for status, media in await drive(client, method, template):
                    answered.add(status)
                    where = f"{method} {template} answered {status}"
                    assert str(status) in operation["responses"], f"{where}, undocumented"
                    content = operation["responses"][str(status)].get("content", {})
                    if media is None:
                        assert not content, f"{where} without a body, documented with one"
                    else:
                        assert media in content, f"{where} as {media}, documented {list(content)}"
    assert {200, 204, 304, 400, 401, 403, 404, 409, 413, 415, 503} <= answered
    assert 500 not in answered


async def test_no_operation_documents_422_which_sds_never_sends(sds: RunningSds) -> None:
    async with httpx.AsyncClient(base_url=sds.url) as client:
        document = (await client.get("/openapi.json")).json()
    for method, path, operation in documented(document):
        assert "422" not in operation["responses"], f"{method} {path}"
        assert "400" in operation["responses"], f"{method} {path}"


async def test_writes_document_the_bearer_scheme(sds: RunningSds) -> None:
    async with httpx.AsyncClient(base_url=sds.url) as client:
        document = (await client.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    [(name, scheme)] = schemes.items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in documented(document):
        is_write = method in ("POST", "DELETE") and path.startswith(
            ("/v1/registration", "/v1/loadbalancing")
        )
        assert (operation.get("security") == [{name: []}]) == is_write, f"{method} {path}"
        if is_write:
            assert {"401", "403"} <= operation["responses"].keys()


async def test_metrics_are_documented_as_text(sds: RunningSds) -> None:
    async with httpx.AsyncClient(base_url=sds.url) as client:
        document = (await client.get("/openapi.json")).json()
        metrics = await client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain"
    ]
