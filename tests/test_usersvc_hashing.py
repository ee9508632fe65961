"""Password hashing is bounded: slots sized from the real CPU quota, a capped queue, then 503."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from usersvc.passwords import available_cpus

CPUS = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", CPUS),
        ("100000 100000", 1),
        ("150000 100000", min(CPUS, 2)),
        ("50000 100000", 1),
        ("6400000 100000", CPUS),
        ("garbage", CPUS),
    ],
)
def test_hashing_slots_follow_the_cgroup_cpu_quota(
    tmp_path: Path, cpu_max: str, expected: int
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert available_cpus(tmp_path) == expected


def test_without_a_cgroup_quota_the_process_cpus_count(tmp_path: Path) -> None:
    assert available_cpus(tmp_path) == CPUS


async def test_a_full_hashing_queue_answers_503_with_retry_after_at_once(
    start_usersvc: Callable[..., Any], db_conn: asyncpg.Connection
) -> None:
    client: httpx.AsyncClient = await start_usersvc(hash_concurrency=1, hash_queue=1)
    replies = await asyncio.gather(
        *(
            client.put(f"/user/u{i}", json={"fullname": "U", "password": f"pw{i}"})
            for i in range(12)
        )
    )
    statuses = [r.status_code for r in replies]
    assert set(statuses) == {201, 503}
    for busy in (r for r in replies if r.status_code == 503):
        assert int(busy.headers["retry-after"]) >= 1
        assert busy.json()["ok"] is False
        assert "busy" in busy.json()["error"]
    assert await db_conn.fetchval("SELECT count(*) FROM users") == statuses.count(201)


async def test_logins_share_the_bound_and_are_refused_with_503_not_401(
    start_usersvc: Callable[..., Any],
) -> None:
    client: httpx.AsyncClient = await start_usersvc(hash_concurrency=1, hash_queue=0)
    await client.put("/user/alice", json={"fullname": "A", "password": "pw"})
    replies = await asyncio.gather(
        *(client.post("/user/alice/login", json={"password": "pw"}) for _ in range(8))
    )
    statuses = {r.status_code for r in replies}
    assert statuses == {200, 503}
