"""Leader election over a Lease on the fake API server, with several electors."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from sds.leader_election import LeaderElectionSettings, LeaderElector, identity
from tests.fake_apiserver import FakeApiServer

WAIT = 10.0
QUICK = LeaderElectionSettings(lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)


class StartElector(Protocol):
    """Starts an elector with ``holder`` as its identity; returns it and its task."""

    def __call__(
        self, holder: str, settings: LeaderElectionSettings = QUICK
    ) -> tuple[LeaderElector, asyncio.Task[None]]: ...


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def start_elector(apiserver: FakeApiServer) -> AsyncIterator[StartElector]:
    """Electors against ``apiserver``; all cancelled and awaited at teardown."""
    tasks: list[asyncio.Task[None]] = []

    def start(
        holder: str, settings: LeaderElectionSettings = QUICK
    ) -> tuple[LeaderElector, asyncio.Task[None]]:
        elector = LeaderElector(kube_api_url=apiserver.url, settings=settings, holder=holder)
        task = asyncio.create_task(elector.run())
        tasks.append(task)
        return elector, task

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)


def holder(apiserver: FakeApiServer) -> str:
    lease = apiserver.get("Lease", "default", "envoymesh-sds") or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT)


async def test_two_replicas_one_leader(
    apiserver: FakeApiServer, start_elector: StartElector
) -> None:
    a, _ = start_elector("a")
    b, _ = start_elector("b")

    await eventually(lambda: a.leading or b.leading)
    writes = apiserver.lease_writes
    await eventually(lambda: apiserver.lease_writes >= writes + 10)  # ten renewals on

    assert [a.leading, b.leading].count(True) == 1
    assert a.transitions + b.transitions == 1
    assert holder(apiserver) == ("a" if a.leading else "b")


async def test_the_other_replica_takes_over_when_the_leader_dies(
    apiserver: FakeApiServer, start_elector: StartElector
) -> None:
    crashing = dataclasses.replace(QUICK, release_on_cancel=False)
    a, a_task = start_elector("a", crashing)
    await eventually(lambda: a.leading)
    b, _ = start_elector("b", crashing)
    await eventually(lambda: holder(apiserver) == "a" and apiserver.lease_writes >= 3)
    loop = asyncio.get_running_loop()

    await stop(a_task)
    killed = loop.time()

    await eventually(lambda: b.leading)
    # The follower waits a lease duration from the last renewal it saw, polling each retry
    # period: client-go's bound.
    assert loop.time() - killed < QUICK.lease_duration + 2 * QUICK.retry_period
    assert holder(apiserver) == "b"


async def test_a_leader_shut_down_releases_the_lease_at_once(
    apiserver: FakeApiServer, start_elector: StartElector
) -> None:
    slow = dataclasses.replace(QUICK, lease_duration=30.0, renew_deadline=20.0)
    a, a_task = start_elector("a", slow)
    await eventually(lambda: a.leading)
    b, _ = start_elector("b", slow)
    loop = asyncio.get_running_loop()

    await stop(a_task)
    released = loop.time()

    await eventually(lambda: b.leading)
    assert loop.time() - released < slow.lease_duration / 2


async def test_a_leader_that_cannot_renew_stops_leading_within_the_renew_deadline(
    apiserver: FakeApiServer, start_elector: StartElector
) -> None:
    a, _ = start_elector("a")
    await eventually(lambda: a.leading)
    loop = asyncio.get_running_loop()

    await apiserver.stop()
    cut = loop.time()

    await eventually(lambda: not a.leading)
    assert loop.time() - cut <= QUICK.renew_deadline + 0.05
    await apiserver.start()


def test_identity_is_the_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "sds-7f9c-abcde")

    assert identity() == "sds-7f9c-abcde"


def test_identity_without_a_pod_name_is_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)

    assert identity().endswith(f"_{os.getpid()}")


def test_settings_refuse_a_renew_deadline_past_the_lease_duration() -> None:
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaderElectionSettings(lease_duration=5.0, renew_deadline=10.0)


async def test_a_lease_replace_with_a_stale_resource_version_conflicts(
    apiserver: FakeApiServer, start_elector: StartElector
) -> None:
    a, _ = start_elector("a")
    await eventually(lambda: a.leading)
    async with client.ApiClient(client.Configuration(host=apiserver.url)) as api_client:
        api = client.CoordinationV1Api(api_client)
        lease = await api.read_namespaced_lease("envoymesh-sds", "default")
        writes = apiserver.lease_writes
        await eventually(lambda: apiserver.lease_writes > writes)  # a renewal moves it on
        lease.spec.holder_identity = "intruder"
        with pytest.raises(ApiException) as refused:
            await api.replace_namespaced_lease("envoymesh-sds", "default", lease)

    assert refused.value.status == 409
    assert holder(apiserver) == "a"
