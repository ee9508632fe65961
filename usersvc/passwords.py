"""Password hashing with argon2id: off the event loop, and never more at once than the CPUs.

argon2 is deliberately slow and memory-hard (19 MiB per call), so a flood of sign-ups must not
run one hash per request: that would take as many cores and 19 MiB blocks as there are requests.
At most ``concurrency`` hashes or verifications run at once, on threads of their own.

Waiting costs no argon2 memory, so requests are admitted by how long they would wait, not by a
fixed count: a request may queue while its expected wait (its place in the queue times the
measured hash time, a moving average) is within ``wait_budget`` seconds, and at most ``queue``
may wait whatever that says, so memory stays bounded. Any further request is refused at once
with :class:`HashingBusy` (a 503 whose Retry-After is the backlog's expected wait).

A request takes its place with :meth:`Hashing.admit` before it does any work (the ASGI
gate in :mod:`usersvc.admission` does, before the body is read) and keeps it until it ends:
its hashes then only wait their turn and are never refused, and the place is given back however
the request ends. A hash outside any reservation takes one for itself.

Unknown users are checked against a dummy hash so a login answers in the same time whether or
not the user exists.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
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

# Weight of the newest hash time in the moving average: about the last ten hashes count.
_SMOOTHING = 0.2
# An admitted request waits at most this many times the budget (and 10 s at least) for its
# turn: a backstop for a machine suddenly much slower than measured, not the admission rule.
_WAIT_SLACK = 3.0
_MIN_WAIT_TIMEOUT = 10.0

# The Hashing whose queue the current request holds a place in (set by Hashing.admit).
_holder: ContextVar[Hashing | None] = ContextVar("hash_reservation", default=None)


class HashingBusy(Exception):
    """The hashing backlog is over the wait budget or the cap: answer 503 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"hashing busy; retry after {retry_after} s")
        self.retry_after = retry_after


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
    """Bounded argon2id hashing and verification, admitted by expected wait (see the module)."""

    def __init__(
        self, concurrency: int, queue: int, wait_budget: float, first_estimate: float = 0.05
    ) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.wait_budget = wait_budget
        self._wait_timeout = max(_MIN_WAIT_TIMEOUT, _WAIT_SLACK * wait_budget)
        self._slots = asyncio.Semaphore(concurrency)
        self._hash_seconds = first_estimate
        self._admitted = 0
        self._running = 0
        self._waiting = 0
        self.completed = 0
        self.refused = 0
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
        """Hashes and verifications waiting for a slot now."""
        return self._waiting

    @property
    def admitted(self) -> int:
        """Requests holding a place now (running, waiting, or between their hashes)."""
        return self._admitted

    @property
    def hash_seconds(self) -> float:
        """The moving average of how long one hash or verification takes, in seconds."""
        return self._hash_seconds

    def expected_wait(self, ahead: int) -> float:
        """Seconds a request with ``ahead`` admitted requests before it waits for a slot."""
        if ahead < self.concurrency:
            return 0.0
        return (ahead - self.concurrency + 1) / self.concurrency * self._hash_seconds

    def retry_after(self) -> int:
        """Whole seconds, at least one, until the backlog ahead of a new request has drained."""
        return max(1, math.ceil(self.expected_wait(self._admitted)))

    def check(self) -> None:
        """Raise :class:`HashingBusy` when one more request may not take a place now."""
        ahead = self._admitted
        if ahead - self.concurrency >= self.queue or self.expected_wait(ahead) > self.wait_budget:
            self.refused += 1
            raise HashingBusy(self.retry_after())

    def admit(self) -> AbstractContextManager[None]:
        """A place in the queue for the current request, to hold with ``with``; or raise
        :class:`HashingBusy` now.

        Hashes the request makes while it holds the place (in the same context) use it.
        """
        self.check()
        return self._place()

    @contextmanager
    def _place(self) -> Iterator[None]:
        self._admitted += 1
        token = _holder.set(self)
        try:
            yield
        finally:
            _holder.reset(token)
            self._admitted -= 1

    async def _run(self, work: Callable[..., T], *args: str) -> T:
        if _holder.get() is not self:
            with self.admit():
                return await self._run(work, *args)
        self._waiting += 1
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise HashingBusy(self.retry_after()) from None
        finally:
            self._waiting -= 1
        self._running += 1
        started = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._threads, work, *args)
        finally:
            self._running -= 1
            self._slots.release()
        self._hash_seconds += _SMOOTHING * (time.perf_counter() - started - self._hash_seconds)
        self.completed += 1
        return result

    async def calibrate(self) -> None:
        """Make the dummy hash, and take its time as the first estimate of a hash's."""
        started = time.perf_counter()
        self._dummy_hash = await self.hash(_DUMMY_PASSWORD)
        self._hash_seconds = time.perf_counter() - started

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
