"""usersvc settings: environment variables, overridable by command-line flags."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from envoymesh.cli import NetworkList
from envoymesh.heartbeat import HEARTBEAT_INTERVAL


class Settings(BaseSettings):
    """Everything usersvc can be told; see ``usersvc --help``."""

    model_config = SettingsConfigDict(env_prefix="USERSVC_", populate_by_name=True)

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(5000, ge=0, le=65535, description="TCP port to listen on")
    grpc_host: str = Field("", description="address the gRPC API listens on (empty: --host)")
    grpc_port: int = Field(
        5001, ge=0, le=65535, description="TCP port of the gRPC API (0: no gRPC API)"
    )
    grpc_tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) of the gRPC port; with --grpc-tls-key-file it"
        " serves TLS only (re-read when the files change)",
    )
    grpc_tls_key_file: str = Field("", description="PEM private key of --grpc-tls-cert-file")
    grpc_tls_client_ca_file: str = Field(
        "",
        description="PEM CA bundle: gRPC clients must present a certificate it signed (mutual"
        " TLS, as sds --proxyless-tls mtls has proxyless clients do)",
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/postgres",
        validation_alias="DATABASE_URL",
        description="PostgreSQL DSN (libpq URL form)",
    )
    pool_min_size: int = Field(1, ge=0, description="connections the pool keeps open")
    pool_max_size: int = Field(10, ge=1, description="most connections the pool opens")
    db_timeout: float = Field(
        5.0, gt=0, description="seconds to wait for a connection or a query before answering 503"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1, description="largest request body accepted")
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request body may take to arrive before 408"
    )
    hash_concurrency: int = Field(
        0,
        ge=0,
        description="argon2 hashes at once, 19 MiB each (0: the cgroup's CPU quota less one)",
    )
    hash_wait: float = Field(
        2.0,
        ge=0,
        description="seconds a request may expect to wait for a hashing slot; longer gets 503",
    )
    hash_queue: int | None = Field(
        None,
        ge=0,
        description="most requests waiting for a hashing slot, whatever --hash-wait allows "
        "(default: 64 per slot)",
    )
    hash_refusal_delay: float = Field(
        0.5,
        ge=0,
        le=10,
        description="seconds a refused hashing request waits before its 503 once refusals "
        "outrun 256 at once (refilled 64 a second), so clients that ignore Retry-After come "
        "back less often (0: always answer at once)",
    )
    login_failures: int = Field(
        10, ge=1, description="failed logins per (username, client) before 429s"
    )
    login_window: float = Field(
        300.0, gt=0, description="seconds over which failed logins are counted"
    )
    login_tracked: int = Field(
        10_000, ge=1, description="(username, client) pairs the failure limiter remembers"
    )
    trusted_proxies: NetworkList = Field(
        default_factory=list,
        description="addresses/CIDRs whose X-Forwarded-For names the client (comma-separated)",
    )
    sds_url: str = Field("", description="sds base URL to register with (empty: do not register)")
    register_service: str = Field("usersvc", description="service name to register under")
    register_address: str = Field(
        "", description="address Envoy should reach (default: the pod IP / resolved hostname)"
    )
    register_port: int = Field(
        0, ge=0, le=65535, description="port Envoy should reach, the sidecar's (default: --port)"
    )
    register_grpc_service: str = Field(
        "usersvc-grpc",
        description="service name to register the gRPC port under (empty: do not register it)",
    )
    register_interval: float = Field(
        HEARTBEAT_INTERVAL,
        gt=0,
        description="seconds between heartbeats; give sds the same (SDS_HEARTBEAT_INTERVAL)",
    )
    sds_token: SecretStr | None = Field(None, description="bearer token for sds writes")
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token that may change or delete any user (unset: no admin)",
    )
    drain_seconds: float = Field(
        0.0, ge=0, description="on SIGTERM, deregister and keep serving this long before stopping"
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    access_log: bool = Field(False, description="log one line per request")

    @model_validator(mode="after")
    def _grpc_tls_files(self) -> Settings:
        if bool(self.grpc_tls_cert_file) != bool(self.grpc_tls_key_file):
            raise ValueError("--grpc-tls-cert-file and --grpc-tls-key-file go together")
        if self.grpc_tls_client_ca_file and not self.grpc_tls_cert_file:
            raise ValueError(
                "--grpc-tls-client-ca-file needs --grpc-tls-cert-file and --grpc-tls-key-file"
            )
        return self
