"""The Kubernetes source against an API server that speaks the real list/watch protocol."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import pytest
from prometheus_client import REGISTRY as METRICS

from sds.model import Health, IpFamily
from sds.registry import Registry, SourceStatus
from sds.sources.kubernetes import Backoff, KubernetesSource, WatchSettings
from tests.fake_apiserver import FakeApiServer, endpoint_slice, slice_endpoint

WAIT = 5.0
FAST = WatchSettings(backoff=Backoff(initial=0.02, maximum=0.2))
"""Watch settings for tests: quick retries, everything else as in production."""


def watch_settings(**changes: Any) -> WatchSettings:
    """FAST with some settings changed."""
    return dataclasses.replace(FAST, **changes)


def counted(metric: str, **labels: str) -> float:
    return METRICS.get_sample_value(metric, labels) or 0.0


class StartSource(Protocol):
    """Starts a KubernetesSource on a fresh registry, by default waiting until it is ready."""

    def __call__(self, *, wait_ready: bool = True, **options: Any) -> Awaitable[Registry]: ...


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def status(registry: Registry) -> SourceStatus:
    return registry.source_statuses().get("kubernetes", SourceStatus(ready=False, reason="unset"))


def hosts(registry: Registry, name: str) -> set[tuple[str, int]]:
    return {(e.address, e.port) for e in registry.snapshot(name).endpoints}


def health(registry: Registry, name: str) -> dict[str, Health]:
    return {e.address: e.health for e in registry.snapshot(name).endpoints}


def bookmarks_received() -> float:
    labels = {"type": "BOOKMARK"}
    return METRICS.get_sample_value("sds_kubernetes_watch_events_total", labels) or 0.0


@pytest.fixture
async def start_source(apiserver: FakeApiServer) -> AsyncIterator[StartSource]:
    """Run KubernetesSources against ``apiserver``; all cancelled and awaited at teardown."""
    tasks: list[asyncio.Task[None]] = []

    async def start(*, wait_ready: bool = True, **options: Any) -> Registry:
        registry = Registry()
        settings: dict[str, Any] = {"kube_api_url": apiserver.url, "watch": FAST, **options}
        tasks.append(asyncio.create_task(KubernetesSource(registry, **settings).run()))
        if wait_ready:
            await eventually(lambda: status(registry).ready)
        return registry

    yield start
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, pending = await asyncio.wait(tasks, timeout=WAIT)
    assert not pending, "KubernetesSource.run did not end when cancelled"
    for task in done:
        assert task.cancelled()


# ----- listing and watching ------------------------------------------------------------------


async def test_initial_list_populates_services(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1", "10.0.0.2"])
    )
    apiserver.apply(endpoint_slice("orders-1", "shop", "orders", addresses=["10.0.1.1"]))

    registry = await start_source()

    assert hosts(registry, "users.default") == {("10.0.0.1", 80), ("10.0.0.2", 80)}
    assert hosts(registry, "orders.shop") == {("10.0.1.1", 80)}


async def test_initial_list_reads_every_page(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    for i in range(5):
        apiserver.apply(
            endpoint_slice(f"svc{i}-1", "default", f"svc{i}", addresses=[f"10.0.0.{i}"])
        )

    registry = await start_source(watch=watch_settings(page_size=2))

    assert registry.services() == [f"svc{i}.default" for i in range(5)]
    assert apiserver.list_requests == 3


async def test_slice_added_after_start_appears(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source()

    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.1", 80)})


async def test_slice_modified_replaces_its_endpoints(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()

    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.2"]))

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.2", 80)})


async def test_slice_deleted_empties_its_service(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()

    apiserver.delete("default", "users-1")

    await eventually(lambda: registry.snapshot("users.default").endpoints == ())


async def test_service_endpoints_are_the_union_of_its_slices(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("users-2", "default", "users", addresses=["10.0.0.2"]))

    registry = await start_source()

    assert hosts(registry, "users.default") == {("10.0.0.1", 80), ("10.0.0.2", 80)}


async def test_deleting_one_slice_keeps_the_other_slices_endpoints(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("users-2", "default", "users", addresses=["10.0.0.2"]))
    registry = await start_source()

    apiserver.delete("default", "users-1")

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.2", 80)})


async def test_slices_without_a_service_name_label_are_ignored(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("custom-1", "default", None, addresses=["10.0.0.1"]))

    registry = await start_source()

    assert registry.services() == []


# ----- what an endpoint becomes --------------------------------------------------------------


async def test_not_ready_endpoint_is_unhealthy(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"], ready=False)
    )

    registry = await start_source()

    assert health(registry, "users.default") == {"10.0.0.1": Health.UNHEALTHY}


async def test_serving_and_terminating_endpoint_is_draining(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-1",
            "default",
            "users",
            addresses=["10.0.0.1"],
            ready=False,
            serving=True,
            terminating=True,
        )
    )

    registry = await start_source()

    assert health(registry, "users.default") == {"10.0.0.1": Health.DRAINING}


async def test_terminating_endpoint_no_longer_serving_is_unhealthy(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-1",
            "default",
            "users",
            addresses=["10.0.0.1"],
            ready=False,
            serving=False,
            terminating=True,
        )
    )

    registry = await start_source()

    assert health(registry, "users.default") == {"10.0.0.1": Health.UNHEALTHY}


async def test_unset_ready_condition_means_healthy(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"], ready=None)
    )

    registry = await start_source()

    assert health(registry, "users.default") == {"10.0.0.1": Health.HEALTHY}


async def test_only_port_is_used_without_port_name(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"], ports=[("", 8080)])
    )

    registry = await start_source()

    assert hosts(registry, "users.default") == {("10.0.0.1", 8080)}


async def test_several_ports_without_port_name_are_not_guessed(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-1",
            "default",
            "users",
            addresses=["10.0.0.1"],
            ports=[("http", 80), ("admin", 8001)],
        )
    )

    registry = await start_source()

    assert registry.snapshot("users.default").endpoints == ()
    assert status(registry).ready
    assert "users.default (admin, http)" in status(registry).reason
    assert "--port-name" in status(registry).reason


async def test_several_ports_without_port_name_are_logged(
    apiserver: FakeApiServer, start_source: StartSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sds.kubernetes")
    await start_source()

    apiserver.apply(
        endpoint_slice(
            "users-1", "default", "users", addresses=["10.0.0.1"], ports=[("http", 80), (None, 81)]
        )
    )

    await eventually(lambda: any("--port-name" in r.getMessage() for r in caplog.records))
    warning = next(r for r in caplog.records if "--port-name" in r.getMessage())
    assert warning.__dict__["service"] == "users.default"
    assert warning.__dict__["ports"] == ["81", "http"]


async def test_ambiguity_resolved_clears_the_reason(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-1", "default", "users", addresses=["10.0.0.1"], ports=[("http", 80), ("a", 1)]
        )
    )
    registry = await start_source()
    assert status(registry).reason

    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.1", 80)})
    assert status(registry) == SourceStatus(ready=True, reason="")


async def test_port_name_selects_that_port(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-1",
            "default",
            "users",
            addresses=["10.0.0.1"],
            ports=[("http", 80), ("grpc", 9000)],
        )
    )

    registry = await start_source(port_name="grpc")

    assert hosts(registry, "users.default") == {("10.0.0.1", 9000)}


async def test_slice_without_the_named_port_contributes_nothing(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    apiserver.apply(
        endpoint_slice(
            "users-2", "default", "users", addresses=["10.0.0.2"], ports=[("grpc", 9000)]
        )
    )

    registry = await start_source(port_name="grpc")

    assert hosts(registry, "users.default") == {("10.0.0.2", 9000)}


async def test_slice_whose_port_is_unset_contributes_nothing(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"], ports=[(None, None)])
    )

    registry = await start_source()

    assert registry.snapshot("users.default").endpoints == ()


async def test_zone_comes_from_the_endpoint(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-1",
            "default",
            "users",
            endpoints=[
                slice_endpoint("10.0.0.1", zone="eu-west-1a"),
                slice_endpoint("10.0.0.2"),
            ],
        )
    )

    registry = await start_source()

    zones = {e.address: e.zone for e in registry.snapshot("users.default").endpoints}
    assert zones == {"10.0.0.1": "eu-west-1a", "10.0.0.2": ""}


async def test_ipv6_slice_addresses_are_normalized(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-v6", "default", "users", addresses=["2001:DB8:0::0001"], address_type="IPv6"
        )
    )

    registry = await start_source()

    assert hosts(registry, "users.default") == {("2001:db8::1", 80)}


def dual_stack(apiserver: FakeApiServer) -> None:
    """A dual-stack service: one slice per address family, as Kubernetes makes them."""
    apiserver.apply(endpoint_slice("users-v4", "default", "users", addresses=["10.0.0.1"]))
    apiserver.apply(
        endpoint_slice(
            "users-v6", "default", "users", addresses=["2001:db8::1"], address_type="IPv6"
        )
    )


async def test_dual_stack_serves_both_families_by_default(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    dual_stack(apiserver)

    registry = await start_source()

    assert hosts(registry, "users.default") == {("10.0.0.1", 80), ("2001:db8::1", 80)}


@pytest.mark.parametrize(
    ("family", "served"),
    [(IpFamily.IPV4, ("10.0.0.1", 80)), (IpFamily.IPV6, ("2001:db8::1", 80))],
)
async def test_ip_family_serves_only_that_family(
    apiserver: FakeApiServer,
    start_source: StartSource,
    family: IpFamily,
    served: tuple[str, int],
) -> None:
    dual_stack(apiserver)

    registry = await start_source(ip_family=family)

    assert hosts(registry, "users.default") == {served}


async def test_ip_family_applies_to_watched_slices(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source(ip_family=IpFamily.IPV6)

    dual_stack(apiserver)
    apiserver.apply(
        endpoint_slice(
            "orders-v6", "default", "orders", addresses=["2001:db8::2"], address_type="IPv6"
        )
    )

    await eventually(lambda: hosts(registry, "orders.default") == {("2001:db8::2", 80)})
    assert hosts(registry, "users.default") == {("2001:db8::1", 80)}


async def test_fqdn_slices_are_ignored(apiserver: FakeApiServer, start_source: StartSource) -> None:
    apiserver.apply(
        endpoint_slice(
            "users-ext", "default", "users", addresses=["db.example.com"], address_type="FQDN"
        )
    )

    registry = await start_source()

    assert registry.snapshot("users.default").endpoints == ()


async def test_address_in_two_slices_keeps_the_healthiest(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(
        endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"], ready=False)
    )
    apiserver.apply(endpoint_slice("users-2", "default", "users", addresses=["10.0.0.1"]))

    registry = await start_source()

    assert health(registry, "users.default") == {"10.0.0.1": Health.HEALTHY}


# ----- names and namespaces ------------------------------------------------------------------


async def test_service_is_named_service_dot_namespace(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "team-a", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("users-1", "team-b", "users", addresses=["10.0.1.1"]))

    registry = await start_source()

    assert hosts(registry, "users.team-a") == {("10.0.0.1", 80)}
    assert hosts(registry, "users.team-b") == {("10.0.1.1", 80)}


async def test_plain_name_reaches_a_service_in_only_one_namespace(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("orders-1", "team-a", "orders", addresses=["10.0.0.1"]))

    registry = await start_source()

    assert registry.resolve("orders") == "orders.team-a"


async def test_plain_name_is_ambiguous_across_namespaces(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "team-a", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("users-1", "team-b", "users", addresses=["10.0.1.1"]))

    registry = await start_source()

    assert registry.resolve("users") == "users"
    assert registry.snapshot(registry.resolve("users")).endpoints == ()


async def test_namespace_restricted_source_ignores_other_namespaces(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "team-b", "users", addresses=["10.0.1.1"]))
    registry = await start_source(namespaces=["team-a"])

    apiserver.apply(endpoint_slice("orders-1", "team-b", "orders", addresses=["10.0.1.2"]))
    apiserver.apply(endpoint_slice("users-1", "team-a", "users", addresses=["10.0.0.1"]))

    await eventually(lambda: hosts(registry, "users.team-a") == {("10.0.0.1", 80)})
    assert registry.services() == ["users.team-a"]


async def test_every_listed_namespace_is_watched(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source(namespaces=["team-a", "team-b"])

    apiserver.apply(endpoint_slice("users-1", "team-a", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("users-1", "team-b", "users", addresses=["10.0.1.1"]))

    await eventually(lambda: registry.services() == ["users.team-a", "users.team-b"])


# ----- resuming, relisting, outages ----------------------------------------------------------


async def test_stream_ended_by_the_server_is_resumed_without_relisting(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source(watch=watch_settings(server_timeout=1))
    await eventually(lambda: apiserver.watches >= 2)

    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.1", 80)})
    assert apiserver.lists == 1


async def test_dropped_stream_resumes_from_last_resource_version_and_loses_nothing(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source()
    seen = apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.1", 80)})

    apiserver.drop_watches()
    apiserver.apply(endpoint_slice("users-2", "default", "users", addresses=["10.0.0.2"]))

    await eventually(lambda: len(hosts(registry, "users.default")) == 2)
    assert apiserver.lists == 1
    assert apiserver.watch_resource_versions[-1] == seen["metadata"]["resourceVersion"]


async def test_bookmark_lets_a_resumed_watch_skip_the_relist(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    await start_source(namespaces=["team-a"])
    await eventually(lambda: apiserver.open_watches == 1)
    # A change the source does not watch moves the server's resourceVersion on.
    apiserver.apply(endpoint_slice("users-1", "team-b", "users", addresses=["10.0.1.1"]))
    bookmarks = bookmarks_received()
    apiserver.send_bookmarks()
    await eventually(lambda: bookmarks_received() > bookmarks)

    apiserver.compact()
    apiserver.drop_watches()

    await eventually(lambda: apiserver.watches == 2 and apiserver.open_watches == 1)
    assert apiserver.watch_resource_versions[-1] == str(apiserver.resource_version)
    assert apiserver.lists == 1


async def test_gone_relists_and_drops_services_deleted_while_disconnected(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("orders-1", "default", "orders", addresses=["10.0.1.1"]))
    registry = await start_source()

    apiserver.drop_watches()
    apiserver.delete("default", "orders-1")
    apiserver.apply(endpoint_slice("carts-1", "default", "carts", addresses=["10.0.2.1"]))
    apiserver.compact()

    await eventually(lambda: hosts(registry, "carts.default") == {("10.0.2.1", 80)})
    assert registry.snapshot("orders.default").endpoints == ()
    assert hosts(registry, "users.default") == {("10.0.0.1", 80)}
    assert apiserver.lists == 2


async def test_gone_is_counted_as_a_relist(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    before = METRICS.get_sample_value("sds_kubernetes_relists_total", {"reason": "gone"}) or 0.0
    await start_source()

    apiserver.drop_watches()
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    apiserver.compact()

    await eventually(lambda: apiserver.lists == 2)
    after = METRICS.get_sample_value("sds_kubernetes_relists_total", {"reason": "gone"})
    assert after == before + 1


async def test_relist_of_one_namespace_leaves_the_others_alone(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "team-a", "users", addresses=["10.0.0.1"]))
    apiserver.apply(endpoint_slice("users-1", "team-b", "users", addresses=["10.0.1.1"]))
    registry = await start_source(namespaces=["team-a", "team-b"])
    version_b = registry.snapshot("users.team-b").version

    apiserver.drop_watches()
    apiserver.delete("team-a", "users-1")
    apiserver.compact()

    await eventually(lambda: apiserver.lists == 4 and apiserver.open_watches == 2)
    assert registry.snapshot("users.team-a").endpoints == ()
    assert hosts(registry, "users.team-b") == {("10.0.1.1", 80)}
    assert registry.snapshot("users.team-b").version == version_b


async def test_api_server_down_at_startup_is_not_ready_until_it_answers(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    await apiserver.stop()

    registry = await start_source(wait_ready=False)
    await eventually(lambda: "failing" in status(registry).reason)
    assert not status(registry).ready

    await apiserver.start()

    await eventually(lambda: status(registry).ready)
    assert hosts(registry, "users.default") == {("10.0.0.1", 80)}


async def test_api_server_down_later_keeps_the_last_known_endpoints(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()
    before = registry.snapshot("users.default")

    await apiserver.stop()
    await asyncio.sleep(0.5)  # several failed reconnects

    assert registry.snapshot("users.default") == before
    assert status(registry).ready


async def test_changes_made_while_the_api_server_was_away_are_picked_up(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()
    await apiserver.stop()
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.9"]))

    await apiserver.start()

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.9", 80)})
    assert apiserver.lists == 1


# ----- large objects, silent streams, bad events, expired lists -----------------------------


def big_slice(name: str, count: int, first: int = 0) -> dict[str, Any]:
    """A slice of ``count`` endpoints shaped as the controller writes them (pod, node, zone)."""
    return endpoint_slice(
        name,
        "default",
        "users",
        endpoints=[
            slice_endpoint(
                f"10.1.{n // 250}.{n % 250 + 1}",
                zone="eu-west-1a",
                node=f"node-{n % 50:03d}.eu-west-1.compute.internal",
                pod=f"users-7d9f8c6b5d-{n:05d}",
            )
            for n in range(first, first + count)
        ],
    )


async def test_slice_of_a_thousand_endpoints_is_listed(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(big_slice("users-1", 1000))

    registry = await start_source()

    assert len(hosts(registry, "users.default")) == 1000


async def test_watch_event_of_a_thousand_endpoints_is_applied_without_relisting(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source()
    await eventually(lambda: apiserver.open_watches == 1)
    big = big_slice("users-1", 1000)
    assert len(json.dumps({"type": "ADDED", "object": big})) > 128 * 1024

    apiserver.apply(big)
    apiserver.apply(endpoint_slice("orders-1", "default", "orders", addresses=["10.0.1.1"]))

    await eventually(lambda: hosts(registry, "orders.default") == {("10.0.1.1", 80)})
    assert len(hosts(registry, "users.default")) == 1000
    assert apiserver.lists == 1
    assert apiserver.watches == 1


async def test_silent_watch_is_resumed_from_the_last_resource_version(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source(watch=watch_settings(read_timeout=0.5))
    seen = apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.1", 80)})
    watches = apiserver.watches

    apiserver.silence_watches()
    apiserver.apply(endpoint_slice("users-2", "default", "users", addresses=["10.0.0.2"]))

    await eventually(lambda: len(hosts(registry, "users.default")) == 2)
    assert apiserver.watches == watches + 1
    assert apiserver.watch_resource_versions[-1] == seen["metadata"]["resourceVersion"]
    assert apiserver.lists == 1


async def test_silent_watch_counts_as_a_restart(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    before = counted("sds_kubernetes_watch_restarts_total", reason="silent")
    await start_source(watch=watch_settings(read_timeout=0.3))
    await eventually(lambda: apiserver.open_watches == 1)

    apiserver.silence_watches()

    await eventually(
        lambda: counted("sds_kubernetes_watch_restarts_total", reason="silent") > before
    )


async def test_watch_that_never_answers_is_given_up_after_the_request_timeout(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source(watch=watch_settings(request_timeout=0.3))
    await eventually(lambda: apiserver.open_watches == 1)
    timeouts = counted("sds_kubernetes_api_errors_total", status="timeout")

    apiserver.hang_new_watches = True
    apiserver.drop_watches()
    await eventually(
        lambda: counted("sds_kubernetes_api_errors_total", status="timeout") > timeouts
    )
    apiserver.hang_new_watches = False
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.1", 80)})
    assert apiserver.lists == 1


async def test_undecodable_event_relists_instead_of_retrying_its_version(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()
    await eventually(lambda: apiserver.open_watches == 1)
    stuck_at = apiserver.watch_resource_versions[-1]

    apiserver.send_raw_event(b'{"type":"MODIFIED","object":{"metadata":\xff}}\n')
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.2"]))

    await eventually(lambda: hosts(registry, "users.default") == {("10.0.0.2", 80)})
    await eventually(lambda: apiserver.watches == 2)
    assert apiserver.lists == 2
    assert apiserver.watch_resource_versions[-1] != stuck_at


async def test_event_over_the_size_limit_relists(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    registry = await start_source(watch=watch_settings(max_event_bytes=64 * 1024))
    await eventually(lambda: apiserver.open_watches == 1)

    apiserver.apply(big_slice("users-1", 1000))

    await eventually(lambda: apiserver.lists == 2)
    await eventually(lambda: len(hosts(registry, "users.default")) == 1000)
    assert status(registry).ready


async def test_expired_continue_token_restarts_the_list_in_one_page(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    for i in range(5):
        apiserver.apply(
            endpoint_slice(f"svc{i}-1", "default", f"svc{i}", addresses=[f"10.0.0.{i}"])
        )
    apiserver.expire_continue_tokens = True

    registry = await start_source(watch=watch_settings(page_size=2))

    assert registry.services() == [f"svc{i}.default" for i in range(5)]
    assert apiserver.lists == 2
    assert apiserver.list_requests == 3  # first page, expired continue, the whole list


# ----- RBAC ----------------------------------------------------------------------------------


async def test_forbidden_at_startup_reports_the_missing_rbac_grant(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.set_forbidden(True)

    registry = await start_source(wait_ready=False)

    await eventually(lambda: "RBAC" in status(registry).reason)
    assert not status(registry).ready
    assert "endpointslices.discovery.k8s.io" in status(registry).reason


async def test_forbidden_is_logged_as_an_error_naming_the_permission(
    apiserver: FakeApiServer, start_source: StartSource, caplog: pytest.LogCaptureFixture
) -> None:
    apiserver.set_forbidden(True)
    caplog.set_level(logging.ERROR, logger="sds.kubernetes")

    registry = await start_source(wait_ready=False)

    await eventually(lambda: "RBAC" in status(registry).reason)
    errors = [
        r for r in caplog.records if r.name == "sds.kubernetes" and r.levelno == logging.ERROR
    ]
    assert errors
    assert "get, list and watch on endpointslices.discovery.k8s.io" in errors[0].getMessage()


async def test_forbidden_after_sync_keeps_endpoints_and_reports_not_ready(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()

    apiserver.set_forbidden(True)
    apiserver.drop_watches()

    await eventually(lambda: not status(registry).ready)
    assert "forbidden" in status(registry).reason
    assert hosts(registry, "users.default") == {("10.0.0.1", 80)}


async def test_access_granted_again_makes_the_source_ready(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.set_forbidden(True)
    registry = await start_source(wait_ready=False)
    await eventually(lambda: "RBAC" in status(registry).reason)
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))

    apiserver.set_forbidden(False)

    await eventually(lambda: status(registry).ready)
    assert hosts(registry, "users.default") == {("10.0.0.1", 80)}


# ----- versions and lifecycle ----------------------------------------------------------------


async def test_change_that_routes_the_same_keeps_the_version(
    apiserver: FakeApiServer, start_source: StartSource
) -> None:
    apiserver.apply(endpoint_slice("users-1", "default", "users", addresses=["10.0.0.1"]))
    registry = await start_source()
    version = registry.snapshot("users.default").version

    apiserver.apply(
        endpoint_slice(
            "users-1", "default", "users", addresses=["10.0.0.1"], labels={"team": "identity"}
        )
    )
    apiserver.apply(endpoint_slice("orders-1", "default", "orders", addresses=["10.0.1.1"]))

    await eventually(lambda: hosts(registry, "orders.default") == {("10.0.1.1", 80)})
    assert registry.snapshot("users.default").version == version


async def test_cancelled_run_closes_its_watch(apiserver: FakeApiServer) -> None:
    registry = Registry()
    task = asyncio.create_task(KubernetesSource(registry, kube_api_url=apiserver.url).run())
    await eventually(lambda: apiserver.open_watches == 1)

    task.cancel()
    await asyncio.wait([task], timeout=WAIT)

    assert task.cancelled()
    await eventually(lambda: apiserver.open_watches == 0)
