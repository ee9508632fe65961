"""``meshctl demo`` end to end, run twice: every step of the story holds, with its counts.

The second run meets the users the first one saved and updates them as their owner. The
tests read the demo's own printout: its exit code, and the per-replica counts of each step.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from envoymesh.procs import ManagedProcess
from meshctl.mesh import free_mesh_ports

pytestmark = pytest.mark.slow

DEMO_TIMEOUT = 180.0
STRICT_DNS = "1. The problem"
SDS_EDGE = "2. The fix"
ROUTING = "3. Routing from sds"
GRPC = "4. Proxyless gRPC"
FAULTS = "5. Faults heal"


class DemoRun:
    """One demo's exit code and printout, cut into its steps."""

    def __init__(self, code: int, output: str) -> None:
        self.code = code
        self.output = output
        self.steps = {
            part.splitlines()[0]: part for part in output.split("\n▶ ")[1:] if part.strip()
        }

    def step(self, prefix: str) -> str:
        """The printout of the step titled ``prefix`` or, for a numbered one, ``prefix: ...``."""
        found = [
            text
            for title, text in self.steps.items()
            if title == prefix or title.startswith(f"{prefix}:")
        ]
        assert len(found) == 1, self.output
        return found[0]

    def per_replica(self, prefix: str) -> dict[str, int]:
        """The step's ``per replica: ADDRESS xN, ...`` line."""
        match = re.search(r"^  per replica: (.*)$", self.step(prefix), re.MULTILINE)
        assert match is not None, self.step(prefix)
        counts = (item.rsplit(" x", 1) for item in match.group(1).split(", "))
        return {address: int(n) for address, n in counts}


@pytest.fixture(scope="module")
async def runs(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> list[DemoRun]:
    tmp_path: Path = tmp_path_factory.mktemp("demo")
    done = []
    for attempt in (1, 2):
        ports = [f"--{k.replace('_', '-')}={v}" for k, v in free_mesh_ports().items()]
        log = tmp_path / f"demo{attempt}.out"
        proc = ManagedProcess(
            "meshctl-demo",
            [
                sys.executable,
                "-m",
                "meshctl",
                "demo",
                f"--run-dir={tmp_path / f'demo{attempt}'}",
                f"--database-url={postgres_url}",
                *ports,
            ],
            log_path=log,
        )
        await proc.start()
        code = await proc.wait(timeout=DEMO_TIMEOUT)
        done.append(DemoRun(code, log.read_text()))
    return done


async def test_the_demo_exits_zero_twice_in_a_row(runs: list[DemoRun]) -> None:
    assert [run.code for run in runs] == [0, 0], runs[-1].output
    assert all("All steps held." in run.output for run in runs)


async def test_the_second_run_updates_alice_as_her_owner(runs: list[DemoRun]) -> None:
    assert "alice updated by its owner (HTTP 200)" in runs[1].step("PUT alice")


async def test_a_stranger_cannot_take_alice_over(runs: list[DemoRun]) -> None:
    assert "HTTP 401" in runs[0].step("PUT alice without her password is refused")


async def test_strict_dns_behind_the_connection_balancer_sends_every_get_to_one_replica(
    runs: list[DemoRun],
) -> None:
    for run in runs:
        assert list(run.per_replica(STRICT_DNS).values()) == [12], run.step(STRICT_DNS)


async def test_the_edge_fed_by_sds_sends_four_gets_to_each_replica(runs: list[DemoRun]) -> None:
    for run in runs:
        assert sorted(run.per_replica(SDS_EDGE).values()) == [4, 4, 4], run.step(SDS_EDGE)


async def test_the_route_from_sds_is_served_and_removed_with_the_same_edge_envoy(
    runs: list[DemoRun],
) -> None:
    for run in runs:
        text = run.step(ROUTING)
        assert "HTTPRoute  default/usersvc-canary  default/edge  Accepted  ResolvedRefs" in text
        assert "✓ served and removed with the same edge Envoy" in text


async def test_proxyless_grpc_sends_four_calls_to_each_replica(runs: list[DemoRun]) -> None:
    for run in runs:
        replicas = run.per_replica(SDS_EDGE)
        assert run.per_replica(GRPC) == {address: 4 for address in replicas}, run.step(GRPC)


async def test_a_replica_killed_under_load_fails_no_request_and_comes_back(
    runs: list[DemoRun],
) -> None:
    for run in runs:
        text = run.step(FAULTS)
        failed = re.search(r"✓ ([0-9]+) of [1-9][0-9]* requests failed .*usersvc-1 is back", text)
        assert failed is not None, text
        assert int(failed.group(1)) == 0, text
        assert "usersvc-1 restarted by meshctl (1x)" in text
