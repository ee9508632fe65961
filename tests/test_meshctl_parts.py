"""meshctl's smaller parts: replica addresses, config rendering, the proxy-status table."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from envoymesh.envoyconf import TemplateError, placeholders, render
from envoymesh.ports import free_port, port_is_free
from meshctl.__main__ import build_parser, busy_ports
from meshctl.addresses import replica_address
from meshctl.mesh import PORT_FIELDS, REPLICA_PORT_FIELDS, MeshSettings, free_mesh_ports
from meshctl.proxy_status import format_proxies
from meshctl.routes import format_routes


def test_replicas_get_their_own_loopback_address_when_the_os_has_them() -> None:
    at = replica_address(2, aliases=True, usersvc_port=5000, sidecar_port=10000, admin_base=9900)
    assert (at.name, at.address, at.usersvc_port, at.sidecar_port, at.admin_port) == (
        "usersvc-2",
        "127.0.0.3",
        5000,
        10000,
        9902,
    )


def test_replicas_fall_back_to_distinct_ports_on_127_0_0_1() -> None:
    ports = {
        (at.address, at.usersvc_port, at.sidecar_port)
        for at in (
            replica_address(
                i, aliases=False, usersvc_port=5000, sidecar_port=10000, admin_base=9900
            )
            for i in range(1, 4)
        )
    }
    assert ports == {
        ("127.0.0.1", 5001, 10001),
        ("127.0.0.1", 5002, 10002),
        ("127.0.0.1", 5003, 10003),
    }


def test_rendering_without_every_value_names_the_missing_ones() -> None:
    with pytest.raises(TemplateError, match="APP_PORT"):
        render("sidecar", {name: "x" for name in placeholders("sidecar") - {"APP_PORT"}})


def test_unknown_template_is_refused() -> None:
    with pytest.raises(TemplateError, match="unknown Envoy template"):
        render("edge-v1", {})


def test_render_envoy_command_prints_the_config() -> None:
    values = {name: "1" for name in placeholders("sidecar")}
    result = subprocess.run(
        [sys.executable, "-m", "meshctl", "render-envoy", "sidecar"]
        + [f"{k}={v}" for k, v in values.items()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "local_usersvc" in result.stdout
    assert "${" not in result.stdout


def test_render_envoy_command_reports_missing_values() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshctl", "render-envoy", "sidecar", "NODE_ID=x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no value for" in result.stderr


def test_proxy_status_table_shows_each_state() -> None:
    base = {
        "cluster": "edge",
        "transport": "sotw",
        "subscribed": ["usersvc"],
        "last_version_sent": "abc",
        "last_nack": "",
        "connected_since": 0.0,
    }
    table = format_proxies(
        [
            {**base, "node_id": "a", "state": "SYNCED", "last_version_acked": "abc"},
            {**base, "node_id": "b", "state": "STALE", "last_version_acked": "old"},
            {
                **base,
                "node_id": "c",
                "state": "NACKED",
                "last_version_acked": "old",
                "last_nack": "bad endpoint",
            },
        ]
    )
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["NAME", "CLUSTER", "TRANSPORT", "RESOURCES", "STATE"]
    assert [line.split()[4] for line in lines[1:]] == ["SYNCED", "STALE", "NACKED"]
    assert "bad endpoint" in lines[3]


def test_proxy_status_shows_each_types_state() -> None:
    proxy = {
        "node_id": "edge-1",
        "cluster": "default/edge",
        "transport": "sotw",
        "subscribed": ["default/edge/8080"],
        "state": "STALE",
        "last_nack": "",
        "connected_since": 0.0,
        "type_states": {
            "cds": {"state": "SYNCED"},
            "lds": {"state": "SYNCED"},
            "eds": {"state": "STALE"},
            "rds": {"state": "NACKED"},
        },
    }
    header, row = format_proxies([proxy]).splitlines()
    assert header.split()[5:9] == ["CDS", "LDS", "EDS", "RDS"]
    assert row.split()[5:9] == ["SYNCED", "SYNCED", "STALE", "NACKED"]


def test_routes_table_marks_failing_conditions_and_lists_refused_files() -> None:
    config = {
        "problems": [{"file": "bad.yaml", "path": "HTTPRoute 'x': spec.rules", "message": "no"}],
        "routes": [
            {
                "kind": "HTTPRoute",
                "namespace": "default",
                "name": "users",
                "parents": [
                    {
                        "parentRef": {"namespace": "default", "name": "edge"},
                        "conditions": [
                            {"type": "Accepted", "status": "True", "reason": "Accepted"},
                            {
                                "type": "ResolvedRefs",
                                "status": "False",
                                "reason": "BackendNotFound",
                            },
                        ],
                    }
                ],
                "rules": [
                    {
                        "backends": [
                            {"cluster": "default/usersvc/5000", "weight": 9},
                            {"cluster": None, "weight": 1},
                        ]
                    }
                ],
            }
        ],
    }
    lines = format_routes(config).splitlines()
    assert lines[0] == "refused: bad.yaml: HTTPRoute 'x': spec.rules: no"
    assert lines[2].split() == [
        "HTTPRoute",
        "default/users",
        "default/edge",
        "Accepted",
        "!BackendNotFound",
        "default/usersvc/5000*9+INVALID*1",
    ]


def test_proxy_status_with_no_proxies_says_so() -> None:
    assert format_proxies([]) == "no proxies connected"


def _leave_time_wait_on(port: int) -> None:
    """Serve one connection on ``port`` and close it from the server side, as a server
    that just stopped does: the server's end of it lingers in TIME_WAIT."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()
            client.recv(1)


def _time_wait_ports() -> set[int]:
    """Local ports of IPv4 TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {int(f[1].split(":")[1], 16) for f in (line.split() for line in lines) if f[3] == "06"}


def test_a_port_in_time_wait_counts_as_free() -> None:
    port = free_port()
    _leave_time_wait_on(port)
    assert port in _time_wait_ports()
    assert port_is_free("127.0.0.1", port)


def test_a_port_with_a_listener_counts_as_busy() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert not port_is_free("127.0.0.1", server.getsockname()[1])


def test_meshctl_refuses_only_ports_that_something_listens_on(tmp_path: Path) -> None:
    lingering, listening = free_port(), free_port()
    _leave_time_wait_on(lingering)
    with socket.socket() as server:
        server.bind(("127.0.0.1", listening))
        server.listen()
        settings = MeshSettings(
            run_dir=tmp_path,
            edge_port=lingering,
            sds_http_port=listening,
            edge_admin_port=free_port(),
            control_port=free_port(),
            sds_grpc_port=free_port(),
        )
        assert busy_ports(settings) == [listening]


def test_ports_for_a_test_mesh_never_overlap() -> None:
    for _ in range(50):
        ports = free_mesh_ports(max_replicas=20)
        used = [p for name in REPLICA_PORT_FIELDS for p in range(ports[name], ports[name] + 21)]
        used += [ports[name] for name in PORT_FIELDS]
        assert len(used) == len(set(used))


def test_meshctl_up_defaults_to_the_same_edge_as_the_mesh_settings() -> None:
    assert build_parser().parse_args(["up"]).edge == MeshSettings(run_dir=Path("run")).edge
    assert MeshSettings(run_dir=Path("run")).edge == "gateway"


@pytest.mark.parametrize("edge", ["gateway", "ads", "rest"])
def test_meshctl_up_accepts_every_edge(edge: str) -> None:
    assert build_parser().parse_args(["up", "--edge", edge]).edge == edge
