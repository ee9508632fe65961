"""Who may change a user: its owner (HTTP Basic) or the admin (bearer token); anyone creates.

Every refusal is a 401 with the Basic challenge and leaves the stored user untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from argon2 import PasswordHasher

from tests.conftest import ADMIN_TOKEN
from tests.test_usersvc_api import ADMIN_AUTH, ALICE, ALICE_AUTH, basic
from usersvc.db import Database
from usersvc.passwords import needs_rehash
from usersvc.store import UserStore

CHALLENGE = 'Basic realm="usersvc"'
NEW = {"fullname": "Mallory", "password": "taken-over"}


async def stored_row(db_conn: asyncpg.Connection, name: str) -> tuple[Any, ...] | None:
    row = await db_conn.fetchrow(
        "SELECT uuid, fullname, password_hash, updated_at FROM users WHERE username = $1", name
    )
    return None if row is None else tuple(row)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == CHALLENGE
    body = response.json()
    assert body["ok"] is False
    assert body["error"]


async def test_creating_a_user_needs_no_credentials(usersvc: httpx.AsyncClient) -> None:
    assert (await usersvc.put("/user/alice", json=ALICE)).status_code == 201


async def test_creating_a_user_ignores_credentials_for_the_new_name(
    usersvc: httpx.AsyncClient,
) -> None:
    response = await usersvc.put("/user/alice", json=ALICE, headers=basic("bob", "whatever"))
    assert response.status_code == 201


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("alice", "not her password"),
        basic("bob", "bobs password"),
        basic("alice", ""),
        {"authorization": "Bearer not-the-admin-token"},
        {"authorization": "Basic !!!not-base64!!!"},
        {"authorization": "Basic " + "bm8tY29sb24="},  # "no-colon"
        {"authorization": "Digest username=alice"},
    ],
    ids=[
        "none",
        "wrong-password",
        "another-users-credentials",
        "empty-password",
        "wrong-bearer",
        "malformed-basic",
        "basic-without-colon",
        "other-scheme",
    ],
)
async def test_changing_or_deleting_without_proof_is_401_and_changes_nothing(
    usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection, headers: dict[str, str]
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    await usersvc.put("/user/bob", json={"fullname": "Bob", "password": "bobs password"})
    before = await stored_row(db_conn, "alice")
    assert_refused(await usersvc.put("/user/alice", json=NEW, headers=headers))
    assert_refused(await usersvc.delete("/user/alice", headers=headers))
    assert await stored_row(db_conn, "alice") == before
    login = await usersvc.post("/user/alice/login", json={"password": ALICE["password"]})
    assert login.status_code == 200


async def test_wrong_password_gets_the_same_answer_as_a_wrong_login(
    usersvc: httpx.AsyncClient,
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    put = await usersvc.put("/user/alice", json=NEW, headers=basic("alice", "nope"))
    login = await usersvc.post("/user/alice/login", json={"password": "nope"})
    assert put.status_code == login.status_code == 401
    assert put.json()["error"] == login.json()["error"]


async def test_another_users_credentials_get_the_wrong_password_answer(
    usersvc: httpx.AsyncClient,
) -> None:
    # Even when bob's password happens to be alice's too: the name must match.
    await usersvc.put("/user/alice", json=ALICE)
    await usersvc.put("/user/bob", json={"fullname": "Bob", "password": ALICE["password"]})
    wrong_password = await usersvc.put("/user/alice", json=NEW, headers=basic("alice", "nope"))
    other_user = await usersvc.put("/user/alice", json=NEW, headers=basic("bob", ALICE["password"]))
    assert_refused(other_user)
    assert other_user.json() == wrong_password.json()


async def test_owner_updates_fullname_and_password_keeping_the_uuid(
    usersvc: httpx.AsyncClient,
) -> None:
    created = (await usersvc.put("/user/alice", json=ALICE)).json()
    changed = {"fullname": "Alice L.", "password": "looking-glass"}
    response = await usersvc.put("/user/alice", json=changed, headers=ALICE_AUTH)
    assert response.status_code == 200
    assert response.json()["uuid"] == created["uuid"]
    assert response.json()["fullname"] == "Alice L."
    old = await usersvc.post("/user/alice/login", json={"password": ALICE["password"]})
    new = await usersvc.post("/user/alice/login", json={"password": "looking-glass"})
    assert (old.status_code, new.status_code) == (401, 200)
    # The old password no longer proves anything.
    assert_refused(await usersvc.delete("/user/alice", headers=ALICE_AUTH))


async def test_owner_with_a_non_ascii_password_can_use_basic(usersvc: httpx.AsyncClient) -> None:
    await usersvc.put("/user/zoe", json={"fullname": "Zoë", "password": "pässwörd ✓"})
    response = await usersvc.delete("/user/zoe", headers=basic("zoe", "pässwörd ✓"))
    assert response.status_code == 200


async def test_admin_token_may_change_and_delete_any_user(usersvc: httpx.AsyncClient) -> None:
    created = (await usersvc.put("/user/alice", json=ALICE)).json()
    reset = await usersvc.put("/user/alice", json=NEW, headers=ADMIN_AUTH)
    assert reset.status_code == 200
    assert reset.json()["uuid"] == created["uuid"]
    login = await usersvc.post("/user/alice/login", json={"password": NEW["password"]})
    assert login.status_code == 200
    assert (await usersvc.delete("/user/alice", headers=ADMIN_AUTH)).status_code == 200
    assert (await usersvc.get("/user/alice")).status_code == 404


@pytest.mark.parametrize("setting", [{}, {"admin_token": ""}], ids=["unset", "empty"])
async def test_without_an_admin_token_set_no_bearer_is_admin(
    start_usersvc: Callable[..., Any], setting: dict[str, str]
) -> None:
    client: httpx.AsyncClient = await start_usersvc(**setting)
    await client.put("/user/alice", json=ALICE)
    for token in (ADMIN_TOKEN, "None", "null"):
        headers = {"authorization": f"Bearer {token}"}
        assert_refused(await client.delete("/user/alice", headers=headers))
    assert (await client.get("/user/alice")).status_code == 200


async def test_deleting_an_unknown_user_is_404(usersvc: httpx.AsyncClient) -> None:
    response = await usersvc.delete("/user/nobody")
    assert response.status_code == 404
    assert response.json()["ok"] is False


async def test_get_stays_public_and_never_shows_a_password(usersvc: httpx.AsyncClient) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    body = (await usersvc.get("/user/alice")).json()
    assert set(body) == {"ok", "uuid", "fullname", "hostname", "resolvedname"}
    assert ALICE["password"] not in str(body)
    assert "argon2" not in str(body)


async def test_concurrent_password_change_and_delete_never_lose_the_change(
    usersvc: httpx.AsyncClient,
) -> None:
    # Both prove the current password. Either the delete goes first and the PUT then creates
    # alice anew, or the PUT goes first and the delete's proof is stale: refused.
    await usersvc.put("/user/alice", json=ALICE)
    changed = {"fullname": "Alice L.", "password": "looking-glass"}
    put, delete = await asyncio.gather(
        usersvc.put("/user/alice", json=changed, headers=ALICE_AUTH),
        usersvc.delete("/user/alice", headers=ALICE_AUTH),
    )
    assert (put.status_code, delete.status_code) in {(201, 200), (200, 401)}
    assert (await usersvc.get("/user/alice")).json()["fullname"] == "Alice L."
    login = await usersvc.post("/user/alice/login", json={"password": "looking-glass"})
    assert login.status_code == 200


WEAK = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)


async def test_login_upgrades_a_weak_hash_and_the_password_still_works(
    usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    weak = WEAK.hash(ALICE["password"])
    await db_conn.execute("UPDATE users SET password_hash = $1 WHERE username = 'alice'", weak)
    login = await usersvc.post("/user/alice/login", json={"password": ALICE["password"]})
    assert login.status_code == 200
    upgraded = await db_conn.fetchval("SELECT password_hash FROM users WHERE username = 'alice'")
    assert upgraded != weak
    assert not needs_rehash(upgraded)
    again = await usersvc.post("/user/alice/login", json={"password": ALICE["password"]})
    assert again.status_code == 200


async def test_a_rehash_never_overwrites_a_password_set_meanwhile(
    postgres_url: str, usersvc: httpx.AsyncClient, db_conn: asyncpg.Connection
) -> None:
    # The login read the weak hash; a PUT then set a new password; the upgrade must not land.
    await usersvc.put("/user/alice", json=ALICE)
    weak = WEAK.hash(ALICE["password"])
    await db_conn.execute("UPDATE users SET password_hash = $1 WHERE username = 'alice'", weak)
    changed = {"fullname": "Alice", "password": "looking-glass"}
    admin_put = await usersvc.put("/user/alice", json=changed, headers=ADMIN_AUTH)
    assert admin_put.status_code == 200
    db = Database(postgres_url, min_size=1, max_size=1, timeout=5)
    db.start()
    try:
        assert await db.wait_connected(timeout=10)
        store = UserStore(db)
        stale_upgrade = PasswordHasher().hash(ALICE["password"])
        assert await store.replace_password_hash("alice", weak, stale_upgrade) is False
    finally:
        await db.close()
    login = await usersvc.post("/user/alice/login", json={"password": "looking-glass"})
    assert login.status_code == 200
