"""``usersvc`` / ``python -m usersvc``: serve the user API with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator, Sequence

import uvicorn
from fastapi import FastAPI

from envoymesh import cli, logs
from envoymesh.loop import event_loop_factory
from usersvc.app import create_app
from usersvc.config import Settings

log = logging.getLogger("usersvc")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM first drains (see :func:`serve`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT: deregister, drain, stop accepting, finish, close the pool.

    A second signal skips the drain.
    """
    app: FastAPI = create_app(settings)
    server = _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=settings.access_log,
            timeout_graceful_shutdown=10,
            server_header=False,
            # The app reads X-Forwarded-For itself, from USERSVC_TRUSTED_PROXIES only.
            proxy_headers=False,
        )
    )
    draining: asyncio.Task[None] | None = None

    async def drain_then_stop() -> None:
        await app.state.drain()
        if settings.drain_seconds:
            log.info("draining", extra={"seconds": settings.drain_seconds})
            await asyncio.sleep(settings.drain_seconds)
        server.should_exit = True

    def on_signal() -> None:
        nonlocal draining
        if draining is None:
            draining = asyncio.create_task(drain_then_stop())
        else:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.serve()
    finally:
        if draining is not None:
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, then serve until SIGTERM or SIGINT."""
    settings = cli.parse(
        Settings, "usersvc", "The envoymesh user service (FastAPI on PostgreSQL).", argv
    )
    logs.configure("usersvc", settings.log_level)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
