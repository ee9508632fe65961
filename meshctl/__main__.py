"""``meshctl``: run the envoymesh mesh on one machine and inspect it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from envoymesh.procs import ManagedProcess, wait_http
from meshctl.postgres import LocalPostgres, free_port


async def _usersvc_demo(run_dir: Path) -> int:
    postgres = LocalPostgres(run_dir / "postgres")
    print(f"starting PostgreSQL in {postgres.directory} ...", flush=True)
    await postgres.start()
    port = free_port()
    usersvc = ManagedProcess(
        "usersvc",
        [sys.executable, "-m", "usersvc", "--host", "127.0.0.1", "--port", str(port)],
        log_path=run_dir / "usersvc.log",
        env={"DATABASE_URL": postgres.url},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await usersvc.start()
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/user/health", timeout=30, process=usersvc)
        print(
            f"usersvc is up at {base} (logs in {run_dir}). Try:\n"
            f"  curl {base}/user/health\n"
            f"  curl -X PUT -H 'Content-Type: application/json'"
            f' -d \'{{"fullname": "Alice", "password": "secret"}}\' {base}/user/alice\n'
            f"  curl {base}/user/alice\n"
            f"  open {base}/docs\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        await stop.wait()
    finally:
        await usersvc.stop()
        await postgres.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``meshctl`` command."""
    parser = argparse.ArgumentParser(prog="meshctl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run usersvc on a private PostgreSQL")
    demo.add_argument("--run-dir", type=Path, default=None, help="where logs and data go")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="envoymesh-"))
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(_usersvc_demo(run_dir)))


if __name__ == "__main__":
    main()
