"""Failed logins are limited per (username, client address); the client is who the trusted
proxies say it is, never what it claims itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from tests.test_usersvc_api import ALICE, ALICE_AUTH, basic
from usersvc.ratelimit import FailureLimiter

RIGHT = {"password": ALICE["password"]}
WRONG = {"password": "guess"}


def via(client_ip: str, claimed: str = "") -> dict[str, str]:
    """Headers as the edge would pass them on: what the client claimed, then its address."""
    return {"x-forwarded-for": f"{claimed}, {client_ip}" if claimed else client_ip}


async def fail_logins(client: httpx.AsyncClient, times: int, **kwargs: Any) -> None:
    for _ in range(times):
        response = await client.post("/user/alice/login", json=WRONG, **kwargs)
        assert response.status_code == 401


def assert_limited(response: httpx.Response, window: float = 300) -> None:
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= window
    assert response.json()["ok"] is False


async def test_ten_failed_logins_then_429_even_for_the_right_password(
    usersvc: httpx.AsyncClient,
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    await fail_logins(usersvc, 10)
    assert_limited(await usersvc.post("/user/alice/login", json=RIGHT))
    assert_limited(await usersvc.post("/user/alice/login", json=WRONG))


async def test_nine_failures_then_the_right_password_logs_in_and_clears_the_count(
    usersvc: httpx.AsyncClient,
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    await fail_logins(usersvc, 9)
    assert (await usersvc.post("/user/alice/login", json=RIGHT)).status_code == 200
    await fail_logins(usersvc, 9)
    assert (await usersvc.post("/user/alice/login", json=RIGHT)).status_code == 200


async def test_the_limit_lifts_when_the_window_has_passed(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(login_window=1.0)
    await client.put("/user/alice", json=ALICE)
    await fail_logins(client, 10)
    assert_limited(await client.post("/user/alice/login", json=RIGHT), window=1)
    async with asyncio.timeout(10):
        while (await client.post("/user/alice/login", json=RIGHT)).status_code == 429:
            await asyncio.sleep(0.1)
    assert (await client.post("/user/alice/login", json=RIGHT)).status_code == 200


async def test_failed_basic_credentials_on_put_and_delete_count_toward_the_same_limit(
    usersvc: httpx.AsyncClient,
) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    wrong = basic("alice", "guess")
    for i in range(10):
        method = usersvc.put if i % 2 else usersvc.delete
        kwargs: dict[str, Any] = {"json": ALICE} if i % 2 else {}
        assert (await method("/user/alice", headers=wrong, **kwargs)).status_code == 401
    assert_limited(await usersvc.delete("/user/alice", headers=ALICE_AUTH))
    assert_limited(await usersvc.put("/user/alice", json=ALICE, headers=ALICE_AUTH))
    assert_limited(await usersvc.post("/user/alice/login", json=RIGHT))
    assert (await usersvc.get("/user/alice")).status_code == 200


async def test_the_limit_is_per_user(usersvc: httpx.AsyncClient) -> None:
    await usersvc.put("/user/alice", json=ALICE)
    await usersvc.put("/user/bob", json={"fullname": "Bob", "password": "builder"})
    await fail_logins(usersvc, 10)
    bob = await usersvc.post("/user/bob/login", json={"password": "builder"})
    assert bob.status_code == 200


async def test_the_limit_is_per_client_behind_a_trusted_proxy(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(trusted_proxies="127.0.0.1")
    await client.put("/user/alice", json=ALICE)
    await fail_logins(client, 10, headers=via("203.0.113.7"))
    assert_limited(await client.post("/user/alice/login", json=RIGHT, headers=via("203.0.113.7")))
    other = await client.post("/user/alice/login", json=RIGHT, headers=via("198.51.100.1"))
    assert other.status_code == 200


async def test_a_client_cannot_escape_the_limit_by_claiming_other_addresses(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(trusted_proxies="127.0.0.1")
    await client.put("/user/alice", json=ALICE)
    for i in range(10):
        forged = via("203.0.113.7", claimed=f"10.0.0.{i}")
        assert (
            await client.post("/user/alice/login", json=WRONG, headers=forged)
        ).status_code == 401
    forged = via("203.0.113.7", claimed="10.0.0.99")
    assert_limited(await client.post("/user/alice/login", json=RIGHT, headers=forged))


async def test_x_forwarded_for_is_ignored_from_untrusted_peers(
    usersvc: httpx.AsyncClient,
) -> None:
    # No trusted proxies: every request is the loopback peer, whatever it claims.
    await usersvc.put("/user/alice", json=ALICE)
    for i in range(10):
        headers = via(f"203.0.113.{i}")
        assert (
            await usersvc.post("/user/alice/login", json=WRONG, headers=headers)
        ).status_code == 401
    assert_limited(await usersvc.post("/user/alice/login", json=RIGHT, headers=via("192.0.2.1")))


async def test_limiter_memory_is_bounded_forgetting_the_stalest_client_first(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(trusted_proxies="127.0.0.1", login_tracked=2)
    await client.put("/user/alice", json=ALICE)
    await fail_logins(client, 10, headers=via("203.0.113.7"))
    assert_limited(await client.post("/user/alice/login", json=RIGHT, headers=via("203.0.113.7")))
    await fail_logins(client, 1, headers=via("198.51.100.1"))
    await fail_logins(client, 1, headers=via("198.51.100.2"))
    # Only two pairs are remembered: the oldest one has been dropped.
    again = await client.post("/user/alice/login", json=RIGHT, headers=via("203.0.113.7"))
    assert again.status_code == 200


def test_a_limiter_never_holds_more_than_its_keys() -> None:
    limiter = FailureLimiter(limit=10, window=300, max_keys=1000)
    for i in range(50_000):
        limiter.failed((f"user{i}", "203.0.113.7"))
    assert len(limiter) == 1000


async def test_behind_trusted_hops_the_first_untrusted_address_is_the_client(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(trusted_proxies="127.0.0.1,10.0.0.0/24")
    await client.put("/user/alice", json=ALICE)
    # The client, then two proxies of ours that each appended who connected to them.
    hops = {"x-forwarded-for": "203.0.113.7, 10.0.0.5, 10.0.0.6"}
    await fail_logins(client, 10, headers=hops)
    assert_limited(await client.post("/user/alice/login", json=RIGHT, headers=via("203.0.113.7")))
