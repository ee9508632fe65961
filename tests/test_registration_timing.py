"""Registration timing comes from one declared interval: usersvc's heartbeat interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from envoymesh.heartbeat import HEARTBEAT_INTERVAL
from sds.config import Settings as SdsSettings
from sds.registry import Registry
from sds.sources.registration import RegistrationSource
from tests.conftest import RunningSds
from usersvc.config import Settings as UsersvcSettings


def test_sds_expects_the_heartbeat_interval_usersvc_uses() -> None:
    sds = SdsSettings()
    usersvc = UsersvcSettings()

    assert sds.heartbeat_interval == usersvc.register_interval == HEARTBEAT_INTERVAL


def test_host_ttl_defaults_to_three_heartbeat_intervals() -> None:
    assert SdsSettings(heartbeat_interval=4).effective_host_ttl == 12


def test_warmup_defaults_to_two_and_a_half_heartbeat_intervals() -> None:
    assert SdsSettings(heartbeat_interval=4).effective_registration_warmup == 10


def test_explicit_ttl_and_warmup_are_kept() -> None:
    settings = SdsSettings(heartbeat_interval=4, host_ttl=60, registration_warmup=0)

    assert (settings.effective_host_ttl, settings.effective_registration_warmup) == (60, 0)


def test_heartbeat_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDS_HEARTBEAT_INTERVAL", "2")

    settings = SdsSettings()

    assert (settings.effective_host_ttl, settings.effective_registration_warmup) == (6, 5)


def test_host_survives_two_missed_heartbeats_and_expires_after_three() -> None:
    settings = SdsSettings(heartbeat_interval=10)
    registry = Registry()
    source = RegistrationSource(registry, host_ttl=settings.effective_host_ttl)
    source.register("usersvc", {"ip": "10.0.0.1", "port": 80})
    beat = time.monotonic()

    assert source.expire(beat + 2.9 * settings.heartbeat_interval) == 0
    assert source.expire(beat + 3.1 * settings.heartbeat_interval) == 1
    assert registry.snapshot("usersvc").endpoints == ()


async def test_readyz_says_which_warmup_runs_and_how_long_is_left(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(heartbeat_interval=4, registration_warmup=None)
    async with httpx.AsyncClient(base_url=sds.url) as client:
        response = await client.get("/readyz")

    registration = response.json()["sources"]["registration"]
    assert response.status_code == 503
    assert registration["reason"].startswith(
        "warming up (registration): 10s (2.5 times the 4s heartbeat interval)"
    )
    assert 0 < registration["remaining_seconds"] <= 10


async def test_readyz_drops_the_warmup_once_it_is_over(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(heartbeat_interval=0.02, registration_warmup=None)
    async with httpx.AsyncClient(base_url=sds.url) as client, asyncio.timeout(10):
        while (response := await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.02)

    assert response.json()["sources"]["registration"] == {"ready": True, "reason": ""}


@pytest.mark.parametrize(
    ("ttl", "warmup", "complaint"),
    [(5.0, 25.0, "expire between heartbeats"), (30.0, 5.0, "shorter than the heartbeat")],
)
async def test_self_defeating_timing_is_warned_about(
    caplog: pytest.LogCaptureFixture, ttl: float, warmup: float, complaint: str
) -> None:
    caplog.set_level(logging.WARNING, logger="sds.registration")
    source = RegistrationSource(
        Registry(), host_ttl=ttl, warmup=warmup, heartbeat_interval=HEARTBEAT_INTERVAL
    )

    running = asyncio.create_task(source.run())
    await asyncio.sleep(0)  # up to its first wait
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)

    assert any(complaint in record.getMessage() for record in caplog.records)
