"""``meshctl demo``: the tutorial's walkthrough, for real, narrated step by step.

Health through the edge, PUT alice and bob, GET them back, a stranger's PUT of alice refused
(401), scale usersvc from 1 to 3 replicas, then 12 GETs through the edge that must cycle over
the 3 replicas, 4 times each. Each user is saved with its own credentials, so a second run
updates the users the first one created (200) instead of being refused.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from meshctl.mesh import Mesh, MeshSettings
from meshctl.table import render_table

# The demo's users' password: the demo proves it to update them on a second run.
DEMO_PASSWORD = "pw"  # noqa: S105 - a demo account, shown in the walkthrough


class StepFailed(Exception):
    """A demo step did not hold."""


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        data: dict[str, Any] = response.json()
    except ValueError:
        raise StepFailed(f"HTTP {response.status_code}, not JSON: {response.text[:200]}") from None
    return data


def _expect(response: httpx.Response, status: int) -> dict[str, Any]:
    body = _body(response)
    if response.status_code != status or body.get("ok") is not True:
        raise StepFailed(f"expected {status} ok, got {response.status_code}: {body}")
    return body


async def run_demo(settings: MeshSettings) -> int:
    """Run the walkthrough; 0 when every step held."""
    say = settings.say
    settings.replicas = 1
    mesh = Mesh(settings)
    results: list[tuple[str, str, str]] = []

    async def step(title: str, action: Callable[[], Awaitable[str]]) -> None:
        say(f"\n▶ {title}")
        try:
            detail = await action()
        except (StepFailed, httpx.HTTPError, OSError, RuntimeError, TimeoutError) as exc:
            results.append((title, "FAILED", str(exc) or type(exc).__name__))
            raise StepFailed(title) from exc
        say(f"  ✓ {detail}")
        results.append((title, "ok", detail))

    client = httpx.AsyncClient(base_url=mesh.edge_url, timeout=10)

    async def start() -> str:
        await mesh.start()
        return f"edge on {mesh.edge_url}, sds on {mesh.sds_url}, 1 usersvc replica"

    async def health() -> str:
        body = _expect(await client.get("/user/health"), 200)
        return f"{body['msg']} (answered by {body['hostname']} at {body['resolvedname']})"

    async def put(name: str, fullname: str) -> str:
        # Creating needs no credentials; they make the PUT an update if the user exists.
        response = await client.put(
            f"/user/{name}",
            json={"fullname": fullname, "password": DEMO_PASSWORD},
            auth=(name, DEMO_PASSWORD),
        )
        if response.status_code not in (200, 201):
            raise StepFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        body = _body(response)
        done = "created" if response.status_code == 201 else "updated by its owner"
        return f"{name} {done} (HTTP {response.status_code}), uuid {body['uuid']}"

    async def takeover() -> str:
        response = await client.put(
            "/user/alice", json={"fullname": "Mallory", "password": "stolen"}
        )
        body = _body(response)
        if response.status_code != 401 or body.get("ok") is not False:
            raise StepFailed(f"expected 401, got {response.status_code}: {body}")
        kept = _expect(await client.get("/user/alice"), 200)["fullname"]
        if kept != "Alice Liddell":
            raise StepFailed(f"alice's fullname changed to {kept!r}")
        return f"HTTP 401 ({body['error']}); alice is still {kept}"

    async def get_both() -> str:
        names = []
        for name in ("alice", "bob"):
            names.append(_expect(await client.get(f"/user/{name}"), 200)["fullname"])
        return " and ".join(names) + " read back through the edge"

    async def scale() -> str:
        await mesh.scale(3)
        return "the edge now balances over " + ", ".join(
            f"{r.at.name} ({r.at.address})" for r in mesh.replicas.values()
        )

    async def round_robin() -> str:
        seen: list[str] = []
        for i in range(1, 13):
            body = _expect(await client.get("/user/alice"), 200)
            seen.append(body["resolvedname"])
            say(f"  {i:2d}  resolvedname {body['resolvedname']:<12} ({body['hostname']})")
        counts = Counter(seen)
        if len(counts) != 3 or set(counts.values()) != {4}:
            raise StepFailed(f"not an even round-robin over 3 replicas: {dict(counts)}")
        return "each of the 3 replicas answered exactly 4 times"

    say(f"envoymesh demo: the tutorial on one machine (logs in {settings.run_dir / 'logs'})")
    try:
        await step("Start PostgreSQL, sds, the edge Envoy and one usersvc replica", start)
        await step("Health check through the edge", health)
        await step("PUT alice", lambda: put("alice", "Alice Liddell"))
        await step("PUT bob", lambda: put("bob", "Bob Builder"))
        await step("GET alice and bob", get_both)
        await step("PUT alice without her password is refused", takeover)
        await step("Scale usersvc from 1 to 3 replicas", scale)
        await step("12 GETs of /user/alice through the edge", round_robin)
    except StepFailed as failed:
        say(f"\n✗ step failed: {failed}")
        say(f"  logs: {settings.run_dir / 'logs'}")
    finally:
        await client.aclose()
        say("\nstopping the mesh ...")
        await asyncio.shield(mesh.stop())
    say("\n" + render_table(("STEP", "RESULT", "DETAIL"), results))
    ok = len(results) == 8 and all(r[1] == "ok" for r in results)
    say("\nAll steps held." if ok else "\nThe demo did not complete.")
    return 0 if ok else 1
