"""``meshctl``: run the envoymesh mesh on one machine, and inspect a running mesh."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path

import uvicorn

from envoymesh.envoyconf import TEMPLATES, TemplateError, render
from envoymesh.ports import port_is_free
from meshctl import control
from meshctl.demo import run_demo
from meshctl.mesh import REPLICA_PORT_FIELDS, Mesh, MeshSettings
from meshctl.proxy_status import fetch_proxies, format_proxies
from meshctl.routes import fetch_config, format_routes
from meshctl.table import render_table

# (flag, MeshSettings field, default); each also reads MESHCTL_<FIELD> from the environment.
PORT_FLAGS = (
    ("--edge-port", "edge_port", 8000),
    ("--edge-admin-port", "edge_admin_port", 8001),
    ("--control-port", "control_port", 8002),
    ("--sds-http-port", "sds_http_port", 8080),
    ("--sds-grpc-port", "sds_grpc_port", 18000),
    ("--usersvc-port", "usersvc_port", 5000),
    ("--usersvc-grpc-port", "usersvc_grpc_port", 5100),
    ("--sidecar-port", "sidecar_port", 10000),
    ("--admin-base", "admin_base", 9900),
)


def _env(field: str, default: str) -> str:
    return os.environ.get(f"MESHCTL_{field.upper()}", default)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _add_mesh_args(parser: argparse.ArgumentParser) -> None:
    for flag, field, default in PORT_FLAGS:
        parser.add_argument(
            flag,
            dest=field,
            type=int,
            default=int(_env(field, str(default))),
            help=f"[env MESHCTL_{field.upper()}, default {default}]",
        )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="use this PostgreSQL instead of starting one [env DATABASE_URL]",
    )
    parser.add_argument(
        "--edge",
        choices=("gateway", "ads", "rest"),
        default=_env("edge", "gateway"),
        help="the edge's configuration: gateway (everything from sds: listeners, routes, clusters"
        " and endpoints, from the Gateway in run/config), or the tutorial's static edge with EDS"
        " from sds over ads (push) or rest (polling) [env MESHCTL_EDGE, default gateway]",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=_env("heartbeat_interval", "5"),
        help="seconds between replica heartbeats; sds expires a replica after 3 missed ones"
        " [env MESHCTL_HEARTBEAT_INTERVAL, default 5]",
    )


def _run_dir(value: str | None) -> Path:
    return Path(value or _env("run_dir", "run")).resolve()


def _settings(args: argparse.Namespace, run_dir: Path) -> MeshSettings:
    values = {field: getattr(args, field) for _, field, _ in PORT_FLAGS}
    return MeshSettings(
        run_dir=run_dir,
        replicas=getattr(args, "replicas", 3),
        database_url=args.database_url,
        edge=args.edge,
        heartbeat_interval=args.heartbeat_interval,
        say=lambda line: print(line, flush=True),
        **values,
    )


def busy_ports(settings: MeshSettings) -> list[int]:
    """The mesh's fixed ports that some server already listens on."""
    busy = []
    for _, field, _ in PORT_FLAGS:
        if field in REPLICA_PORT_FIELDS:
            continue
        port = int(getattr(settings, field))
        if not port_is_free("127.0.0.1", port):
            busy.append(port)
    return busy


class _ControlServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Generator[None, None, None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _up(settings: MeshSettings) -> int:
    if busy := busy_ports(settings):
        print(f"meshctl: ports already in use: {busy} (another mesh running?)", file=sys.stderr)
        return 1
    mesh = Mesh(settings)
    stop = asyncio.Event()
    print(f"starting the mesh in {settings.run_dir} ...", flush=True)
    with _stop_on_signals(stop):
        starting = asyncio.create_task(mesh.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
        try:
            await starting
        except (OSError, RuntimeError, TimeoutError, asyncio.CancelledError) as exc:
            stopping.cancel()
            print(f"meshctl: the mesh did not start: {exc}", file=sys.stderr)
            print(f"logs: {settings.run_dir / 'logs'}", file=sys.stderr)
            await mesh.stop()
            return 1
        server = _ControlServer(
            uvicorn.Config(
                control.control_app(mesh),
                host="127.0.0.1",
                port=settings.control_port,
                log_level="warning",
                lifespan="off",
            )
        )
        serving = asyncio.create_task(server.serve())
        control.write_state(settings.run_dir, mesh, f"http://127.0.0.1:{settings.control_port}")
        _print_status(mesh)
        print(
            "\nTry:\n"
            f"  curl {mesh.edge_url}/user/health\n"
            f"  curl -X PUT -u alice:secret -H 'Content-Type: application/json'"
            f' -d \'{{"fullname": "Alice", "password": "secret"}}\' {mesh.edge_url}/user/alice\n'
            f"  for i in $(seq 12); do curl -s {mesh.edge_url}/user/alice; echo; done\n"
            f"  meshctl scale usersvc 5 --run-dir {settings.run_dir}\n"
            f"  meshctl status --run-dir {settings.run_dir}\n"
            f"  meshctl proxy-status --sds {mesh.sds_url}\n"
            f"Writes to sds need the token in {mesh.write_token_file}:\n"
            f'  curl -H "Authorization: Bearer $(cat {mesh.write_token_file})"'
            f" -d load_balancing_weight=50 {mesh.sds_url}/v1/loadbalancing/usersvc\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        try:
            await mesh.supervise(stop)
        finally:
            stopping.cancel()
            print("stopping the mesh ...", flush=True)
            server.should_exit = True
            await serving
            await mesh.stop()
            (settings.run_dir / control.STATE_FILE).unlink(missing_ok=True)
    return 0


def _print_status(mesh: Mesh) -> None:
    rows = [(r.component, r.address, r.pid or "-", r.state, r.restarts) for r in mesh.status()]
    print(render_table(("COMPONENT", "ADDRESS", "PID", "STATE", "RESTARTS"), rows), flush=True)


async def _status(run_dir: Path) -> int:
    data = await control.call(run_dir, "GET", "/status")
    rows = [
        (c["component"], c["address"], c["pid"] or "-", c["state"], c["restarts"])
        for c in data["components"]
    ]
    print(f"edge {data['edge']}   sds {data['sds']}")
    print(render_table(("COMPONENT", "ADDRESS", "PID", "STATE", "RESTARTS"), rows))
    return 0


async def _scale(run_dir: Path, service: str, replicas: int) -> int:
    if service != "usersvc":
        print(f"meshctl: only usersvc can be scaled, not {service!r}", file=sys.stderr)
        return 2
    started = time.monotonic()
    data = await control.call(run_dir, "POST", "/scale", json={"replicas": replicas})
    print(f"usersvc scaled to {data['replicas']} in {time.monotonic() - started:.1f}s")
    return 0


async def _proxy_status(sds: str, as_json: bool) -> int:
    proxies = await fetch_proxies(sds)
    print(json.dumps(proxies, indent=2) if as_json else format_proxies(proxies))
    return 0


async def _routes(sds: str, as_json: bool) -> int:
    config = await fetch_config(sds)
    print(json.dumps(config, indent=2) if as_json else format_routes(config))
    return 0


def _render(template: str, pairs: Sequence[str]) -> int:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"meshctl: expected KEY=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        values[key] = value
    try:
        print(render(template, values), end="")
    except TemplateError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``meshctl`` command line."""
    parser = argparse.ArgumentParser(prog="meshctl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole mesh until Ctrl-C")
    up.add_argument(
        "--replicas",
        type=int,
        default=int(_env("replicas", "3")),
        help="usersvc replicas [env MESHCTL_REPLICAS, default 3]",
    )
    up.add_argument("--run-dir", help="logs, data and state [env MESHCTL_RUN_DIR, default ./run]")
    _add_mesh_args(up)

    demo = commands.add_parser("demo", help="the tutorial walkthrough (what `make demo` runs)")
    demo.add_argument("--run-dir", help="logs and data [default ./run/demo-<time>]")
    _add_mesh_args(demo)

    scale = commands.add_parser("scale", help="change the replica count of a running mesh")
    scale.add_argument("service", help="usersvc")
    scale.add_argument("replicas", type=int)
    scale.add_argument("--run-dir", help="where `meshctl up` runs [default ./run]")

    status = commands.add_parser("status", help="the components of a running mesh")
    status.add_argument("--run-dir", help="where `meshctl up` runs [default ./run]")

    proxies = commands.add_parser("proxy-status", help="Envoys connected to sds, and their sync")
    proxies.add_argument(
        "--sds", default=_env("sds", "http://127.0.0.1:8080"), help="sds HTTP URL [env MESHCTL_SDS]"
    )
    proxies.add_argument("--json", action="store_true", help="print JSON instead of a table")

    routes = commands.add_parser(
        "routes", help="Gateway API routes sds serves, their status and backends"
    )
    routes.add_argument(
        "--sds", default=_env("sds", "http://127.0.0.1:8080"), help="sds HTTP URL [env MESHCTL_SDS]"
    )
    routes.add_argument("--json", action="store_true", help="print JSON instead of a table")

    render_cmd = commands.add_parser("render-envoy", help="print an Envoy config from envoy/")
    render_cmd.add_argument("template", choices=TEMPLATES)
    render_cmd.add_argument("values", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``meshctl`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "render-envoy":
        sys.exit(_render(args.template, args.values))
    if args.command == "up":
        code = asyncio.run(_up(_settings(args, _run_dir(args.run_dir))))
    elif args.command == "demo":
        run_dir = _run_dir(args.run_dir or f"run/demo-{time.strftime('%Y%m%d-%H%M%S')}")
        settings = _settings(args, run_dir)
        if busy := busy_ports(settings):
            print(f"meshctl: ports already in use: {busy} (is `meshctl up` running?)")
            sys.exit(1)
        code = asyncio.run(run_demo(settings))
    elif args.command == "scale":
        code = asyncio.run(_scale(_run_dir(args.run_dir), args.service, args.replicas))
    elif args.command == "status":
        code = asyncio.run(_status(_run_dir(args.run_dir)))
    elif args.command == "routes":
        code = asyncio.run(_routes(args.sds, args.json))
    else:
        code = asyncio.run(_proxy_status(args.sds, args.json))
    sys.exit(code)


if __name__ == "__main__":
    main()
