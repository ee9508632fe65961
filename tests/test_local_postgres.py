"""The private PostgreSQL of tests and meshctl, from the pgserver wheel (a fresh machine's)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import asyncpg
import pytest

from meshctl.postgres import LocalPostgres, pgserver_bindir


async def query_version(server: LocalPostgres) -> str:
    await server.start()
    try:
        conn = await asyncpg.connect(server.url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    finally:
        await server.stop()
        server.discard()


async def test_pgserver_wheel_runs_where_no_system_postgres_is(tmp_path: Path) -> None:
    wheel = pgserver_bindir()
    assert wheel is not None, "the `local` extra installs pgserver"
    version = await query_version(LocalPostgres(tmp_path / "pg", bindir=wheel))
    assert version.startswith("16")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
async def test_as_root_binaries_below_a_closed_directory_still_run(tmp_path: Path) -> None:
    wheel = pgserver_bindir()
    assert wheel is not None
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    package = wheel.parent.parent
    shutil.copytree(package, closed / package.name, symlinks=True)
    shutil.copytree(package.parent / f"{package.name}.libs", closed / f"{package.name}.libs")
    bindir = closed / package.name / wheel.relative_to(package)
    server = LocalPostgres(closed / "pg", bindir=bindir)
    copy = server.bindir.parents[2]  # made in the temporary directory, not below `closed`
    try:
        assert (await query_version(server)).startswith("16")
        assert closed.stat().st_mode & 0o777 == 0o700
        assert not copy.is_relative_to(closed)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
