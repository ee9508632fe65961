"""Child processes with a log file, started and stopped without leaving orphans.

Used by ``meshctl`` to run the mesh and by the tests to run real servers, so both exercise
exactly the same start-up and shutdown paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


class ManagedProcess:
    """One child process in its own session, its output appended to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.user = user
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def running(self) -> bool:
        """True while the child has not exited."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the child; its stdout and stderr go to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                user=self.user,
                cwd="/",
                start_new_session=True,
            )

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return its exit code."""
        assert self._proc is not None
        return await asyncio.wait_for(self._proc.wait(), timeout)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child if it is still running."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the child to stop with ``sig``; SIGKILL it if it has not exited in ``timeout``."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self.send_signal(sig)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                await self._proc.wait()
        return self._proc.returncode

    def tail(self, lines: int = 20) -> str:
        """The last lines of the log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def wait_http(
    url: str,
    *,
    timeout: float,
    status: int = 200,
    process: ManagedProcess | None = None,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll ``url`` until it answers ``status``; fail early if ``process`` exits.

    ``verify`` is httpx's: the certificate check of an ``https`` URL.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with httpx.AsyncClient(timeout=2.0, verify=verify) as client:
        while True:
            if process is not None and not process.running():
                raise RuntimeError(
                    f"{process.name} exited with {process.returncode}:\n{process.tail()}"
                )
            try:
                response = await client.get(url)
                if response.status_code == status:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer {status} in {timeout}s (last: {last})")
            await asyncio.sleep(0.05)
