"""Hashing admission: requests wait while their expected wait fits the budget, the rest are
refused at the gate, before the body, the database or the hasher, and the count never leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import clean_database, serve_http, usersvc_settings
from tests.test_usersvc_api import basic
from usersvc.app import create_app
from usersvc.passwords import Hashing, HashingBusy

Started = tuple[FastAPI, httpx.AsyncClient]


@pytest.fixture
async def start_app(postgres_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Like ``start_usersvc``, but also gives the app, to read its hashing and database counts."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Started:
            await clean_database(postgres_url)
            app = create_app(usersvc_settings(postgres_url, **overrides))
            base = await stack.enter_async_context(serve_http(app))
            limits = httpx.Limits(max_connections=200)
            client = httpx.AsyncClient(base_url=base, timeout=30, limits=limits)
            return app, await stack.enter_async_context(client)

        yield start


async def sign_up(client: httpx.AsyncClient, count: int, prefix: str = "u") -> list[httpx.Response]:
    """``count`` PUTs of new names, all at once."""
    return await asyncio.gather(
        *(
            client.put(f"/user/{prefix}{i}", json={"fullname": "U", "password": f"pw{i}"})
            for i in range(count)
        )
    )


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return once ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_requests_are_admitted_while_their_expected_wait_is_within_the_budget() -> None:
    # 2 slots, 0.1 s a hash, 1 s budget: 2 start at once, 20 more expect 0.05-1.0 s.
    hashing = Hashing(concurrency=2, queue=100, wait_budget=1.0, first_estimate=0.1)
    try:
        with contextlib.ExitStack() as held:
            for _ in range(22):
                held.enter_context(hashing.admit())
            with pytest.raises(HashingBusy) as refused:
                hashing.admit()
            assert hashing.admitted == 22
        assert refused.value.retry_after == 2  # the backlog's 1.05 s, rounded up
        assert hashing.admitted == 0
    finally:
        hashing.close()


def test_the_queue_cap_holds_whatever_the_budget_allows() -> None:
    hashing = Hashing(concurrency=1, queue=3, wait_budget=3600.0, first_estimate=0.1)
    try:
        with contextlib.ExitStack() as held:
            for _ in range(4):
                held.enter_context(hashing.admit())
            with pytest.raises(HashingBusy):
                hashing.admit()
        assert hashing.refused == 1
    finally:
        hashing.close()


async def test_16_concurrent_signups_with_one_slot_all_succeed(
    start_app: Callable[..., Any], db_conn: asyncpg.Connection
) -> None:
    # The shipped budget and cap (the test settings' longer budget put back).
    _, client = await start_app(hash_concurrency=1, hash_wait=2.0, hash_queue=None)
    replies = await sign_up(client, 16)
    assert [r.status_code for r in replies] == [201] * 16
    assert await db_conn.fetchval("SELECT count(*) FROM users") == 16


async def test_with_a_small_hash_wait_the_excess_is_refused_with_retry_after(
    start_app: Callable[..., Any], db_conn: asyncpg.Connection
) -> None:
    _, client = await start_app(hash_concurrency=1, hash_wait=0.0)
    replies = await sign_up(client, 12)
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {201, 503}
    for busy in (r for r in replies if r.status_code == 503):
        assert int(busy.headers["retry-after"]) >= 1
        body = busy.json()
        assert body["ok"] is False
        assert "busy" in body["error"]
        assert {"hostname", "resolvedname"} <= body.keys()
    assert await db_conn.fetchval("SELECT count(*) FROM users") == statuses.count(201)


async def test_a_refused_signup_never_reaches_the_database_or_the_hasher(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0)
    hashing, db = app.state.hashing, app.state.db
    hashes, checkouts = hashing.completed, db.checkouts
    replies = await sign_up(client, 12)
    created = sum(r.status_code == 201 for r in replies)
    refused = sum(r.status_code == 503 for r in replies)
    assert refused > 0
    assert hashing.refused == refused
    assert hashing.completed - hashes == created  # one hash per sign-up made
    assert db.checkouts - checkouts == 2 * created  # look the name up, insert it


async def test_a_refused_login_never_reaches_the_database_or_the_hasher(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0)
    hashing, db = app.state.hashing, app.state.db
    assert (await client.put("/user/alice", json={"fullname": "A", "password": "pw"})).is_success
    hashes, checkouts = hashing.completed, db.checkouts
    replies = await asyncio.gather(
        *(client.post("/user/alice/login", json={"password": "pw"}) for _ in range(12))
    )
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {200, 503}
    assert hashing.completed - hashes == statuses.count(200)
    assert db.checkouts - checkouts == statuses.count(200)


async def test_basic_authenticated_changes_are_admitted_like_signups(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0)
    assert (await client.put("/user/alice", json={"fullname": "A", "password": "pw"})).is_success
    deletes = await asyncio.gather(
        *(client.delete("/user/alice", headers=basic("alice", "wrong")) for _ in range(8))
    )
    statuses = [r.status_code for r in deletes]
    assert set(statuses) == {401, 503}
    assert app.state.hashing.refused == statuses.count(503)


async def test_gets_health_and_live_answer_during_a_flood_of_refusals(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0)
    assert (await client.put("/user/alice", json={"fullname": "A", "password": "pw"})).is_success
    hashing = app.state.hashing
    refused_before = hashing.refused
    stop = asyncio.Event()

    async def flood(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await client.put(f"/user/f{worker}-{n}", json={"fullname": "F", "password": "pw"})

    flooding = [asyncio.create_task(flood(w)) for w in range(32)]
    try:
        await until(lambda: hashing.refused - refused_before >= 50)
        answers = [
            (await client.get(path)).status_code
            for _ in range(10)
            for path in ("/user/alice", "/user/health", "/user/live")
        ]
        refused_meanwhile = hashing.refused - refused_before
    finally:
        stop.set()
        await asyncio.gather(*flooding)
    assert answers == [200] * 30
    assert refused_meanwhile >= 50


async def test_the_count_returns_to_zero_after_clients_leave_midway(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=30.0)
    hashing = app.state.hashing
    base = str(client.base_url)
    port = int(base.rsplit(":", 1)[1])
    # Heads of PUTs whose bodies never come: each holds a place until its client leaves.
    head = b"PUT /user/gone HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    writers = []
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + b"content-length: 100\r\n\r\n{")
        await writer.drain()
        writers.append(writer)
    await until(lambda: hashing.admitted == 5)
    # And sign-ups cancelled while they wait for the hasher.
    pending = [
        asyncio.create_task(client.put(f"/user/c{i}", json={"fullname": "C", "password": "pw"}))
        for i in range(10)
    ]
    await until(lambda: hashing.admitted >= 10)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for writer in writers:
        writer.close()
        await writer.wait_closed()
    await until(lambda: hashing.admitted == 0, timeout=30)
    assert hashing.waiting == 0
    assert hashing.running == 0
    after = await client.put("/user/after", json={"fullname": "A", "password": "pw"})
    assert after.status_code == 201


async def hold_the_slot(client: httpx.AsyncClient) -> asyncio.StreamWriter:
    """The head of a PUT whose body never comes: it holds the one hashing place until closed."""
    port = int(str(client.base_url).rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /user/held HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n{"
    )
    await writer.drain()
    return writer


async def test_a_refusal_is_answered_after_the_refusal_delay_with_retry_after(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0, hash_refusal_delay=2.0)
    hashing, pacing = app.state.hashing, app.state.pacing
    pacing.burst = 0
    writer = await hold_the_slot(client)
    try:
        await until(lambda: hashing.admitted == 1)
        refused = asyncio.create_task(
            client.put("/user/late", json={"fullname": "L", "password": "pw"})
        )
        await until(lambda: pacing.held == 1)
        assert not refused.done()
        assert hashing.refused == 1
        reply = await refused
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) >= 1
    assert pacing.held == 0
    assert pacing.paused == 1
    assert pacing.unpaced == 0


async def test_refusals_beyond_the_held_cap_are_answered_at_once(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0, hash_refusal_delay=5.0)
    hashing, pacing = app.state.hashing, app.state.pacing
    pacing.cap, pacing.burst = 2, 0
    writer = await hold_the_slot(client)
    try:
        await until(lambda: hashing.admitted == 1)
        refused = [
            asyncio.create_task(client.put(f"/user/r{i}", json={"fullname": "R", "password": "pw"}))
            for i in range(6)
        ]
        await until(lambda: sum(task.done() for task in refused) == 4)
        assert pacing.held == 2
        assert pacing.unpaced == 4
        replies = await asyncio.gather(*refused)
    finally:
        writer.close()
        await writer.wait_closed()
    assert [r.status_code for r in replies] == [503] * 6
    assert all(int(r.headers["retry-after"]) >= 1 for r in replies)
    assert hashing.refused == 6
    assert pacing.paused == 2
    assert pacing.held == 0


async def test_with_no_refusal_delay_nothing_is_held(start_app: Callable[..., Any]) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0, hash_refusal_delay=0.0)
    hashing, pacing = app.state.hashing, app.state.pacing
    writer = await hold_the_slot(client)
    try:
        await until(lambda: hashing.admitted == 1)
        replies = await sign_up(client, 8, prefix="now")
    finally:
        writer.close()
        await writer.wait_closed()
    assert [r.status_code for r in replies] == [503] * 8
    assert hashing.refused == 8
    assert pacing.paused == 0
    assert pacing.unpaced == 0


async def test_a_burst_of_refusals_is_answered_at_once_and_only_the_rest_paused(
    start_app: Callable[..., Any],
) -> None:
    app, client = await start_app(hash_concurrency=1, hash_wait=0.0, hash_refusal_delay=1.0)
    hashing, pacing = app.state.hashing, app.state.pacing
    pacing.burst, pacing.rate = 4, 0.0
    writer = await hold_the_slot(client)
    try:
        await until(lambda: hashing.admitted == 1)
        refused = [
            asyncio.create_task(client.put(f"/user/b{i}", json={"fullname": "B", "password": "pw"}))
            for i in range(6)
        ]
        await until(lambda: sum(task.done() for task in refused) == 4 and pacing.held == 2)
        assert pacing.unpaused == 4
        replies = await asyncio.gather(*refused)
    finally:
        writer.close()
        await writer.wait_closed()
    assert [r.status_code for r in replies] == [503] * 6
    assert all(int(r.headers["retry-after"]) >= 1 for r in replies)
    assert pacing.paused == 2
