"""A sign-up flood cannot knock usersvc over: bounded hashing, bounded memory, quick refusals.

Run it under the heavy lock: ``flock /work/wt/heavy.lock .venv/bin/pytest -m load``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from bench.usersvc_flood import flood, peak_rss_bytes
from meshctl.postgres import LocalPostgres

pytestmark = pytest.mark.load

FLOOD = 200
RSS_LIMIT = 400 * 2**20


async def test_200_concurrent_signups_stay_under_400_mb_and_get_201_or_a_quick_503(
    private_postgres: LocalPostgres, usersvc_process: Callable[..., Any]
) -> None:
    proc, base = await usersvc_process(private_postgres.url)
    result = await flood(base, FLOOD, timeout=60)
    peak = peak_rss_bytes(proc.pid)
    assert not result.errors, result.errors  # no timeouts, no resets
    assert set(result.statuses) <= {201, 503, 429}, result.statuses
    assert result.statuses[201] >= 1
    assert sum(result.statuses.values()) == FLOOD
    assert result.missing_retry_after == 0
    # Refusals come at once rather than after queueing behind the hashes (generous bound).
    assert max(result.latencies.get(503, [0.0])) < 5.0
    assert peak < RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    conn = await asyncpg.connect(private_postgres.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == result.statuses[201]
    finally:
        await conn.close()
    async with httpx.AsyncClient(base_url=base) as client:
        after = await client.put("/user/after-the-flood", json={"fullname": "A", "password": "p"})
        assert after.status_code == 201
    assert proc.running()
