"""TLS on both sds ports, mutual TLS for gRPC with real Envoy, certificates reloaded from disk."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
import yaml
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc

from envoymesh.envoyconf import render
from envoymesh.ports import free_port
from meshctl.envoy import EnvoyProxy
from meshctl.postgres import LocalPostgres
from sds.model import Endpoint, Source
from tests.conftest import SDS_AUTH, RunningSds, SdsProcess

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SERVER_NAME = "sds.envoymesh.svc"


@dataclass
class Pki:
    """Files of one CA: its certificate, a server certificate for sds, a client certificate."""

    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_credentials(self, *, with_cert: bool = True) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.client_key.read_bytes() if with_cert else None,
            certificate_chain=self.client_cert.read_bytes() if with_cert else None,
        )

    def http_verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(directory: Path, name: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=f"envoymesh test {name}")
    server = ca.issue_cert(SERVER_NAME, "127.0.0.1", "localhost")
    client = ca.issue_cert(f"edge.{name}")
    files = {
        "ca_file": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for field, blob in files.items():
        path = directory / f"{name}-{field}.pem"
        blob.write_to_path(str(path))
        paths[field] = path
    return Pki(ca=ca, **paths)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "main")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "other")


def tls_settings(pki: Pki, *, mutual: bool = True) -> dict[str, Any]:
    """Settings for an sds whose certificate files the test may rewrite."""
    live = pki.server_cert.parent / "live"
    live.mkdir(exist_ok=True)
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    values: dict[str, Any] = {
        "tls_cert_file": str(cert),
        "tls_key_file": str(key),
        "tls_check_interval": 0.1,
    }
    if mutual:
        values["tls_client_ca_file"] = str(pki.ca_file)
    return values


async def fetch(sds: RunningSds, credentials: grpc.ChannelCredentials) -> list[str]:
    """FetchEndpoints over gRPC with ``credentials``; the cluster names answered."""
    # A connection of its own each time: a shared one would still be backing off after a
    # refused handshake.
    options = [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    async with grpc.aio.secure_channel(sds.grpc_target, credentials, options=options) as channel:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
        response = await stub.FetchEndpoints(
            discovery_pb2.DiscoveryRequest(resource_names=["usersvc"], type_url=EDS), timeout=10
        )
    return [resource.type_url for resource in response.resources]


async def refused(sds: RunningSds, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await fetch(sds, credentials)
    code: grpc.StatusCode = failure.value.code()
    return code


async def tls_reloads(sds: RunningSds, verify: ssl.SSLContext | bool, outcome: str) -> float:
    async with httpx.AsyncClient(base_url=sds.url, verify=verify) as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'sds_tls_reloads_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


async def wait_reloads(
    sds: RunningSds, verify: ssl.SSLContext | bool, outcome: str, count: float
) -> None:
    async with asyncio.timeout(10):
        while True:
            with contextlib.suppress(httpx.ConnectError):  # the old certificate, still
                if await tls_reloads(sds, verify, outcome) >= count:
                    return
            await asyncio.sleep(0.05)


def replace_file(path: Path, content: bytes) -> None:
    """As Kubernetes updates a Secret volume: a new file moved over the old one."""
    new = path.with_suffix(".new")
    new.write_bytes(content)
    new.replace(path)


# ----- gRPC: mutual TLS ---------------------------------------------------------------------


def edge_config(
    sds: RunningSds,
    pki: Pki,
    admin_port: int,
    listen_port: int,
    *,
    template: str = "edge-eds",
    with_cert: bool = True,
) -> str:
    """A shipped edge template, its cluster to sds wrapped in TLS as docs/security.md shows."""
    config = yaml.safe_load(
        render(
            template,
            {
                "NODE_ID": f"{template}-tls",
                "LISTEN_ADDRESS": "127.0.0.1",
                "LISTEN_PORT": listen_port,
                "ADMIN_PORT": admin_port,
                "SERVICE_NAME": "usersvc",
                "SDS_ADDRESS": "127.0.0.1",
                "SDS_GRPC_PORT": sds.settings.grpc_port,
                "SDS_HTTP_PORT": sds.settings.http_port,
                "ADS_API_TYPE": "GRPC",
                "REFRESH_DELAY": "0.2s",
            },
        )
    )
    grpc_cluster = template == "edge-eds"
    common: dict[str, Any] = {
        # gRPC needs HTTP/2 negotiated; the REST poller speaks HTTP/1.1.
        "alpn_protocols": ["h2"] if grpc_cluster else ["http/1.1"],
        "validation_context": {
            "trusted_ca": {"filename": str(pki.ca_file)},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}
            ],
        },
    }
    if with_cert:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(pki.client_cert)},
                "private_key": {"filename": str(pki.client_key)},
            }
        ]
    name = "sds_xds" if grpc_cluster else "sds_http"
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
            ".UpstreamTlsContext",
            "sni": SERVER_NAME,
            "common_tls_context": common,
        },
    }
    return yaml.safe_dump(config)


async def wait_ports(edge: EnvoyProxy, expected: list[int]) -> None:
    async with asyncio.timeout(20):
        while sorted(h.port for h in (await edge.clusters()).get("usersvc", [])) != expected:
            await asyncio.sleep(0.05)


@pytest.mark.envoy
async def test_envoy_follows_sds_over_mutual_tls(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(xds_debounce=0.0, **tls_settings(pki))
    sds.registry.replace(
        Source.KUBERNETES, "usersvc.default", [Endpoint("127.0.0.1", 9001, Source.KUBERNETES)]
    )
    admin, listen = free_port(), free_port()
    edge: EnvoyProxy = await start_envoy("edge-mtls", edge_config(sds, pki, admin, listen), admin)
    await wait_ports(edge, [9001])
    sds.registry.replace(
        Source.KUBERNETES,
        "usersvc.default",
        [Endpoint("127.0.0.1", p, Source.KUBERNETES) for p in (9001, 9002)],
    )
    await wait_ports(edge, [9001, 9002])


@pytest.mark.envoy
async def test_envoy_polls_rest_xds_over_https(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    sds.registry.replace(
        Source.KUBERNETES, "usersvc.default", [Endpoint("127.0.0.1", 9001, Source.KUBERNETES)]
    )
    admin, listen = free_port(), free_port()
    config = edge_config(sds, pki, admin, listen, template="edge-eds-rest", with_cert=False)
    edge: EnvoyProxy = await start_envoy("edge-rest-tls", config, admin)
    await wait_ports(edge, [9001])
    sds.registry.replace(
        Source.KUBERNETES,
        "usersvc.default",
        [Endpoint("127.0.0.1", p, Source.KUBERNETES) for p in (9001, 9003)],
    )
    await wait_ports(edge, [9001, 9003])


@pytest.mark.envoy
async def test_envoy_without_a_client_certificate_learns_nothing(
    start_sds: Callable[..., Any], start_envoy: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    sds.registry.replace(
        Source.KUBERNETES, "usersvc.default", [Endpoint("127.0.0.1", 9001, Source.KUBERNETES)]
    )
    admin, listen = free_port(), free_port()
    config = edge_config(sds, pki, admin, listen, with_cert=False)
    edge: EnvoyProxy = await start_envoy("edge-no-cert", config, admin)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}") as client:
        async with asyncio.timeout(20):
            while True:  # Envoy has tried, and the handshake failed
                stats = (await client.get("/stats", params={"filter": "sds_xds"})).text
                failures = [
                    line
                    for line in stats.splitlines()
                    if "ssl.connection_error" in line
                    or "ssl.fail_verify" in line
                    or "upstream_cx_connect_fail" in line
                    or "upstream_cx_destroy_remote" in line
                ]
                if any(not line.endswith(": 0") for line in failures):
                    break
                await asyncio.sleep(0.1)
        connected = (await client.get("/stats", params={"filter": "connected_state"})).text
    assert "control_plane.connected_state: 0" in connected
    assert (await edge.clusters()).get("usersvc", []) == []
    assert sds.server.proxies.all() == []


async def test_grpc_client_with_the_cas_certificate_is_served(
    start_sds: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    assert await fetch(sds, pki.client_credentials()) == [EDS]


async def test_grpc_client_without_a_certificate_is_refused(
    start_sds: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    assert (
        await refused(sds, pki.client_credentials(with_cert=False)) == grpc.StatusCode.UNAVAILABLE
    )


async def test_grpc_client_with_a_certificate_of_another_ca_is_refused(
    start_sds: Callable[..., Any], pki: Pki, other_pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),  # trusts sds, but is not trusted by it
        private_key=other_pki.client_key.read_bytes(),
        certificate_chain=other_pki.client_cert.read_bytes(),
    )
    assert await refused(sds, stranger) == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_grpc_is_refused_on_a_tls_port(
    start_sds: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    async with grpc.aio.insecure_channel(sds.grpc_target) as channel:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.FetchEndpoints(discovery_pb2.DiscoveryRequest(type_url=EDS), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_without_a_client_ca_any_tls_client_is_served(
    start_sds: Callable[..., Any], pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki, mutual=False))
    assert await fetch(sds, pki.client_credentials(with_cert=False)) == [EDS]


# ----- HTTP ---------------------------------------------------------------------------------


async def test_http_port_speaks_tls_only(start_sds: Callable[..., Any], pki: Pki) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    assert sds.url.startswith("https://")
    async with httpx.AsyncClient(verify=pki.http_verify(), headers=SDS_AUTH) as client:
        assert (await client.get(f"{sds.url}/healthcheck")).text == "OK"
        posted = await client.post(
            f"{sds.url}/v1/registration/usersvc", json={"ip": "10.0.0.1", "port": 80}
        )
        assert posted.status_code == 200
    plain = sds.url.replace("https://", "http://")
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.HTTPError):
            (await client.get(f"{plain}/healthcheck")).raise_for_status()


async def test_an_untrusted_http_client_does_not_get_through(
    start_sds: Callable[..., Any], pki: Pki, other_pki: Pki
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    async with httpx.AsyncClient(verify=other_pki.http_verify()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{sds.url}/healthcheck")


# ----- rotation -----------------------------------------------------------------------------


async def test_rotated_certificates_are_used_without_a_restart(
    start_sds: Callable[..., Any], pki: Pki, other_pki: Pki
) -> None:
    settings = tls_settings(pki)
    sds: RunningSds = await start_sds(**settings)
    trusts_new = grpc.ssl_channel_credentials(
        root_certificates=other_pki.ca_file.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    assert await refused(sds, trusts_new) == grpc.StatusCode.UNAVAILABLE
    async with httpx.AsyncClient(verify=other_pki.http_verify()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{sds.url}/healthcheck")

    reloaded = await tls_reloads(sds, pki.http_verify(), "ok")  # the counter is per process
    replace_file(Path(settings["tls_key_file"]), other_pki.server_key.read_bytes())
    replace_file(Path(settings["tls_cert_file"]), other_pki.server_cert.read_bytes())
    await wait_reloads(sds, other_pki.http_verify(), "ok", reloaded + 1)

    assert await fetch(sds, trusts_new) == [EDS]
    async with httpx.AsyncClient(verify=other_pki.http_verify()) as client:
        assert (await client.get(f"{sds.url}/healthcheck")).text == "OK"
    assert await refused(sds, pki.client_credentials()) == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_client_ca_is_used_without_a_restart(
    start_sds: Callable[..., Any], pki: Pki, other_pki: Pki, tmp_path: Path
) -> None:
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(pki.ca_file.read_bytes())
    sds: RunningSds = await start_sds(**{**tls_settings(pki), "tls_client_ca_file": str(client_ca)})
    newcomer = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),
        private_key=other_pki.client_key.read_bytes(),
        certificate_chain=other_pki.client_cert.read_bytes(),
    )
    assert await refused(sds, newcomer) == grpc.StatusCode.UNAVAILABLE
    reloaded = await tls_reloads(sds, pki.http_verify(), "ok")
    replace_file(client_ca, other_pki.ca_file.read_bytes())
    await wait_reloads(sds, pki.http_verify(), "ok", reloaded + 1)
    assert await fetch(sds, newcomer) == [EDS]


async def test_broken_files_keep_the_certificates_in_use(
    start_sds: Callable[..., Any], pki: Pki, other_pki: Pki
) -> None:
    settings = tls_settings(pki)
    sds: RunningSds = await start_sds(**settings)
    failed = await tls_reloads(sds, pki.http_verify(), "failed")
    replace_file(Path(settings["tls_cert_file"]), b"-----BEGIN CERTIFICATE-----\nnope\n")
    await wait_reloads(sds, pki.http_verify(), "failed", failed + 1)
    # A certificate that does not match the key is no better.
    replace_file(Path(settings["tls_cert_file"]), other_pki.server_cert.read_bytes())
    await wait_reloads(sds, pki.http_verify(), "failed", failed + 2)
    assert await fetch(sds, pki.client_credentials()) == [EDS]
    async with httpx.AsyncClient(verify=pki.http_verify()) as client:
        assert (await client.get(f"{sds.url}/healthcheck")).text == "OK"


# ----- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert-file", "/nonexistent/tls.crt"], "go together"),
        (["--tls-client-ca-file", "/nonexistent/ca.pem"], "needs --tls-cert-file"),
        (
            ["--tls-cert-file", "/nonexistent/tls.crt", "--tls-key-file", "/nonexistent/tls.key"],
            "cannot use the TLS files",
        ),
    ],
)
async def test_unusable_tls_settings_stop_the_start(
    sds_process: Callable[..., Any], run_dir: Path, flags: list[str], message: str
) -> None:
    with pytest.raises(RuntimeError):
        await sds_process(*flags)
    assert message in (run_dir / "sds-0.log").read_text()


async def test_an_sds_process_serves_https_and_grpc_over_mtls(
    sds_process: Callable[..., Any], pki: Pki
) -> None:
    files = tls_settings(pki)
    sds: SdsProcess = await sds_process(
        "--tls-cert-file",
        files["tls_cert_file"],
        "--tls-key-file",
        files["tls_key_file"],
        "--tls-client-ca-file",
        files["tls_client_ca_file"],
        scheme="https",
    )
    async with httpx.AsyncClient(verify=pki.http_verify()) as client:
        ready = await client.get(f"{sds.url}/readyz")
        assert ready.status_code == 200
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(
        sds.grpc_target, pki.client_credentials(), options=options
    ) as channel:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
        response = await stub.FetchEndpoints(
            discovery_pb2.DiscoveryRequest(resource_names=["x"], type_url=EDS), timeout=10
        )
    assert [r.type_url for r in response.resources] == [EDS]
    async with grpc.aio.secure_channel(
        sds.grpc_target, pki.client_credentials(with_cert=False), options=options
    ) as channel:
        stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.FetchEndpoints(discovery_pb2.DiscoveryRequest(type_url=EDS), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert '"tls":true' in sds.log()


async def test_usersvc_registers_over_https_with_the_ca_in_ssl_cert_file(
    start_sds: Callable[..., Any],
    usersvc_process: Callable[..., Any],
    private_postgres: LocalPostgres,
    pki: Pki,
) -> None:
    sds: RunningSds = await start_sds(**tls_settings(pki))
    await usersvc_process(
        private_postgres.url,
        env={
            "USERSVC_SDS_URL": sds.url,
            "USERSVC_REGISTER_PORT": "10001",
            "POD_IP": "127.0.0.1",
            "SSL_CERT_FILE": str(pki.ca_file),  # httpx's trust store, so no usersvc setting
        },
    )
    async with asyncio.timeout(20):
        while [e.key for e in sds.registry.snapshot("usersvc").endpoints] != [("127.0.0.1", 10001)]:
            await asyncio.sleep(0.05)
