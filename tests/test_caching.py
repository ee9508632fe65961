"""The one invalidation rule and the bounded LRUs every answer cache uses."""

from __future__ import annotations

from sds.api.v1 import V1Api
from sds.caching import Lru, still_current
from sds.model import Endpoint, ServiceSnapshot, Source
from sds.registry import Registry
from sds.xds.cache import XdsCache
from sds.xds.resources import EDS_TYPE_URL


def endpoint(address: str) -> Endpoint:
    return Endpoint(address, 80, Source.REGISTRATION)


def test_lru_forgets_the_least_recently_used_entry() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)
    assert len(lru) == 2


def test_an_answer_stays_current_until_its_service_version_moves() -> None:
    built = ServiceSnapshot("a", 3, ())
    heartbeat = ServiceSnapshot("a", 3, ())
    assert still_current(built, built)
    assert still_current(built, heartbeat)
    assert not still_current(built, heartbeat, age=2.0, refresh=1.0)
    assert not still_current(built, ServiceSnapshot("a", 4, ()))


def test_a_change_to_one_service_keeps_every_other_answer() -> None:
    registry = Registry()
    registry.set_source_status("test", ready=True)
    registry.replace(Source.REGISTRATION, "a", [endpoint("10.0.0.1")])
    registry.replace(Source.REGISTRATION, "b", [endpoint("10.0.0.2")])
    v1, xds = V1Api(registry, "test"), XdsCache(registry)
    v1_a, xds_a = v1.prepared("a"), xds.answer(EDS_TYPE_URL, (("a", "a"),), had=())[0]
    v1_b, xds_b = v1.prepared("b"), xds.answer(EDS_TYPE_URL, (("b", "b"),), had=())[0]

    registry.replace(Source.REGISTRATION, "b", [endpoint("10.0.0.3")])

    assert v1.prepared("a") is v1_a
    assert v1.still_valid(v1_a, "a")
    assert xds.answer(EDS_TYPE_URL, (("a", "a"),), had=())[0] is xds_a
    assert v1.prepared("b") is not v1_b
    assert not v1.still_valid(v1_b, "b")
    assert xds.answer(EDS_TYPE_URL, (("b", "b"),), had=())[0] is not xds_b


def test_streams_with_the_same_resources_share_one_serialised_answer() -> None:
    registry = Registry()
    registry.replace(Source.REGISTRATION, "a", [endpoint("10.0.0.1")])
    xds = XdsCache(registry)
    first, _ = xds.answer(EDS_TYPE_URL, (("a", "a"), ("shared", "shared")), had=())
    again, _ = xds.answer(EDS_TYPE_URL, (("a", "a"), ("shared", "shared")), had=())
    assert again is first
    assert xds.resource("a") is xds.resource("a")
