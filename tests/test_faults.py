"""The local mesh under steady load survives each fault it may meet in production.

One supervised mesh (its own PostgreSQL, sds, 3 replicas, the edge) runs for the module while
4 clients GET and 1 client PUTs new users through the edge (``meshctl.faults``). Each test
injects one fault and asserts on counts; the only times are generous heal deadlines. Run these
alone with ``pytest -m faults``; ``bench/faults.py`` prints the same figures as a table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshctl.faults import Outcome, SteadyLoad, faults, run_fault, supervised, verify_writes
from meshctl.mesh import Mesh, MeshSettings, free_mesh_ports

pytestmark = [pytest.mark.faults, pytest.mark.slow]

FAULTS = {fault.name: fault for fault in faults()}


@dataclass
class Rig:
    mesh: Mesh
    load: SteadyLoad

    async def run(self, fault: str) -> Outcome:
        return await run_fault(self.mesh, self.load, FAULTS[fault])

    def replica_addresses(self) -> set[str]:
        return {replica.at.address for replica in self.mesh.replicas.values()}


@pytest.fixture(scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    run_dir: Path = tmp_path_factory.mktemp("faults")
    mesh = Mesh(MeshSettings(run_dir=run_dir, replicas=3, say=lambda _: None, **free_mesh_ports(5)))
    await mesh.start()
    load = SteadyLoad(mesh.edge_url)
    try:
        async with supervised(mesh):
            await load.start()
            yield Rig(mesh, load)
            await load.stop()
    finally:
        await load.stop()
        await mesh.stop()


def assert_every_replica_serves(rig: Rig, outcome: Outcome) -> None:
    assert set(outcome.replicas_after) == rig.replica_addresses(), outcome


async def test_a_killed_replica_costs_at_most_three_requests_and_comes_back(rig: Rig) -> None:
    victim = rig.mesh.replicas[min(rig.mesh.replicas)].usersvc
    restarts = victim.restarts
    outcome = await rig.run("SIGKILL one usersvc replica")
    assert outcome.failed <= 3, outcome
    assert outcome.late_failures == 0, outcome
    assert victim.restarts == restarts + 1
    assert_every_replica_serves(rig, outcome)


async def test_a_frozen_replica_costs_a_bounded_number_of_requests_and_comes_back(
    rig: Rig,
) -> None:
    outcome = await rig.run("SIGSTOP one usersvc replica 10 s")
    assert outcome.failed <= 10, outcome
    assert outcome.late_failures == 0, outcome
    assert_every_replica_serves(rig, outcome)


async def test_a_killed_sds_fails_no_request_and_the_edge_keeps_every_replica(rig: Rig) -> None:
    restarts = rig.mesh.sds.restarts
    outcome = await rig.run("SIGKILL sds (restarted)")
    assert outcome.failed == 0, outcome
    assert outcome.fewest_edge_hosts == 3, outcome
    assert rig.mesh.sds.restarts == restarts + 1


async def test_a_frozen_sds_fails_no_request(rig: Rig) -> None:
    outcome = await rig.run("SIGSTOP sds 20 s")
    assert outcome.failed == 0, outcome
    assert outcome.fewest_edge_hosts == 3, outcome


@pytest.mark.parametrize(
    "fault", ["restart PostgreSQL (fast shutdown)", "SIGKILL PostgreSQL (restarted)"]
)
async def test_a_database_outage_answers_503_only_while_it_lasts(rig: Rig, fault: str) -> None:
    outcome = await rig.run(fault)
    assert set(outcome.failures) <= {"503"}, outcome
    assert outcome.late_failures == 0, outcome
    assert_every_replica_serves(rig, outcome)


async def test_a_killed_edge_refuses_connections_only_while_it_is_down(rig: Rig) -> None:
    outcome = await rig.run("SIGKILL the edge Envoy (restarted)")
    assert set(outcome.failures) <= {"refused", "reset"}, outcome
    assert outcome.late_failures == 0, outcome
    # Round-robin over every replica again: each answers a fair share of the GETs.
    answered = sum(outcome.replicas_after.values())
    assert_every_replica_serves(rig, outcome)
    assert min(outcome.replicas_after.values()) >= answered / 6, outcome


async def test_scaling_down_and_up_under_load_fails_no_request(rig: Rig) -> None:
    outcome = await rig.run("scale 3 -> 1 -> 3")
    assert outcome.failed == 0, outcome


async def test_no_acknowledged_write_is_lost(rig: Rig) -> None:
    await rig.load.stop()
    acknowledged = dict(rig.load.acknowledged)
    assert len(acknowledged) > 50
    assert await verify_writes(rig.mesh.edge_url, acknowledged) == len(acknowledged)
