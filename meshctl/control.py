"""The control endpoint of a running ``meshctl up`` (loopback only) and its client.

``up`` writes ``mesh.json`` into its run directory so ``meshctl status`` and ``meshctl scale``
find the control endpoint without being told the port.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from meshctl.mesh import Mesh

STATE_FILE = "mesh.json"


class ScaleRequest(BaseModel):
    """Body of ``POST /scale``."""

    service: str = Field("usersvc", pattern="^usersvc$")
    replicas: int = Field(ge=0, le=50)


def control_app(mesh: Mesh) -> FastAPI:
    """Status and scaling of ``mesh`` over HTTP."""
    app = FastAPI(title="meshctl control", openapi_url=None)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {
            "edge": mesh.edge_url,
            "sds": mesh.sds_url,
            "components": [asdict(row) for row in mesh.status()],
        }

    @app.post("/scale")
    async def scale(request: ScaleRequest) -> JSONResponse:
        await mesh.scale(request.replicas)
        return JSONResponse({"replicas": len(mesh.replicas)})

    return app


def write_state(run_dir: Path, mesh: Mesh, control_url: str) -> None:
    """Record where the running mesh can be reached."""
    state = {"control": control_url, "edge": mesh.edge_url, "sds": mesh.sds_url}
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_state(run_dir: Path) -> dict[str, str]:
    """What ``write_state`` recorded; a clear error when no mesh runs there."""
    path = run_dir / STATE_FILE
    try:
        data: dict[str, str] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise SystemExit(f"meshctl: no running mesh in {run_dir} (start one: meshctl up)") from None
    return data


async def call(run_dir: Path, method: str, path: str, **kwargs: Any) -> Any:
    """Call the control endpoint of the mesh running in ``run_dir``."""
    url = read_state(run_dir)["control"] + path
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.request(method, url, **kwargs)
    except httpx.HTTPError:
        raise SystemExit(f"meshctl: the mesh in {run_dir} does not answer at {url}") from None
    if response.status_code >= 400:
        raise SystemExit(f"meshctl: {response.status_code} {response.text}")
    return response.json()
