"""``meshctl demo``: the tutorial's story, for real, narrated step by step.

First the basics through the edge: health, PUT alice and bob, GET them back, a stranger's PUT
of alice refused (401), usersvc scaled from 1 to 3 replicas. Then the story, each step saying
what it shows and checking it:

1. the problem: an edge with ``strict_dns`` to one address, a stand-in for kube-proxy in front
   of the 3 replicas (:mod:`meshctl.kube_proxy`): its one HTTP/2 connection, so one replica;
2. the fix: the edge fed by sds: 12 GETs, 4 per replica;
3. routing from sds: an HTTPRoute written into sds's config directory is served, then removed,
   with the same edge Envoy process throughout;
4. proxyless gRPC: 12 GetUser calls through ``xds:///usersvc-grpc``, 4 per replica, no Envoy;
5. faults heal: a replica killed under GET load costs no GET (the edge retries each one it never
   answered on another replica), and comes back;
6. where to look: the live view, ``meshctl proxy-status`` and ``meshctl routes``, ``meshctl up``.

Each user is saved with its own credentials, so a second run updates the users the first one
created (200) instead of being refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import yaml

from envoymesh.envoyconf import render
from envoymesh.ports import free_port
from meshctl.envoy import EnvoyProxy
from meshctl.faults import SteadyLoad, faults, run_fault, supervised
from meshctl.kube_proxy import KubeProxy
from meshctl.mesh import Mesh, MeshSettings
from meshctl.routes import fetch_config, format_routes
from meshctl.table import render_table

# The demo's users' password: the demo proves it to update them on a second run.
DEMO_PASSWORD = "pw"  # noqa: S105 - a demo account, shown in the walkthrough
GETS = 12
# The route step's file in sds's config directory, and what its rule adds to the answer.
CANARY_FILE = "demo-canary-route.yaml"
CANARY_HEADER = "x-envoymesh-route"
# How long sds may take to serve a config file's change at the edge.
ROUTE_TIMEOUT = 30.0
PROBE_TIMEOUT = 90.0


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


def _counts(seen: list[str]) -> str:
    """``127.0.0.2 x4, 127.0.0.3 x4`` in address order: what the test reads back."""
    return ", ".join(f"{name} x{n}" for name, n in sorted(Counter(seen).items()))


def _even(seen: list[str], replicas: int) -> bool:
    counts = Counter(seen)
    return len(counts) == replicas and set(counts.values()) == {len(seen) // replicas}


def canary_route(sidecar_port: int) -> dict[str, Any]:
    """An HTTPRoute for ``/user`` requests with ``x-canary: 1``: its answers are marked."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "usersvc-canary", "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "rules": [
                {
                    "matches": [
                        {
                            "path": {"type": "PathPrefix", "value": "/user"},
                            "headers": [{"name": "x-canary", "value": "1"}],
                        }
                    ],
                    "filters": [
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {
                                "add": [{"name": CANARY_HEADER, "value": "canary"}]
                            },
                        }
                    ],
                    "backendRefs": [{"name": "usersvc", "port": sidecar_port}],
                }
            ],
        },
    }


async def _run(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A command's standard output; StepFailed unless it exits 0 within PROBE_TIMEOUT."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        raise StepFailed(f"{argv[2]} did not finish in {PROBE_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise StepFailed(f"{argv[2]} exited {proc.returncode}: {(out + err).decode()[-400:]}")
    return out.decode()


async def run_demo(settings: MeshSettings) -> int:
    """Run the walkthrough; 0 when every step held."""
    say = settings.say
    settings.replicas = 1
    # The story's edge is the one that gets everything from sds: step 3 writes its routes.
    settings.edge = "gateway"
    mesh = Mesh(settings)
    results: list[tuple[str, str, str]] = []
    logs = settings.run_dir / "logs"

    async def step(title: str, action: Callable[[], Awaitable[str]], shows: str = "") -> None:
        say(f"\n▶ {title}")
        if shows:
            say(f"  {shows}")
        try:
            detail = await action()
        except (StepFailed, httpx.HTTPError, OSError, RuntimeError, TimeoutError) as exc:
            results.append((title, "FAILED", str(exc) or type(exc).__name__))
            raise StepFailed(title) from exc
        say(f"  ✓ {detail}")
        results.append((title, "ok", detail))

    client = httpx.AsyncClient(base_url=mesh.edge_url, timeout=10)

    async def gets(through: httpx.AsyncClient) -> list[str]:
        seen: list[str] = []
        for i in range(1, GETS + 1):
            body = _expect(await through.get("/user/alice"), 200)
            seen.append(body["resolvedname"])
            say(f"  {i:2d}  resolvedname {body['resolvedname']:<12} ({body['hostname']})")
        return seen

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

    async def the_problem() -> str:
        backends = [(r.at.address, r.at.sidecar_port) for r in mesh.replicas.values()]
        admin_port = free_port()
        async with KubeProxy(backends) as service:
            say(
                f"  the 'Service' 127.0.0.1:{service.port} picks one of "
                f"{len(backends)} replicas per TCP connection"
            )
            config = render(
                "edge-strict-dns",
                {
                    "NODE_ID": "edge-strict-dns",
                    "LISTEN_ADDRESS": "127.0.0.1",
                    "LISTEN_PORT": free_port(),
                    "ADMIN_PORT": admin_port,
                    "UPSTREAM_HOST": service.host,
                    "UPSTREAM_PORT": service.port,
                },
            )
            listen_port = yaml.safe_load(config)["static_resources"]["listeners"][0]["address"]
            url = f"http://127.0.0.1:{listen_port['socket_address']['port_value']}"
            # One worker, like the mesh's edge: one connection pool, one upstream connection.
            edge = EnvoyProxy(
                "edge-strict-dns", config, admin_port=admin_port, run_dir=logs, concurrency=1
            )
            await edge.start()
            try:
                say(f"  a second edge Envoy on {url}: strict_dns to 127.0.0.1:{service.port}")
                async with httpx.AsyncClient(base_url=url, timeout=10) as strict:
                    seen = await gets(strict)
            finally:
                await edge.stop()
            connections = len(service.picks)
        say(f"  per replica: {_counts(seen)}")
        if len(set(seen)) != 1:
            raise StepFailed(f"expected one replica behind the connection balancer: {seen}")
        return (
            f"all {GETS} GETs on {seen[0]}: Envoy sees one host and keeps one HTTP/2 connection "
            f"({connections} TCP connection(s) to the balancer), which was sent to one replica"
        )

    async def the_fix() -> str:
        seen = await gets(client)
        say(f"  per replica: {_counts(seen)}")
        if not _even(seen, 3):
            raise StepFailed(f"not an even round-robin over 3 replicas: {_counts(seen)}")
        return "each of the 3 replicas answered exactly 4 times"

    async def marked(canary: bool) -> str | None:
        headers = {"x-canary": "1"} if canary else {}
        response = await client.get("/user/alice", headers=headers)
        _expect(response, 200)
        mark: str | None = response.headers.get(CANARY_HEADER)
        return mark

    async def wait_marked(want: str | None) -> None:
        async with asyncio.timeout(ROUTE_TIMEOUT):
            while True:
                if await marked(True) == want:
                    return
                await asyncio.sleep(0.1)

    async def print_routes() -> None:
        try:
            config = await fetch_config(mesh.sds_url)
        except SystemExit as exc:  # fetch_config's way to end a command
            raise StepFailed(str(exc)) from None
        for line in format_routes(config).splitlines():
            say(f"    {line}")

    async def routing() -> str:
        edge_before = (mesh.edge.proxy.process.pid if mesh.edge.proxy else None, mesh.edge.restarts)
        if mesh.edge_kind != "gateway":
            raise StepFailed("the Gateway edge needs an address per replica (Linux loopback)")
        path = mesh.config_dir / CANARY_FILE
        if await marked(True) is not None:
            raise StepFailed(f"{CANARY_HEADER} is set before the route exists")
        path.write_text(yaml.safe_dump(canary_route(settings.sidecar_port), sort_keys=False))
        try:
            say(f"  wrote {path}: /user with x-canary: 1 answers {CANARY_HEADER}: canary")
            await wait_marked("canary")
            if await marked(False) is not None:
                raise StepFailed(f"a request without x-canary got {CANARY_HEADER}")
            say("  `meshctl routes` now shows:")
            await print_routes()
            say(f"  GET /user/alice with x-canary: 1 -> {CANARY_HEADER}: canary; without: none")
        finally:
            path.unlink(missing_ok=True)
        await wait_marked(None)
        say(f"  removed {path.name}: with x-canary: 1 -> no {CANARY_HEADER}, as before")
        edge_after = (mesh.edge.proxy.process.pid if mesh.edge.proxy else None, mesh.edge.restarts)
        if edge_after != edge_before:
            raise StepFailed(f"the edge Envoy restarted: {edge_before} -> {edge_after}")
        return f"served and removed with the same edge Envoy (pid {edge_after[0]})"

    async def proxyless() -> str:
        bootstrap_path = settings.run_dir / "grpc-bootstrap.json"
        if not bootstrap_path.exists():
            grpc_address = f"127.0.0.1:{settings.sds_grpc_port}"
            argv = [sys.executable, "-m", "sds", "bootstrap", "--grpc"]
            text = await _run([*argv, "--xds-server", grpc_address, "--node-id", "demo-grpc"])
            bootstrap_path.write_text(text)
        probe_args = [f"--calls={GETS}", "--replicas=3"]
        say(f"  GRPC_XDS_BOOTSTRAP={bootstrap_path} (from `sds bootstrap --grpc`)")
        out = await _run(
            [sys.executable, "-m", "meshctl.grpc_probe", "usersvc-grpc", "alice", *probe_args],
            env={"GRPC_XDS_BOOTSTRAP": str(bootstrap_path)},
        )
        seen: list[str] = json.loads(out.splitlines()[-1])["answered"]
        for i, name in enumerate(seen, 1):
            say(f"  {i:2d}  GetUser answered by {name}")
        say(f"  per replica: {_counts(seen)}")
        if not _even(seen, 3):
            raise StepFailed(f"not an even round-robin over 3 replicas: {_counts(seen)}")
        return (
            f"{GETS} GetUser calls through xds:///usersvc-grpc, 4 per replica; "
            "the client got its endpoints from sds and called the replicas directly"
        )

    async def faults_heal() -> str:
        victim = mesh.replicas[min(mesh.replicas)]
        restarts = victim.usersvc.restarts
        # The fault suite's own: it kills the first replica, as here.
        fault = next(f for f in faults() if f.name == "SIGKILL one usersvc replica")
        # Readers only: a GET a dying replica never answered is retried on another one.
        load = SteadyLoad(mesh.edge_url, readers=4, writers=0)
        async with supervised(mesh):
            await load.start()
            try:
                outcome = await run_fault(mesh, load, fault)
            finally:
                await load.stop()
        say(
            f"  {outcome.sent} GETs while {victim.at.name} was killed and came back: "
            f"{outcome.failed} failed"
        )
        say(
            f"  {victim.at.name} restarted by meshctl ({victim.usersvc.restarts - restarts}x), "
            f"whole again in {outcome.heal_seconds} s"
        )
        after = Counter(outcome.replicas_after)
        say(f"  answers in the 3 s after: {_counts(list(after.elements()))}")
        if outcome.failed:
            raise StepFailed(f"{outcome.failed} requests failed: {outcome.failures}")
        if victim.usersvc.restarts != restarts + 1:
            raise StepFailed(f"{victim.at.name} was not restarted")
        if set(outcome.replicas_after) != {r.at.address for r in mesh.replicas.values()}:
            raise StepFailed(f"not every replica serves again: {outcome.replicas_after}")
        return (
            f"{outcome.failed} of {outcome.sent} requests failed "
            "(the edge retried on another replica each GET the killed one never answered); "
            f"{victim.at.name} is back and serving"
        )

    async def where() -> str:
        async with httpx.AsyncClient(timeout=5) as sds:
            (await sds.get(f"{mesh.sds_url}/ui")).raise_for_status()
        say(f"  the live view:   {mesh.sds_url}/ui")
        say(f"  xDS per proxy:   meshctl proxy-status --sds {mesh.sds_url}")
        say(f"  route status:    meshctl routes --sds {mesh.sds_url}")
        say("  this demo stops its mesh; to keep one running: meshctl up")
        return "the live view answers; `meshctl up` keeps the mesh running on the default ports"

    steps: list[tuple[str, Callable[[], Awaitable[str]], str]] = [
        ("Start PostgreSQL, sds, the edge Envoy and one usersvc replica", start, ""),
        ("Health check through the edge", health, ""),
        ("PUT alice", lambda: put("alice", "Alice Liddell"), ""),
        ("PUT bob", lambda: put("bob", "Bob Builder"), ""),
        ("GET alice and bob", get_both, ""),
        ("PUT alice without her password is refused", takeover, ""),
        ("Scale usersvc from 1 to 3 replicas", scale, ""),
        (
            "1. The problem: strict_dns to one Service address",
            the_problem,
            "shows: behind a connection-level balancer (kube-proxy), Envoy reaches one replica",
        ),
        (
            "2. The fix: the edge fed by sds",
            the_fix,
            "shows: with every replica from sds, Envoy balances each request",
        ),
        (
            "3. Routing from sds: an HTTPRoute in the config directory",
            routing,
            "shows: a new route served, then removed, with no Envoy restart",
        ),
        (
            "4. Proxyless gRPC: xds:///usersvc-grpc",
            proxyless,
            "shows: a gRPC client balancing over the replicas from sds, no Envoy in the path",
        ),
        (
            "5. Faults heal: one replica killed under load",
            faults_heal,
            "shows: the edge retries around a dead replica, and meshctl brings it back",
        ),
        ("6. Where to look", where, "shows: the live view and the commands to look further"),
    ]
    say(f"envoymesh demo: the tutorial on one machine (logs in {logs})")
    try:
        for title, action, shows in steps:
            await step(title, action, shows)
    except StepFailed as failed:
        say(f"\n✗ step failed: {failed}")
        say(f"  logs: {logs}")
    finally:
        await client.aclose()
        say("\nstopping the mesh ...")
        await asyncio.shield(mesh.stop())
    say("\n" + render_table(("STEP", "RESULT", "DETAIL"), results))
    ok = len(results) == len(steps) and all(r[1] == "ok" for r in results)
    say("\nAll steps held." if ok else "\nThe demo did not complete.")
    return 0 if ok else 1
