"""``usersvc`` / ``python -m usersvc``: serve the user API with uvicorn."""

from __future__ import annotations

from collections.abc import Sequence

import uvicorn

from envoymesh import cli, logs
from usersvc.app import create_app
from usersvc.config import Settings


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, then serve until SIGTERM or SIGINT."""
    settings = cli.parse(
        Settings, "usersvc", "The envoymesh user service (FastAPI on PostgreSQL).", argv
    )
    logs.configure("usersvc", settings.log_level)
    # uvicorn stops accepting on SIGTERM, lets in-flight requests finish, then runs the
    # lifespan shutdown that closes the pool.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
        server_header=False,
    )


if __name__ == "__main__":
    main()
