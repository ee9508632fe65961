"""sds settings: ``SDS_*`` environment variables, overridable by command-line flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from envoymesh.cli import CommaList, NetworkList
from envoymesh.heartbeat import HEARTBEAT_INTERVAL, TTL_HEARTBEATS, WARMUP_HEARTBEATS
from sds.model import IpFamily, Source


class Settings(BaseSettings):
    """Everything sds can be told; see ``sds --help``."""

    model_config = SettingsConfigDict(env_prefix="SDS_", populate_by_name=True)

    source: CommaList = Field(
        default_factory=lambda: [Source.REGISTRATION.value],
        description="where endpoints come from: kubernetes, registration (comma-separated)",
    )
    http_host: str = Field("0.0.0.0", description="address of the HTTP API (v1, v3 REST, metrics)")
    http_port: int = Field(8080, ge=0, le=65535, description="port of the HTTP API")
    grpc_host: str = Field("0.0.0.0", description="address of the gRPC xDS server")
    grpc_port: int = Field(18000, ge=0, le=65535, description="port of the gRPC xDS server")
    namespace: CommaList = Field(
        default_factory=list, description="Kubernetes namespaces to watch (default: all)"
    )
    port_name: str = Field(
        "",
        description="EndpointSlice port to use, by name (default: the only one; a service with"
        " several ports is not served until this says which)",
    )
    ip_family: IpFamily = Field(
        IpFamily.BOTH,
        description="address family served from EndpointSlices: IPv4, IPv6 or both",
    )
    kube_api_url: str = Field(
        "", description="API server URL without auth, as `kubectl proxy` gives"
    )
    kubeconfig: str = Field("", description="kubeconfig file (default: in-cluster, then ~/.kube)")
    kube_read_timeout: float = Field(
        120.0,
        gt=0,
        description="seconds a Kubernetes watch may stay silent before it is resumed"
        " (the API server sends a bookmark about once a minute)",
    )
    gateway_address: CommaList = Field(
        default_factory=list,
        description="addresses written to every Gateway's status (default: those of the Service"
        " labelled gateway.networking.k8s.io/gateway-name=<gateway>, else the Gateway's own)",
    )
    lease_name: str = Field(
        "envoymesh-sds",
        description="the coordination.k8s.io Lease whose holder alone writes Gateway API status",
    )
    lease_holder: str = Field(
        "", description="this replica's identity in the Lease (default: $POD_NAME, else host_pid)"
    )
    lease_namespace: str = Field(
        "default", description="the Lease's namespace (the manifests give sds's own)"
    )
    lease_duration: float = Field(
        15.0, gt=0, description="seconds a Lease not renewed stays its holder's"
    )
    lease_renew_deadline: float = Field(
        10.0,
        gt=0,
        description="seconds the leader keeps trying to renew before it stops writing",
    )
    lease_retry_period: float = Field(
        2.0, gt=0, description="seconds between tries to acquire or renew the Lease"
    )
    config_dir: str = Field(
        "",
        description="directory of Gateway API YAML (GatewayClass, Gateway, HTTPRoute, GRPCRoute,"
        " ReferenceGrant, Service) to serve as Listeners, Routes and Clusters; re-read on change",
    )
    registration_namespace: str = Field(
        "default",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="the namespace registered services belong to, for routes' backendRefs"
        " (and of config documents that name none)",
    )
    heartbeat_interval: float = Field(
        HEARTBEAT_INTERVAL,
        gt=0,
        description="seconds between registered hosts' heartbeats (usersvc's"
        " USERSVC_REGISTER_INTERVAL); the host TTL and the warm-up derive from it",
    )
    host_ttl: float | None = Field(
        None,
        gt=0,
        description=f"seconds a registered host lives unrefreshed"
        f" (default: {TTL_HEARTBEATS:g} times --heartbeat-interval)",
    )
    registration_warmup: float | None = Field(
        None,
        ge=0,
        description="after start, seconds to wait for heartbeats before proxies that had hosts"
        f" are answered (default: {WARMUP_HEARTBEATS:g} times --heartbeat-interval)",
    )
    write_token: SecretStr | None = Field(
        None, description="token for registration writes (`Authorization: Bearer <token>`)"
    )
    write_tokens_file: str = Field(
        "",
        description="file of `token service-glob[,service-glob...]` lines: tokens scoped to"
        " services; re-read on SIGHUP",
    )
    allow_anonymous_writes: bool = Field(
        False, description="accept registration writes without a token (not for production)"
    )
    allow_loopback: bool = Field(
        False, description="accept registrations of loopback addresses (one-machine meshes)"
    )
    tls_cert_file: str = Field(
        "", description="PEM certificate (chain) of both ports; with --tls-key-file turns on TLS"
    )
    tls_key_file: str = Field("", description="PEM private key of --tls-cert-file")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle: gRPC clients must present a certificate it signed (mTLS)"
    )
    tls_check_interval: float = Field(
        10.0, gt=0, description="seconds between checks of the TLS files for a change on disk"
    )
    proxyless_tls: Literal["off", "tls", "mtls"] = Field(
        "off",
        description="TLS of proxyless gRPC clients' calls to backends (gRFC A29): tls checks the"
        " backend's certificate with the CA of the client's certificate provider (sds bootstrap"
        " --grpc --ca-file), mtls also presents the client's certificate (--cert-file,"
        " --key-file); a client whose bootstrap has no such provider refuses the Clusters",
    )
    proxyless_tls_san: CommaList = Field(
        default_factory=list,
        description="with --proxyless-tls: a backend's certificate must carry one of these"
        " subject alternative names (DNS or URI), each exact or `*.DOMAIN` for every name under"
        " DOMAIN (default: any certificate the CA signed)",
    )
    trusted_proxies: NetworkList = Field(
        default_factory=list,
        description="networks (CIDR) of proxies whose X-Forwarded-For auto_ip trusts",
    )
    max_tags: int = Field(32, ge=0, description="tags a registered host may carry")
    max_tag_key_bytes: int = Field(64, ge=1, description="UTF-8 bytes of a tag name")
    max_tag_value_bytes: int = Field(256, ge=1, description="UTF-8 bytes of a tag value")
    max_field_bytes: int = Field(
        256, ge=1, description="UTF-8 bytes of a registration's revision and service_repo_name"
    )
    max_hosts_per_service: int = Field(
        10_000, ge=1, description="registered hosts (ip, port) one service may have"
    )
    max_services: int = Field(10_000, ge=1, description="services registration may create")
    env: str = Field("production", description="the `env` field of v1 answers (lyft compatible)")
    xds_debounce: float = Field(
        0.01, ge=0, description="seconds to coalesce registry changes before pushing xDS"
    )
    max_subscriptions: int = Field(
        10_000,
        ge=1,
        description="resource names one xDS stream (or REST request) may subscribe to",
    )
    max_streams_per_peer: int = Field(
        1_000, ge=1, description="xDS gRPC streams one client address may hold open"
    )
    max_connection_age: float = Field(
        1800.0,
        ge=0,
        description="seconds before a gRPC connection is asked to reconnect (gRPC adds up to "
        "10 percent jitter), so proxies spread over every replica after a rollout; 0: never",
    )
    max_connection_age_grace: float = Field(
        60.0, ge=0, description="seconds a connection past its age may still finish its streams"
    )
    identifier: str = Field(
        "",
        description="control_plane.identifier sent to proxies "
        "(default: envoymesh-sds/<$POD_NAME, else the hostname>)",
    )
    ui: Literal["on", "off"] = Field(
        "on", description="the read-only live view of the mesh at /ui (on or off)"
    )
    log_level: str = Field("info", description="debug, info, warning or error")

    @property
    def effective_host_ttl(self) -> float:
        """``host_ttl``, or its default derived from the heartbeat interval."""
        if self.host_ttl is not None:
            return self.host_ttl
        return TTL_HEARTBEATS * self.heartbeat_interval

    @property
    def effective_registration_warmup(self) -> float:
        """``registration_warmup``, or its default derived from the heartbeat interval."""
        if self.registration_warmup is not None:
            return self.registration_warmup
        return WARMUP_HEARTBEATS * self.heartbeat_interval

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return self

    @model_validator(mode="after")
    def _proxyless_san(self) -> Settings:
        if self.proxyless_tls_san and self.proxyless_tls == "off":
            raise ValueError("--proxyless-tls-san needs --proxyless-tls tls or mtls")
        return self

    @field_validator("proxyless_tls_san")
    @classmethod
    def _san_names(cls, value: list[str]) -> list[str]:
        for name in value:
            rest = name.removeprefix("*.")
            if not rest or "*" in rest or any(c.isspace() for c in name):
                raise ValueError(f"{name!r} is not a name or *.DOMAIN")
        return list(dict.fromkeys(value))

    @field_validator("source")
    @classmethod
    def _known_sources(cls, value: list[str]) -> list[str]:
        known = {s.value for s in Source}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown source(s) {unknown}; choose from {sorted(known)}")
        if not value:
            raise ValueError("at least one source is needed")
        return list(dict.fromkeys(value))
