"""The usersvc HTTP contract, over real HTTP against usersvc on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, usersvc_settings
from usersvc.app import create_app

UUID = re.compile(r"^[0-9A-F]{32}$")
ALICE = {"fullname": "Alice Liddell", "password": "wonderland"}


def basic(username: str, password: str) -> dict[str, str]:
    """An Authorization header with HTTP Basic credentials (UTF-8, as RFC 7617 allows)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


ALICE_AUTH = basic("alice", ALICE["password"])
JSON = {"content-type": "application/json"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def assert_stamped(body: dict[str, object]) -> None:
    assert body["hostname"] == socket.gethostname()
    assert isinstance(body["resolvedname"], str)
    assert body["resolvedname"]


async def test_health_reports_ok_when_database_answers(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.get("/user/health")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["msg"] == "user health check OK"
    assert body["busy"] is False
    assert body["pool"]["max"] == 10
    assert 0 <= body["pool"]["in_use"] <= body["pool"]["size"] <= 10
    assert_stamped(body)


async def test_live_answers_without_the_database(start_usersvc: Callable[..., Any]) -> None:
    down: httpx.AsyncClient = await start_usersvc(
        database_url="postgresql://usersvc@127.0.0.1:1/usersvc", db_timeout=0.2
    )
    live = await down.get("/user/live")
    assert live.status_code == 200
    assert live.json()["ok"] is True
    assert (await down.get("/user/health")).status_code == 503


async def test_a_saturated_pool_is_reported_busy_not_down(
    start_usersvc: Callable[..., Any], db_conn: asyncpg.Connection
) -> None:
    client: httpx.AsyncClient = await start_usersvc(pool_max_size=2, db_timeout=20)
    await client.put("/user/alice", json=ALICE)
    # Every pooled connection ends up waiting behind this lock; the health check does not.
    async with db_conn.transaction():
        await db_conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        stuck = [asyncio.create_task(client.get("/user/alice")) for _ in range(4)]
        async with asyncio.timeout(15):
            while True:
                health = await client.get("/user/health")
                assert health.status_code == 200
                if health.json()["busy"]:
                    break
                await asyncio.sleep(0.05)
        assert health.json()["pool"] == {"size": 2, "idle": 0, "in_use": 2, "max": 2}
        assert "busy" in health.json()["msg"]
    assert {r.status_code for r in await asyncio.gather(*stuck)} == {200}
    after = (await client.get("/user/health")).json()
    assert after["busy"] is False


async def test_put_creates_user_with_201_and_uppercase_hex_uuid(
    usersvc: httpx.AsyncClient,
) -> None:
    response = await usersvc.put("/user/alice", json=ALICE)
    assert response.status_code == 201
    body = response.json()
    assert body["ok"] is True
    assert UUID.match(body["uuid"])
    assert body["fullname"] == "Alice Liddell"
    assert "password" not in body
    assert_stamped(body)


async def test_put_existing_user_updates_with_200_and_same_uuid(
    usersvc: httpx.AsyncClient,
) -> None:
    first = (await usersvc.put("/user/alice", json=ALICE)).json()
    response = await usersvc.put(
        "/user/alice", json={"fullname": "Alice L.", "password": "new"}, headers=ALICE_AUTH
    )
    assert response.status_code == 200
    assert response.json()["uuid"] == first["uuid"]
    assert (await usersvc.get("/user/alice")).json()["fullname"] == "Alice L."
    assert (await usersvc.post("/user/alice/login", json={"password": "new"})).status_code == 200
    assert (
        await usersvc.post("/user/alice/login", json={"password": "wonderland"})
    ).status_code == 401


async def test_get_returns_the_stored_user(usersvc: httpx.AsyncClient) -> None:
    created = (await usersvc.put("/user/alice", json=ALICE)).json()
    response = await usersvc.get("/user/alice")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["uuid"] == created["uuid"]
    assert body["fullname"] == "Alice Liddell"
    assert "password" not in body


async def test_get_unknown_user_is_404(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.get("/user/nobody")
    assert response.status_code == 404
    body = response.json()
    assert body["ok"] is False
    assert "not found" in body["error"]
    assert_stamped(body)


async def test_delete_removes_user_then_404s(usersvc: httpx.AsyncClient) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    first = await usersvc.delete("/user/alice", headers=ALICE_AUTH)
    assert first.status_code == 200
    assert first.json()["ok"] is True
    assert (await usersvc.get("/user/alice")).status_code == 404
    again = await usersvc.delete("/user/alice", headers=ALICE_AUTH)
    assert again.status_code == 404
    assert again.json()["ok"] is False


async def test_login_accepts_the_right_password(usersvc: httpx.AsyncClient) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    response = await usersvc.post("/user/alice/login", json={"password": "wonderland"})
    assert response.status_code == 200
    assert response.json()["ok"] is True


async def test_login_refuses_wrong_password_and_unknown_user_alike(
    usersvc: httpx.AsyncClient,
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    wrong = await usersvc.post("/user/alice/login", json={"password": "nope"})
    unknown = await usersvc.post("/user/mallory/login", json={"password": "nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["error"] == unknown.json()["error"]
    assert wrong.json()["ok"] is False


async def test_stored_password_is_an_argon2id_hash_not_plaintext(
    usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    stored = await db_conn.fetchval("SELECT password_hash FROM users WHERE username = 'alice'")
    assert stored != ALICE["password"]
    assert ALICE["password"] not in stored
    assert stored.startswith("$argon2id$")


async def test_same_password_hashes_differently_per_user(
    usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    await usersvc.put("/user/bob", json={"fullname": "Bob", "password": ALICE["password"]})
    hashes = await db_conn.fetch("SELECT password_hash FROM users ORDER BY username")
    assert hashes[0][0] != hashes[1][0]


async def test_concurrent_puts_of_a_new_name_make_one_user_and_refuse_the_rest(
    usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection
) -> None:
    replies = await asyncio.gather(
        *(
            usersvc.put("/user/carol", json={"fullname": f"Carol {i}", "password": f"pw{i}"})
            for i in range(12)
        )
    )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [201] + [401] * 11
    [winner] = [r.json() for r in replies if r.status_code == 201]
    assert await db_conn.fetchval("SELECT count(*) FROM users WHERE username = 'carol'") == 1
    stored = await usersvc.get("/user/carol")
    assert (stored.json()["uuid"], stored.json()["fullname"]) == (
        winner["uuid"],
        winner["fullname"],
    )


async def test_concurrent_puts_of_a_new_name_by_its_owner_create_then_update(
    usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection
) -> None:
    # All carry the same credentials: whichever creates carol, the rest are her own updates.
    auth = basic("carol", "pw")
    replies = await asyncio.gather(
        *(
            usersvc.put(
                "/user/carol", json={"fullname": f"Carol {i}", "password": "pw"}, headers=auth
            )
            for i in range(6)
        )
    )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * 5 + [201]
    assert len({r.json()["uuid"] for r in replies}) == 1
    assert await db_conn.fetchval("SELECT count(*) FROM users WHERE username = 'carol'") == 1


@pytest.mark.parametrize(
    "body",
    [
        {"fullname": "A"},
        {"password": "pw"},
        {"fullname": 42, "password": "pw"},
        {"fullname": "A", "password": ["pw"]},
        {"fullname": "A", "password": ""},
        {"fullname": "x" * 2049, "password": "pw"},
        {"fullname": "A", "password": "p" * 1025},
        ["not", "an", "object"],
    ],
    ids=[
        "missing-password",
        "missing-fullname",
        "fullname-not-string",
        "password-not-string",
        "empty-password",
        "fullname-too-long",
        "password-too-long",
        "array-body",
    ],
)
async def test_put_with_invalid_body_is_422_with_message(
    usersvc: httpx.AsyncClient, body: object
) -> None:
    response = await usersvc.put("/user/alice", json=body)
    assert response.status_code == 422
    reply = response.json()
    assert reply["ok"] is False
    assert isinstance(reply["error"], str)
    assert reply["error"]
    assert_stamped(reply)


async def test_longest_allowed_fields_are_accepted(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.put(
        "/user/" + "a" * 64, json={"fullname": "x" * 2048, "password": "p" * 1024}
    )
    assert response.status_code == 201


async def test_malformed_json_is_400(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.put(
        "/user/alice", content=b'{"fullname": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["ok"] is False
    assert "JSON" in response.json()["error"]


@pytest.mark.parametrize(
    "username", ["-leading-dash", ".hidden", "a" * 65, "sp ace", "semi;colon", "ünïcode"]
)
async def test_username_outside_the_pattern_is_422(
    usersvc: httpx.AsyncClient, username: str
) -> None:
    response = await usersvc.put(f"/user/{username}", json=ALICE)
    assert response.status_code == 422
    assert response.json()["ok"] is False
    assert "username" in response.json()["error"]


async def test_unsupported_method_is_405_json(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.patch("/user/alice", json=ALICE)
    assert response.status_code == 405
    body = response.json()
    assert body["ok"] is False
    assert body["error"] == "method not allowed"
    assert_stamped(body)


async def test_unknown_path_is_404_json(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["ok"] is False


async def test_body_over_64_kib_is_413(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.put(
        "/user/alice", json={"fullname": "x" * (65 * 1024), "password": "pw"}
    )
    assert response.status_code == 413
    assert response.json()["ok"] is False
    assert_stamped(response.json())


async def test_chunked_body_over_64_kib_is_413_and_the_endpoint_never_runs(
    usersvc: httpx.AsyncClient,
) -> None:
    # Valid JSON, then whitespace past the limit: cut at the limit, it would parse and create.
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"fullname": "Alice", "password": "pw"}'
        for _ in range(70):
            yield b" " * 1024

    response = await usersvc.put("/user/alice", content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert response.json()["ok"] is False
    assert (await usersvc.get("/user/alice")).status_code == 404


async def test_large_declared_body_gets_a_readable_413_not_a_reset(
    usersvc: httpx.AsyncClient,
) -> None:
    response = await usersvc.put("/user/alice", content=b" " * (512 * 1024), headers=JSON)
    assert response.status_code == 413
    assert response.json()["ok"] is False


async def test_a_body_that_never_completes_is_408_and_the_endpoint_never_runs(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(body_timeout=0.5)
    host, port = client.base_url.host, client.base_url.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"PUT /user/alice HTTP/1.1\r\nhost: usersvc\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"fullname": "A'
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            answer = await reader.read()
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(answer)["ok"] is False
    assert (await client.get("/user/alice")).status_code == 404


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (rb'{"fullname": "a\u0000b", "password": "pw"}', "fullname"),
        (rb'{"fullname": "Alice", "password": "p\u0000w"}', "password"),
        (rb'{"fullname": "a\ud800b", "password": "pw"}', "fullname"),
        (rb'{"fullname": "Alice", "password": "p\udfffw"}', "password"),
        (rb'{"fullname": "Alice", "password": "pw", "extra\ud800": 1}', "extra"),
        (rb'{"fullname": "Alice", "password": "pw", "nested": [{"x": "\u0000"}]}', "nested"),
    ],
    ids=[
        "nul-fullname",
        "nul-password",
        "surrogate-fullname",
        "surrogate-password",
        "surrogate-in-ignored-key",
        "nul-deep-inside",
    ],
)
async def test_nul_or_lone_surrogate_in_json_is_422_and_nothing_is_stored(
    usersvc: httpx.AsyncClient, raw: bytes, field: str
) -> None:
    response = await usersvc.put("/user/alice", content=raw, headers=JSON)
    assert response.status_code == 422
    assert response.json()["ok"] is False
    assert response.json()["error"].startswith(field)
    assert (await usersvc.get("/user/alice")).status_code == 404


@pytest.mark.parametrize(
    "raw",
    [b'{"fullname": "a\xffb", "password": "pw"}', b'{"full\xc3name": "a", "password": "pw"}'],
    ids=["in-a-value", "in-a-key"],
)
async def test_invalid_utf8_in_the_body_is_400(usersvc: httpx.AsyncClient, raw: bytes) -> None:
    response = await usersvc.put("/user/alice", content=raw, headers=JSON)
    assert response.status_code == 400
    assert response.json()["ok"] is False
    assert (await usersvc.get("/user/alice")).status_code == 404


@pytest.mark.parametrize(
    "raw",
    [rb'{"password": "p\u0000w"}', rb'{"password": "p\udc00w"}', b'{"password": "p\xc3w"}'],
    ids=["nul", "surrogate", "invalid-utf8"],
)
async def test_bad_text_in_a_login_is_a_4xx(usersvc: httpx.AsyncClient, raw: bytes) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    response = await usersvc.post("/user/alice/login", content=raw, headers=JSON)
    assert response.status_code in (400, 422)
    assert response.json()["ok"] is False


@pytest.mark.parametrize("path", ["a%00b", "a%ffb", "a%ed%a0%80b", "%c3%28"])
async def test_bad_text_in_the_path_is_422(usersvc: httpx.AsyncClient, path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await usersvc.request(method, f"/user/{path}", json=ALICE)
        assert response.status_code == 422
        assert response.json()["ok"] is False


async def test_json_nested_beyond_reason_is_400(usersvc: httpx.AsyncClient) -> None:
    deep = b'{"fullname": "a", "password": "b", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    response = await usersvc.put("/user/alice", content=deep, headers=JSON)
    assert response.status_code in (400, 422)
    assert response.json()["ok"] is False


async def test_login_with_missing_password_is_422(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.post("/user/alice/login", json={})
    assert response.status_code == 422
    assert response.json()["ok"] is False


async def test_identity_comes_from_pod_environment(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAME", "usersvc-7")
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    app = create_app(usersvc_settings(postgres_url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://u") as client,
    ):
        body = (await client.get("/user/health")).json()
    assert body["hostname"] == "usersvc-7"
    assert body["resolvedname"] == "10.1.2.3"


async def test_openapi_document_lists_every_route(usersvc: httpx.AsyncClient) -> None:
    spec = (await usersvc.get("/openapi.json")).json()
    assert set(spec["paths"]) == {
        "/user/health",
        "/user/live",
        "/user/{username}",
        "/user/{username}/login",
    }
    assert (await usersvc.get("/docs")).status_code == 200
