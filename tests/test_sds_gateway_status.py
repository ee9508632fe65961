"""Two sds replicas on one cluster: both serve the route, only the Lease holder writes status."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import RunningSds
from tests.fake_apiserver import FakeApiServer, gateway, gateway_class, http_route, service

OURS = "envoymesh.io/gateway-controller"
LEASE = {"lease_duration": 1.0, "lease_renew_deadline": 0.6, "lease_retry_period": 0.1}


async def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def holder(apiserver: FakeApiServer) -> str:
    lease = apiserver.get("Lease", "default", "envoymesh-sds") or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def accepted_generation(apiserver: FakeApiServer) -> int:
    route = apiserver.get("HTTPRoute", "default", "users") or {}
    for parent in (route.get("status") or {}).get("parents") or ():
        if parent.get("controllerName") == OURS:
            for condition in parent["conditions"]:
                if condition["type"] == "Accepted" and condition["status"] == "True":
                    return int(condition["observedGeneration"])
    return 0


async def start_replicas(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> dict[str, RunningSds]:
    return {
        name: await start_sds(
            source=["kubernetes"], kube_api_url=apiserver.url, lease_holder=name, **LEASE
        )
        for name in ("sds-a", "sds-b")
    }


async def test_two_replicas_one_writer(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> None:
    replicas = await start_replicas(apiserver, start_sds)
    for obj in (gateway_class(), gateway(), service("usersvc"), http_route("users")):
        apiserver.apply(obj)

    await eventually(lambda: accepted_generation(apiserver) == 1)

    leader = holder(apiserver)
    assert leader in replicas
    writers = {name: r.server.status_writer for name, r in replicas.items()}
    assert all(w is not None for w in writers.values())
    assert [name for name, w in writers.items() if w is not None and w.writes] == [leader]
    for replica in replicas.values():
        shown = replica.server.xds.translator.route_status(
            next(k for k in replica.registry.config.objects if k.kind == "HTTPRoute")
        )
        assert [c.type for c in shown[0].conditions if c.status] == ["Accepted", "ResolvedRefs"]


async def test_the_other_replica_writes_once_the_leader_is_gone(
    apiserver: FakeApiServer, start_sds: Callable[..., Any]
) -> None:
    replicas = await start_replicas(apiserver, start_sds)
    for obj in (gateway_class(), gateway(), service("usersvc"), http_route("users")):
        apiserver.apply(obj)
    await eventually(lambda: accepted_generation(apiserver) == 1)
    leader = holder(apiserver)

    await replicas[leader].stop()
    apiserver.apply(http_route("users", path="/user"))

    await eventually(lambda: accepted_generation(apiserver) == 2)
    assert holder(apiserver) not in ("", leader)
