"""``sds`` / ``python -m sds``: the envoymesh discovery server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from envoymesh import cli, logs
from envoymesh.loop import event_loop_factory
from sds import bootstrap
from sds.config import Settings
from sds.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, then serve until SIGTERM or SIGINT.

    ``sds bootstrap ...`` prints an Envoy bootstrap instead (see :mod:`sds.bootstrap`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bootstrap"]:
        bootstrap.main(args[1:])
        return
    settings = cli.parse(
        Settings,
        "sds",
        "The envoymesh discovery server: Kubernetes EndpointSlices and self-registration,"
        " served as Envoy's v1 SDS API and v3 xDS (REST and gRPC).",
        args,
    )
    logs.configure("sds", settings.log_level)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(settings))


if __name__ == "__main__":
    main()
