"""Password hashing with argon2id: off the event loop, and never more at once than the CPUs.

argon2 is deliberately slow and memory-hard (19 MiB per call), so a flood of sign-ups must not
run one hash per request: that would take as many cores and 19 MiB blocks as there are requests.
At most ``concurrency`` hashes or verifications run at once, on threads of their own, and at
most ``queue`` more wait for a turn; any further request is refused at once with
:class:`HashingBusy` (a 503 with Retry-After) instead of queueing without limit.

Unknown users are checked against a dummy hash so a login answers in the same time whether or
not the user exists.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

T = TypeVar("T")

# argon2id with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): a single lane keeps
# concurrent logins from fighting over a small machine's cores. Older hashes keep verifying
# and are upgraded on the next successful login (needs_rehash).
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_DUMMY_PASSWORD = "not a real password"  # noqa: S105 - hashed once, never matches a login


# What a refused client is told to wait, in seconds: a full queue drains in well under that.
RETRY_AFTER = 1


class HashingBusy(Exception):
    """Every hashing slot is taken and the queue is full: answer 503 and ask to retry."""


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: the cgroup quota when one is set, else its CPUs.

    A container limited to 1.5 CPUs on a 64-core node must size its pools for 2, not 64.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v2 ``cpu.max`` (or v1's cfs quota/period); None when unlimited."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except ValueError:
        return None


class Hashing:
    """Bounded argon2id hashing and verification (see the module docstring)."""

    def __init__(self, concurrency: int, queue: int, wait_timeout: float = 10.0) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._wait_timeout = wait_timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._running = 0
        self._waiting = 0
        # Its own threads, as many as slots: argon2's 19 MiB blocks are reused by the same few
        # threads instead of being spread over (and kept by) every thread of the default pool.
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="argon2")
        self._dummy_hash: str | None = None

    @property
    def running(self) -> int:
        """Hashes and verifications running now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return self._waiting

    def admit(self) -> None:
        """Raise :class:`HashingBusy` now if a hash could not even queue.

        Called first thing by requests that will need a hash, so that under a flood the
        refusal costs no database round trip.
        """
        if self._slots.locked() and self._waiting >= self.queue:
            raise HashingBusy

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self.admit()
        self._waiting += 1
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise HashingBusy from None
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._slots.release()

    async def _run(self, work: Callable[..., T], *args: str) -> T:
        async with self._slot():
            return await asyncio.get_running_loop().run_in_executor(self._threads, work, *args)

    async def hash(self, password: str) -> str:
        """A salted argon2id hash of ``password`` (PHC string format)."""
        return await self._run(_hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """True when ``password`` matches ``stored``; with no stored hash, burn the same time."""
        if stored is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash(_DUMMY_PASSWORD)
            await self._run(_verify, self._dummy_hash, password)
            return False
        return await self._run(_verify, stored, password)

    def close(self) -> None:
        """Release the threads (after the last request)."""
        self._threads.shutdown(wait=False, cancel_futures=True)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with weaker parameters than today's."""
    return _hasher.check_needs_rehash(stored)
