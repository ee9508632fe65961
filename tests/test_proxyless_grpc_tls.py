"""TLS for proxyless gRPC clients (gRFC A29): Clusters name the bootstrap's certificate provider.

sds runs with ``--proxyless-tls``; clients are real grpcio processes bootstrapped by
``sds bootstrap --grpc --ca-file ... [--cert-file ... --key-file ...] [--xds-tls]`` and
calling test backends (and usersvc's gRPC port) that serve TLS with trustme certificates and,
for mutual TLS, require a client certificate their CA signed.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format
from pydantic import ValidationError

from envoymesh.ports import free_port
from sds import bootstrap
from sds.config import Settings
from sds.model import Endpoint, Source
from sds.registry import Registry
from sds.server import upstream_tls
from sds.translate.clusters import CERTIFICATE_PROVIDER
from sds.translate.translator import Translator
from sds.xds.resources import CDS_TYPE_URL
from tests.conftest import GrpcCaller, RunningSds, put
from tests.xds_client import XdsClient
from usersvc.config import Settings as UsersvcSettings

WHO = "/envoymesh.test.Echo/Who"
BACKEND_NAME = "echo.default.svc"
slow = pytest.mark.slow


@dataclass(frozen=True)
class Pki:
    """One CA's PEM files: the CA, sds's certificate, a backend's, a client's."""

    ca: Path
    sds_cert: Path
    sds_key: Path
    backend_cert: Path
    backend_key: Path
    client_cert: Path
    client_key: Path

    def backend_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """A TLS backend's server credentials (checking client certificates with this CA)."""
        return grpc.ssl_server_credentials(
            [(self.backend_key.read_bytes(), self.backend_cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=require_client_cert,
        )

    def bootstrap(self, xds_server: str, *, client_cert: bool = True, xds_tls: bool = False) -> str:
        """What ``sds bootstrap --grpc`` prints for a client holding these files."""
        argv = ["--grpc", "--xds-server", xds_server, "--ca-file", str(self.ca)]
        if client_cert:
            argv += ["--cert-file", str(self.client_cert), "--key-file", str(self.client_key)]
        if xds_tls:
            argv.append("--xds-tls")
        return run_bootstrap(argv)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True)
    ca = trustme.CA(organization_name=f"envoymesh test {directory.name}")
    issued = {
        "sds": ca.issue_cert("sds.envoymesh.svc", "127.0.0.1"),
        "backend": ca.issue_cert(BACKEND_NAME),
        "client": ca.issue_cert("client.default.svc"),
    }
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    paths: dict[str, Path] = {}
    for name, cert in issued.items():
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_key"] = directory / f"{name}-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(paths[f"{name}_cert"]))
        cert.private_key_pem.write_to_path(str(paths[f"{name}_key"]))
    return Pki(ca=directory / "ca.pem", **paths)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "other-pki")


def run_bootstrap(argv: list[str]) -> str:
    """``sds bootstrap ARGV``'s output."""
    out = io.StringIO()
    with redirect_stdout(out):
        bootstrap.main(argv)
    return out.getvalue()


# ----- sds bootstrap --grpc ---------------------------------------------------------------------


PROVIDER_FILES = {
    "ca_certificate_file": "/pki/ca.pem",
    "certificate_file": "/pki/client.pem",
    "private_key_file": "/pki/client-key.pem",
    "refresh_interval": "600s",
}
CA_ONLY = {"ca_certificate_file": "/pki/ca.pem", "refresh_interval": "600s"}
CERT_FLAGS = ["--cert-file", "/pki/client.pem", "--key-file", "/pki/client-key.pem"]


@pytest.mark.parametrize(
    ("flags", "providers", "creds"),
    [
        ([], None, {"type": "insecure"}),
        (["--ca-file", "/pki/ca.pem"], CA_ONLY, {"type": "insecure"}),
        (["--ca-file", "/pki/ca.pem", *CERT_FLAGS], PROVIDER_FILES, {"type": "insecure"}),
        (
            ["--ca-file", "/pki/ca.pem", *CERT_FLAGS, "--xds-tls"],
            PROVIDER_FILES,
            {"type": "tls", "config": PROVIDER_FILES},
        ),
        (
            ["--ca-file", "/pki/ca.pem", "--xds-tls"],
            CA_ONLY,
            {"type": "tls", "config": CA_ONLY},
        ),
        (
            ["--ca-file", "/pki/ca.pem", "--refresh-interval", "30"],
            {**CA_ONLY, "refresh_interval": "30s"},
            {"type": "insecure"},
        ),
    ],
)
def test_sds_bootstrap_grpc_tls_flags_give_the_provider_and_channel_creds(
    flags: list[str], providers: dict[str, str] | None, creds: dict[str, Any]
) -> None:
    document = json.loads(run_bootstrap(["--grpc", "--xds-server", "127.0.0.1:18000", *flags]))
    (server,) = document["xds_servers"]
    assert server["channel_creds"] == [creds]
    if providers is None:
        assert "certificate_providers" not in document
    else:
        assert document["certificate_providers"] == {
            CERTIFICATE_PROVIDER: {"plugin_name": "file_watcher", "config": providers}
        }


def test_sds_bootstrap_writes_relative_paths_absolute_without_resolving_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "..data").mkdir()
    (tmp_path / "ca.pem").symlink_to(tmp_path / "..data" / "ca.pem")
    monkeypatch.chdir(tmp_path)
    document = json.loads(
        run_bootstrap(["--grpc", "--xds-server", "127.0.0.1:1", "--ca-file", "ca.pem"])
    )
    config = document["certificate_providers"][CERTIFICATE_PROVIDER]["config"]
    assert config["ca_certificate_file"] == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grpc", *CERT_FLAGS], "need --ca-file"),
        (["--grpc", "--ca-file", "ca.pem", "--cert-file", "c.pem"], "go together"),
        (["--grpc", "--xds-tls"], "--xds-tls needs --ca-file"),
        (["--grpc", "--ca-file", "ca.pem", "--refresh-interval", "0"], "at least 1 second"),
        (["--gateway", "default/edge", "--ca-file", "ca.pem"], "are for --grpc"),
    ],
)
def test_sds_bootstrap_refuses_tls_flags_that_do_not_fit(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run_bootstrap(["--xds-server", "127.0.0.1:18000", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# ----- the Clusters ------------------------------------------------------------------------------


def mesh_cluster_of(**settings: Any) -> cluster_pb2.Cluster:
    """The proxyless Cluster ``default/echo/*`` of an sds with ``settings``."""
    registry = Registry()
    registry.replace(Source.REGISTRATION, "echo", [Endpoint("10.0.0.1", 5000, Source.REGISTRATION)])
    translator = Translator(registry, proxyless_tls=upstream_tls(Settings(**settings)))
    resource = translator.mesh.resource(CDS_TYPE_URL, "default/echo/*")
    assert resource is not None
    found = cluster_pb2.Cluster()
    assert resource.packed.Unpack(found)
    return found


def tls_context(found: cluster_pb2.Cluster) -> dict[str, Any]:
    assert found.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    assert found.transport_socket.typed_config.Unpack(context)
    common: dict[str, Any] = json_format.MessageToDict(
        context.common_tls_context, preserving_proto_field_name=True
    )
    return common


PROVIDER = {"instance_name": CERTIFICATE_PROVIDER, "certificate_name": "default"}


def test_without_proxyless_tls_clusters_carry_no_transport_socket() -> None:
    assert not mesh_cluster_of().HasField("transport_socket")


def test_proxyless_tls_checks_the_backend_with_the_provider_ca_and_presents_nothing() -> None:
    assert tls_context(mesh_cluster_of(proxyless_tls="tls")) == {
        "validation_context": {"ca_certificate_provider_instance": PROVIDER}
    }


def test_proxyless_mtls_also_presents_the_provider_certificate() -> None:
    assert tls_context(mesh_cluster_of(proxyless_tls="mtls")) == {
        "validation_context": {"ca_certificate_provider_instance": PROVIDER},
        "tls_certificate_provider_instance": PROVIDER,
    }


def test_proxyless_tls_san_matches_exact_names_and_domains() -> None:
    found = mesh_cluster_of(proxyless_tls="mtls", proxyless_tls_san="echo.default.svc,*.prod.svc")
    assert tls_context(found)["validation_context"]["match_subject_alt_names"] == [
        {"exact": "echo.default.svc"},
        {"suffix": ".prod.svc"},
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"proxyless_tls_san": "echo.default.svc"}, "needs --proxyless-tls"),
        ({"proxyless_tls": "mtls", "proxyless_tls_san": "*"}, "is not a name"),
        ({"proxyless_tls": "mtls", "proxyless_tls_san": "a.*.svc"}, "is not a name"),
        ({"proxyless_tls": "mtls", "proxyless_tls_san": "*.b c"}, "is not a name"),
        ({"proxyless_tls": "on"}, "proxyless_tls"),
    ],
)
def test_settings_refuse_proxyless_tls_that_does_not_fit(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("*", r"\*")):
        Settings(**settings)


async def test_an_sds_with_proxyless_tls_sends_the_tls_cluster_over_ads(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(proxyless_tls="mtls", xds_debounce=0.0)
    put(sds, "echo", "127.0.0.1:9000")
    client = XdsClient(sds.grpc_target, node="grpc-tls")
    try:
        client.send(type_url=CDS_TYPE_URL, resource_names=["default/echo/*"])
        response = await client.receive()
    finally:
        await client.close()
    (packed,) = response.resources
    found = cluster_pb2.Cluster()
    assert packed.Unpack(found)
    assert tls_context(found)["tls_certificate_provider_instance"] == PROVIDER
    # Still nothing of Envoy's: the TLS socket is the one addition.
    assert not found.HasField("connect_timeout")
    assert not found.HasField("outlier_detection")


# ----- real gRPC clients ------------------------------------------------------------------------


async def proxy_synced(sds: RunningSds, node_id: str) -> None:
    """Wait until client ``node_id`` has ACKed its Clusters and endpoints from ``sds``."""
    async with (
        asyncio.timeout(20),
        httpx.AsyncClient(base_url=sds.url, verify=False) as http,  # noqa: S501 - only up-ness
    ):
        while True:
            proxies = (await http.get("/debug/proxies")).json()["proxies"]
            states = [p.get("type_states", {}) for p in proxies if p["node_id"] == node_id]
            if states and all(
                states[0].get(kind, {}).get("state") == "SYNCED" for kind in ("cds", "eds")
            ):
                return
            await asyncio.sleep(0.05)


async def tls_backends(
    grpc_backends: Callable[..., Any], pki: Pki, *names: str, require_client_cert: bool = True
) -> dict[str, int]:
    return {
        name: await grpc_backends(
            name, pki.backend_credentials(require_client_cert=require_client_cert)
        )
        for name in names
    }


@slow
async def test_a_client_with_the_ca_and_its_certificate_spreads_calls_over_mtls_backends(
    start_sds: Callable[..., Any],
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
    pki: Pki,
) -> None:
    # sds itself requires the client's certificate on its gRPC port, as backends do.
    sds: RunningSds = await start_sds(
        xds_debounce=0.0,
        tls_cert_file=str(pki.sds_cert),
        tls_key_file=str(pki.sds_key),
        tls_client_ca_file=str(pki.ca),
        proxyless_tls="mtls",
        proxyless_tls_san=BACKEND_NAME,
    )
    ports = await tls_backends(grpc_backends, pki, "r0", "r1", "r2")
    put(sds, "echo", *(f"127.0.0.1:{p}" for p in ports.values()))
    client: GrpcCaller = await grpc_clients(
        pki.bootstrap(sds.grpc_target, xds_tls=True), "echo", WHO, tls=True
    )
    await client.until(lambda calls: {c.get("who") for c in calls} == set(ports), deadline=30)
    counts = Counter(call.get("who") for call in await client.next_calls(300))
    assert set(counts) == set(ports)
    assert all(90 <= n <= 110 for n in counts.values()), counts


@slow
async def test_a_client_with_the_wrong_ca_fails_every_call(
    start_sds: Callable[..., Any],
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
    pki: Pki,
    other_pki: Pki,
) -> None:
    # sds's own port is plain, so the client gets its Clusters and only the backends fail it.
    sds: RunningSds = await start_sds(xds_debounce=0.0, proxyless_tls="mtls")
    ports = await tls_backends(grpc_backends, pki, "r0", "r1")
    put(sds, "echo", *(f"127.0.0.1:{p}" for p in ports.values()))
    bootstrap_json = other_pki.bootstrap(sds.grpc_target)
    client: GrpcCaller = await grpc_clients(bootstrap_json, "echo", WHO, tls=True)
    await proxy_synced(sds, json.loads(bootstrap_json)["node"]["id"])
    calls = await client.next_calls(20, deadline=60)
    assert {c["code"] for c in calls} == {"UNAVAILABLE"}, calls[-1]
    assert not [c for c in client.calls if c["code"] == "OK"]
    assert "CERTIFICATE_VERIFY_FAILED" in calls[-1]["error"]


@slow
async def test_an_mtls_backend_refuses_a_client_that_presents_no_certificate(
    start_sds: Callable[..., Any],
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
    pki: Pki,
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, proxyless_tls="tls")
    ports = await tls_backends(grpc_backends, pki, "r0")
    put(sds, "echo", *(f"127.0.0.1:{p}" for p in ports.values()))
    bootstrap_json = pki.bootstrap(sds.grpc_target, client_cert=False)
    client: GrpcCaller = await grpc_clients(bootstrap_json, "echo", WHO, tls=True)
    await proxy_synced(sds, json.loads(bootstrap_json)["node"]["id"])
    calls = await client.next_calls(20, deadline=60)
    assert {c["code"] for c in calls} == {"UNAVAILABLE"}, calls[-1]
    assert not [c for c in client.calls if c["code"] == "OK"]


@slow
async def test_tls_without_a_client_certificate_reaches_a_backend_that_asks_for_none(
    start_sds: Callable[..., Any],
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
    pki: Pki,
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, proxyless_tls="tls")
    ports = await tls_backends(grpc_backends, pki, "r0", "r1", require_client_cert=False)
    put(sds, "echo", *(f"127.0.0.1:{p}" for p in ports.values()))
    client: GrpcCaller = await grpc_clients(
        pki.bootstrap(sds.grpc_target, client_cert=False), "echo", WHO, tls=True
    )
    await client.until(lambda calls: {c.get("who") for c in calls} == set(ports), deadline=30)
    assert {c["code"] for c in await client.next_calls(50)} == {"OK"}


@slow
async def test_a_backend_certificate_without_the_expected_san_fails_every_call(
    start_sds: Callable[..., Any],
    grpc_backends: Callable[..., Any],
    grpc_clients: Callable[..., Any],
    pki: Pki,
) -> None:
    sds: RunningSds = await start_sds(
        xds_debounce=0.0, proxyless_tls="mtls", proxyless_tls_san="*.prod.svc"
    )
    ports = await tls_backends(grpc_backends, pki, "r0")
    put(sds, "echo", *(f"127.0.0.1:{p}" for p in ports.values()))
    bootstrap_json = pki.bootstrap(sds.grpc_target)
    client: GrpcCaller = await grpc_clients(bootstrap_json, "echo", WHO, tls=True)
    await proxy_synced(sds, json.loads(bootstrap_json)["node"]["id"])
    calls = await client.next_calls(20, deadline=60)
    assert {c["code"] for c in calls} == {"UNAVAILABLE"}, calls[-1]
    assert not [c for c in client.calls if c["code"] == "OK"]
    assert "SANs from certificate did not match" in calls[-1]["error"]


@slow
async def test_a_client_whose_bootstrap_lacks_the_provider_refuses_tls_clusters(
    start_sds: Callable[..., Any], grpc_clients: Callable[..., Any]
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, proxyless_tls="mtls")
    put(sds, "echo", "127.0.0.1:9000")
    bootstrap_json = run_bootstrap(["--grpc", "--xds-server", sds.grpc_target])
    node_id = json.loads(bootstrap_json)["node"]["id"]
    client: GrpcCaller = await grpc_clients(bootstrap_json, "echo", WHO, tls=True)
    async with asyncio.timeout(20), httpx.AsyncClient(base_url=sds.url) as http:
        while True:
            proxies = (await http.get("/debug/proxies")).json()["proxies"]
            states = [p.get("type_states", {}) for p in proxies if p["node_id"] == node_id]
            cds = states[0].get("cds", {}) if states else {}
            if cds.get("state") == "NACKED":
                break
            await asyncio.sleep(0.05)
    assert "unrecognized certificate provider instance name" in cds["error"]
    assert not [c for c in (await client.next_calls(5)) if c["code"] == "OK"]


# ----- usersvc's gRPC port over TLS -------------------------------------------------------------

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


async def tls_usersvc(start_usersvc: Callable[..., Any], pki: Pki) -> int:
    """A usersvc whose gRPC port serves ``pki``'s backend certificate and requires a client
    certificate ``pki``'s CA signed; its gRPC port."""
    port = free_port()
    await start_usersvc(
        grpc_host="127.0.0.1",
        grpc_port=port,
        grpc_tls_cert_file=str(pki.backend_cert),
        grpc_tls_key_file=str(pki.backend_key),
        grpc_tls_client_ca_file=str(pki.ca),
    )
    return port


async def health_code(port: int, pki: Pki, *, client_cert: bool = True) -> grpc.StatusCode:
    """The status of one health check over a direct TLS channel trusting ``pki``'s CA."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if client_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", BACKEND_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        try:
            check: Any = channel.unary_unary(HEALTH_CHECK)
            await check(b"", timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@slow
async def test_usersvc_grpc_port_serves_mutual_tls_to_a_proxyless_client(
    start_usersvc: Callable[..., Any],
    start_sds: Callable[..., Any],
    grpc_clients: Callable[..., Any],
    pki: Pki,
) -> None:
    port = await tls_usersvc(start_usersvc, pki)
    sds: RunningSds = await start_sds(
        xds_debounce=0.0, proxyless_tls="mtls", proxyless_tls_san=BACKEND_NAME
    )
    put(sds, "usersvc-grpc", f"127.0.0.1:{port}")
    client: GrpcCaller = await grpc_clients(
        pki.bootstrap(sds.grpc_target), "usersvc-grpc", HEALTH_CHECK, tls=True
    )
    await client.until(lambda calls: all(c["code"] == "OK" for c in calls), deadline=30)
    assert {c["code"] for c in await client.next_calls(20)} == {"OK"}


@slow
async def test_usersvc_grpc_port_refuses_a_client_without_a_certificate(
    start_usersvc: Callable[..., Any], pki: Pki
) -> None:
    port = await tls_usersvc(start_usersvc, pki)
    assert await health_code(port, pki) == grpc.StatusCode.OK
    assert await health_code(port, pki, client_cert=False) == grpc.StatusCode.UNAVAILABLE


@slow
async def test_usersvc_grpc_port_uses_new_certificate_files_without_a_restart(
    start_usersvc: Callable[..., Any], pki: Pki, other_pki: Pki
) -> None:
    port = await tls_usersvc(start_usersvc, pki)
    assert await health_code(port, other_pki) == grpc.StatusCode.UNAVAILABLE
    # Replaced as a Secret volume does: new files moved over the old names.
    for source, target in [
        (other_pki.backend_cert, pki.backend_cert),
        (other_pki.backend_key, pki.backend_key),
        (other_pki.ca, pki.ca),
    ]:
        staged = target.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        staged.replace(target)
    assert await health_code(port, other_pki) == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grpc_tls_cert_file": "c.pem"}, "go together"),
        ({"grpc_tls_client_ca_file": "ca.pem"}, "needs --grpc-tls-cert-file"),
    ],
)
def test_usersvc_refuses_grpc_tls_files_that_do_not_fit(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        UsersvcSettings(**settings)
