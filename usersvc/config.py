"""usersvc settings: environment variables, overridable by command-line flags."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from envoymesh.heartbeat import HEARTBEAT_INTERVAL


class Settings(BaseSettings):
    """Everything usersvc can be told; see ``usersvc --help``."""

    model_config = SettingsConfigDict(env_prefix="USERSVC_", populate_by_name=True)

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(5000, ge=0, le=65535, description="TCP port to listen on")
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
    hash_concurrency: int = Field(
        0,
        ge=0,
        description="argon2 hashes run at once, 19 MiB each (0: the CPUs the cgroup quota allows)",
    )
    hash_queue: int | None = Field(
        None,
        ge=0,
        description="requests that may wait for a hashing slot; more get 503 (default: 4 per slot)",
    )
    sds_url: str = Field("", description="sds base URL to register with (empty: do not register)")
    register_service: str = Field("usersvc", description="service name to register under")
    register_address: str = Field(
        "", description="address Envoy should reach (default: the pod IP / resolved hostname)"
    )
    register_port: int = Field(
        0, ge=0, le=65535, description="port Envoy should reach, the sidecar's (default: --port)"
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
