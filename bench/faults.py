"""Fault injection under steady load: what each fault costs the local mesh, and how fast it heals.

The mesh is meshctl's (its own PostgreSQL, sds, 3 usersvc replicas behind sidecars, the edge
Envoy), supervised as ``meshctl up`` supervises it. Through the edge, 4 clients GET and 1 client
PUTs new users nonstop; a write counts once the edge acknowledged it with 201. Each fault runs
alone; the table shows the requests sent from 2 s before it until 3 s after the mesh was whole
again, how many failed (and how), the time from the fault to a whole mesh, and the fewest
replicas the edge routed to meanwhile. Last, every
acknowledged user is read back through the edge and its fullname compared.

Run: ``.venv/bin/python bench/faults.py`` (about 3 minutes; starts everything on free ports).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from meshctl.faults import SteadyLoad, faults, run_fault, supervised, verify_writes
from meshctl.mesh import Mesh, MeshSettings, free_mesh_ports


def _failures(failures: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(failures.items())) or "-"


async def main(only: list[str]) -> int:
    chosen = [f for f in faults() if not only or any(o.lower() in f.name.lower() for o in only)]
    print("fault-injection benchmark")
    print(f"machine: {machine()}")
    print(
        "setup: meshctl's local mesh (PostgreSQL, sds, 3 x usersvc + sidecar Envoy, edge Envoy "
        "with 1 worker), supervised; load through the edge: 4 clients GET, 1 client PUTs new "
        "users; everything shares the 2 cores"
    )
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        mesh = Mesh(
            MeshSettings(run_dir=Path(tmp), replicas=3, say=lambda _: None, **free_mesh_ports(5))
        )
        started = time.monotonic()
        await mesh.start()
        load = SteadyLoad(mesh.edge_url)
        try:
            async with supervised(mesh):
                await load.start()
                header = (
                    f"{'fault':<38} {'sent':>6} {'failed':>6}  {'heal':>6}  {'edge min':>8}  "
                    "how they failed"
                )
                print(header)
                print("-" * len(header))
                for fault in chosen:
                    outcome = await run_fault(mesh, load, fault)
                    late = (
                        f" ({outcome.late_failures} after healing)" if outcome.late_failures else ""
                    )
                    print(
                        f"{outcome.fault:<38} {outcome.sent:>6} {outcome.failed:>6}  "
                        f"{outcome.heal_seconds:>5.1f}s  {outcome.fewest_edge_hosts:>8}  "
                        f"{_failures(outcome.failures)}{late}",
                        flush=True,
                    )
                await load.stop()
                acknowledged = dict(load.acknowledged)
                found = await verify_writes(mesh.edge_url, acknowledged)
        finally:
            await load.stop()
            await mesh.stop()
    print(
        f"writes: {len(acknowledged)} acknowledged, {found} read back with the fullname written "
        f"({len(acknowledged) - found} lost); whole run {time.monotonic() - started:.0f} s"
    )
    return 0 if found == len(acknowledged) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "only", nargs="*", help="run only the faults whose names contain one of these words"
    )
    sys.exit(asyncio.run(main(parser.parse_args().only)))
