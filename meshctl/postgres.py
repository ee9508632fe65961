"""A private PostgreSQL server in a directory: for ``meshctl up`` and for the test suite.

Binaries come from the system (``pg_ctl`` on PATH or ``/usr/lib/postgresql/*/bin``) when
present, else from the ``pgserver`` wheel, so a machine with only Python can run it. PostgreSQL
refuses to run as root, so when we are root the server runs as ``nobody``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from envoymesh.ports import free_port
from envoymesh.procs import ManagedProcess


class PostgresError(RuntimeError):
    """The private server could not be set up or started."""


def pgserver_bindir() -> Path | None:
    """Where the ``pgserver`` wheel keeps its PostgreSQL binaries, if it is installed."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``: the system's first, else pgserver's."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).parent] if on_path else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if (wheel := pgserver_bindir()) is not None:
        candidates.append(wheel)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise PostgresError(
        "no PostgreSQL binaries found: install PostgreSQL or `pip install pgserver`"
        " (the `local` extra)"
    )


def _reachable_by_others(path: Path) -> bool:
    """True when every existing ancestor of ``path`` lets other users pass through."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.exists())


def _reachable_copy(bindir: Path) -> Path:
    """A copy of pgserver's installation that ``nobody`` can execute, made once.

    Needed when the binaries come from a virtualenv below a directory closed to other users.
    The wheel's binaries find their libraries relative to themselves (an rpath into the
    sibling ``pgserver.libs``), so the package and that directory are copied side by side.
    """
    package = bindir.parent.parent  # .../site-packages/pgserver (holding pginstall/bin)
    digest = hashlib.sha256(str(package).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"envoymesh-pgserver-{digest}"
    copied = target / package.name / bindir.relative_to(package)
    if not (copied / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="envoymesh-pgserver-"))
        staging.chmod(0o755)
        shutil.copytree(package, staging / package.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for directory, _, _ in os.walk(staging):
            path = Path(directory)
            path.chmod(path.stat().st_mode | 0o055)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return copied


class LocalPostgres:
    """One PostgreSQL server whose data lives in ``directory``; trust auth on loopback only.

    As root, the server runs as ``nobody``, which must be able to reach the data. When
    ``directory`` lies below a directory closed to other users (a 0700 home or temporary
    directory), the data goes to a private temporary directory instead, which
    :meth:`discard` removes: no existing directory's permissions are changed.
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        bindir: Path | None = None,
    ):
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self._proc: ManagedProcess | None = None
        self._user = "nobody" if os.geteuid() == 0 else None
        self.bindir = bindir or find_bindir()
        if self._user is not None and not _reachable_by_others(self.bindir):
            self.bindir = _reachable_copy(self.bindir)
        self._scratch: Path | None = None
        if self._user is not None and not _reachable_by_others(directory):
            self._scratch = Path(tempfile.mkdtemp(prefix="envoymesh-pg-"))
            self._scratch.chmod(0o711)

    @property
    def url(self) -> str:
        """The libpq URL for the ``postgres`` database as the ``postgres`` role."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        return (self._scratch or self.directory) / "data"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.running()

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.data_dir)
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            user=self._user,
            cwd="/",
            capture_output=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise PostgresError(f"initdb failed: {result.stderr.decode(errors='replace')}")

    async def start(self, timeout: float = 30.0) -> None:
        """Initialise the data directory when new, start the server and wait until it answers."""
        if self.running():
            return
        if not (self.data_dir / "PG_VERSION").exists():
            await asyncio.to_thread(self._initdb)
        self._proc = ManagedProcess(
            "postgres",
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
            ],
            log_path=self.directory / "postgres.log",
            user=self._user,
        )
        await self._proc.start()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Poll until a connection succeeds; raise if the server dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise PostgresError(f"postgres exited; see {self.directory / 'postgres.log'}")
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise PostgresError("postgres did not become ready in time") from None
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            return

    def discard(self) -> None:
        """Delete the private temporary data directory, if one was needed (after stop)."""
        if self._scratch is not None and not self.running():
            shutil.rmtree(self._scratch, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server, as a crash or the OOM killer would; no shutdown at all."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, flush, exit."""
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.stop(timeout=timeout, sig=signal.SIGINT)
