"""The cost of the two Envoy hops: GET /user/alice through the edge (3 replicas behind their
sidecars) beside the same load sent straight to one usersvc.

Run: ``.venv/bin/python bench/edge.py`` (starts its own mesh on free ports).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, row, run_load
from meshctl.mesh import Mesh, MeshSettings, free_mesh_ports


async def main(duration: float, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        mesh = Mesh(
            MeshSettings(run_dir=Path(tmp), replicas=3, say=lambda _: None, **free_mesh_ports(10))
        )
        await mesh.start()
        try:
            async with httpx.AsyncClient(base_url=mesh.edge_url) as client:
                await client.put("/user/alice", json={"fullname": "Alice", "password": "pw"})
            one = mesh.replicas[min(mesh.replicas)].at
            print("edge benchmark")
            print(f"machine: {machine()}")
            print(
                f"setup: meshctl's local mesh (edge Envoy, 1 worker; 3 usersvc replicas, each 1 "
                f"uvicorn worker behind a sidecar Envoy; PostgreSQL); load from a separate "
                f"process, {concurrency} keep-alive connections, {duration:.0f} s per run; "
                "everything shares the 2 cores"
            )
            direct = await run_load(
                f"http://{one.address}:{one.usersvc_port}/user/alice",
                concurrency=concurrency,
                duration=duration,
            )
            print(row("GET /user/alice straight to one usersvc", direct))
            edge = await run_load(
                f"{mesh.edge_url}/user/alice", concurrency=concurrency, duration=duration
            )
            print(row("GET /user/alice via edge -> sidecar (x3)", edge))
            print(
                f"edge/direct: {edge['rps'] / direct['rps']:.0%} of the requests/s, "
                f"p50 +{edge['p50_ms'] - direct['p50_ms']:.2f} ms"
            )
        finally:
            await mesh.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.concurrency))
