"""The OpenAPI document says what usersvc really answers: statuses, bodies, headers, security.

Real requests go to a real usersvc; every answer is checked against the operation the
document describes for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from tests.test_usersvc_api import ADMIN_AUTH, ALICE, ALICE_AUTH, basic

JSON = {"content-type": "application/json"}


@pytest.fixture
async def spec(usersvc: httpx.AsyncClient) -> dict[str, Any]:
    response = await usersvc.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def assert_documented(
    spec: dict[str, Any], method: str, template: str, response: httpx.Response
) -> None:
    """``response`` is one the document lists for the operation, with its schema and headers."""
    operation = spec["paths"][template][method]
    status = str(response.status_code)
    assert status in operation["responses"], f"{method} {template}: {status} not documented"
    documented = operation["responses"][status]
    media_type = response.headers["content-type"].split(";")[0]
    assert media_type in documented["content"], f"{method} {template} {status}: {media_type}"
    schema = documented["content"][media_type]["schema"]
    Draft202012Validator({**schema, "components": spec["components"]}).validate(response.json())
    for header, described in documented.get("headers", {}).items():
        if described.get("required"):
            assert header.lower() in response.headers, f"{method} {template} {status}: {header}"


async def test_every_answer_is_documented(usersvc: httpx.AsyncClient, spec: dict[str, Any]) -> None:
    user, login = "/user/{username}", "/user/{username}/login"
    calls: list[tuple[str, str, httpx.Response]] = [
        ("get", "/user/health", await usersvc.get("/user/health")),
        ("get", "/user/live", await usersvc.get("/user/live")),
        ("put", user, await usersvc.put("/user/alice", json=ALICE)),
        ("put", user, await usersvc.put("/user/alice", json=ALICE, headers=ALICE_AUTH)),
        ("put", user, await usersvc.put("/user/alice", json=ALICE)),
        ("put", user, await usersvc.put("/user/alice", json={"fullname": "A"})),
        ("put", user, await usersvc.put("/user/alice", content=b"{", headers=JSON)),
        ("put", user, await usersvc.put("/user/alice", content=b"x" * 70_000, headers=JSON)),
        ("put", user, await usersvc.put("/user/-bad", json=ALICE)),
        ("get", user, await usersvc.get("/user/alice")),
        ("get", user, await usersvc.get("/user/nobody")),
        ("post", login, await usersvc.post("/user/alice/login", json=ALICE)),
        ("post", login, await usersvc.post("/user/alice/login", json={"password": "no"})),
        ("post", login, await usersvc.post("/user/alice/login", json={})),
        ("delete", user, await usersvc.delete("/user/alice", headers=basic("alice", "no"))),
        ("delete", user, await usersvc.delete("/user/alice", headers=ADMIN_AUTH)),
        ("delete", user, await usersvc.delete("/user/alice", headers=ADMIN_AUTH)),
    ]
    seen = {(m, t, r.status_code) for m, t, r in calls}
    assert {("put", user, s) for s in (200, 201, 400, 401, 413, 422)} <= seen
    assert {("delete", user, s) for s in (200, 401, 404)} <= seen
    for method, template, response in calls:
        assert_documented(spec, method, template, response)


async def test_answers_while_the_database_is_down_are_documented(
    start_usersvc: Callable[..., Any], spec: dict[str, Any]
) -> None:
    down: httpx.AsyncClient = await start_usersvc(
        database_url="postgresql://usersvc@127.0.0.1:1/usersvc", db_timeout=0.2
    )
    calls = [
        ("get", "/user/health", await down.get("/user/health")),
        ("get", "/user/{username}", await down.get("/user/alice")),
        ("put", "/user/{username}", await down.put("/user/alice", json=ALICE)),
        ("post", "/user/{username}/login", await down.post("/user/alice/login", json=ALICE)),
    ]
    for method, template, response in calls:
        assert response.status_code == 503
        assert_documented(spec, method, template, response)


def test_changing_a_user_declares_basic_or_admin_and_creating_needs_nothing(
    spec: dict[str, Any],
) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["basic"] == {**schemes["basic"], "type": "http", "scheme": "basic"}
    assert schemes["admin"] == {**schemes["admin"], "type": "http", "scheme": "bearer"}
    operations = spec["paths"]["/user/{username}"]
    assert operations["put"]["security"] == [{"basic": []}, {"admin": []}, {}]
    assert operations["delete"]["security"] == [{"basic": []}, {"admin": []}]
    assert "security" not in operations["get"]
    assert "security" not in spec["paths"]["/user/{username}/login"]["post"]
    for method in ("put", "delete"):
        assert "WWW-Authenticate" in operations[method]["responses"]["401"]["headers"]


async def test_busy_answers_are_documented(
    start_usersvc: Callable[..., Any], spec: dict[str, Any]
) -> None:
    busy: httpx.AsyncClient = await start_usersvc(hash_concurrency=1, hash_queue=0)
    replies = await asyncio.gather(
        *(busy.put(f"/user/u{i}", json={"fullname": "U", "password": "pw"}) for i in range(6))
    )
    assert {r.status_code for r in replies} == {201, 503}
    for response in replies:
        assert_documented(spec, "put", "/user/{username}", response)


async def test_rate_limited_answers_are_documented(
    usersvc: httpx.AsyncClient, spec: dict[str, Any]
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    for _ in range(10):
        await usersvc.post("/user/alice/login", json={"password": "guess"})
    calls = [
        ("post", "/user/{username}/login", await usersvc.post("/user/alice/login", json=ALICE)),
        (
            "put",
            "/user/{username}",
            await usersvc.put("/user/alice", json=ALICE, headers=ALICE_AUTH),
        ),
        ("delete", "/user/{username}", await usersvc.delete("/user/alice", headers=ALICE_AUTH)),
    ]
    for method, template, response in calls:
        assert response.status_code == 429
        assert_documented(spec, method, template, response)
