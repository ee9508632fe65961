"""The PostgreSQL connection pool, its schema, and how outages surface.

The pool is created in the background so usersvc can start before the database does: until it
exists, and whenever the database stops answering, requests fail fast with
:class:`DatabaseUnavailable` (a 503) instead of hanging or crashing. asyncpg replaces broken
connections on the next acquire, so service resumes by itself after a database restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

log = logging.getLogger("usersvc.db")

# Any of these means "the database is not answering right now", not "the request was bad".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # What a pooled connection raises when the server shut down under a running query.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

# At start-up a PostgreSQL error (say, the database still starting) is worth retrying too.
STARTUP_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

# Arbitrary but fixed: every replica must take the same lock to serialise migrations.
MIGRATION_LOCK_ID = 0x75736572737663  # "usersvc"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        uuid          CHAR(32)      PRIMARY KEY,
        username      VARCHAR(64)   NOT NULL UNIQUE,
        fullname      VARCHAR(2048) NOT NULL,
        password_hash TEXT          NOT NULL,
        created_at    TIMESTAMPTZ   NOT NULL DEFAULT now(),
        updated_at    TIMESTAMPTZ   NOT NULL DEFAULT now()
    )
    """,
)


if TYPE_CHECKING:
    # A plain connection and one borrowed from the pool behave the same to callers.
    Connection: TypeAlias = asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the caller should answer 503."""


async def migrate(conn: Connection) -> int:
    """Apply pending migrations under an advisory lock; return how many were applied.

    Safe when many replicas start at once: the transaction-scoped advisory lock makes them take
    turns, and each re-reads the applied versions after acquiring it.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = 0
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied += 1
        return applied


class Database:
    """Owns the asyncpg pool and the background task that establishes it."""

    def __init__(self, dsn: str, *, min_size: int, max_size: int, timeout: float) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = timeout
        self._pool: asyncpg.Pool[Any] | None = None
        self._connector: asyncio.Task[None] | None = None
        # Health checks use a connection of their own: a pool saturated by requests is busy,
        # not down, and must not make the health check wait or fail.
        self._health_conn: asyncpg.Connection[Any] | None = None
        self._health_lock = asyncio.Lock()
        # Pooled connections handed out so far: shows which requests reached the database.
        self.checkouts = 0

    @property
    def connected(self) -> bool:
        """True once the pool exists and the schema is in place."""
        return self._pool is not None

    def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        self._connector = asyncio.create_task(self._connect_forever(), name="db-connector")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the pool; True when it is ready."""
        if self._connector is None:
            return self.connected
        with suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._connector), timeout)
        return self.connected

    def pool_numbers(self) -> dict[str, int]:
        """The request pool right now: connections open, idle, in use, and the most allowed."""
        pool = self._pool
        if pool is None:
            return {"size": 0, "idle": 0, "in_use": 0, "max": self._max_size}
        size, idle = pool.get_size(), pool.get_idle_size()
        return {"size": size, "idle": idle, "in_use": size - idle, "max": pool.get_max_size()}

    async def ping(self) -> None:
        """``SELECT 1`` on the health connection; :class:`DatabaseUnavailable` if it fails."""
        if self._pool is None:
            raise DatabaseUnavailable("database not connected yet")
        try:
            async with asyncio.timeout(self._timeout):
                async with self._health_lock:
                    if self._health_conn is None or self._health_conn.is_closed():
                        self._health_conn = await asyncpg.connect(self._dsn)
                    await self._health_conn.fetchval("SELECT 1")
        except STARTUP_ERRORS as exc:
            self._drop_health_connection()
            raise DatabaseUnavailable(f"database unavailable ({type(exc).__name__})") from exc

    async def reachable(self) -> bool:
        """True when the pool exists and the database answers the health connection."""
        try:
            await self.ping()
        except DatabaseUnavailable:
            return False
        return True

    def _drop_health_connection(self) -> None:
        conn, self._health_conn = self._health_conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        """Stop connecting and close the pool, waiting at most a few seconds for it."""
        self._drop_health_connection()
        if self._connector is not None:
            self._connector.cancel()
            with suppress(asyncio.CancelledError):
                await self._connector
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except TimeoutError:
                pool.terminate()

    async def _connect_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._timeout,
                    command_timeout=self._timeout,
                )
                try:
                    async with pool.acquire(timeout=self._timeout) as conn:
                        applied = await migrate(conn)
                except BaseException:
                    pool.terminate()
                    raise
            except STARTUP_ERRORS as exc:
                log.warning(
                    "database not reachable, retrying",
                    extra={"error": type(exc).__name__, "detail": str(exc), "retry_in": delay},
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
                delay = min(delay * 2, 5.0)
                continue
            self._pool = pool
            log.info("database connected", extra={"migrations_applied": applied})
            return

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; connection failures become :class:`DatabaseUnavailable`."""
        pool = self._pool
        if pool is None:
            raise DatabaseUnavailable("database not connected yet")
        self.checkouts += 1
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(f"database unavailable ({type(exc).__name__})") from exc
