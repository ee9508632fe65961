"""Password hashing with argon2id, off the event loop.

argon2 is deliberately slow and memory-hard, so every hash and verify runs in a worker thread.
Unknown users are checked against a dummy hash so a login answers in the same time whether or
not the user exists.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# argon2id with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): a single lane keeps
# concurrent logins from fighting over a small machine's cores. Older hashes keep verifying
# and are upgraded on the next successful login (needs_rehash).
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_dummy_hash: str | None = None


async def hash_password(password: str) -> str:
    """A salted argon2id hash of ``password`` (PHC string format)."""
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored``; with no stored hash, burn the same time."""
    global _dummy_hash  # noqa: PLW0603 - computed once, lazily, off the event loop
    if stored is None:
        if _dummy_hash is None:
            _dummy_hash = await hash_password("not a real password")
        await asyncio.to_thread(_verify, _dummy_hash, password)
        return False
    return await asyncio.to_thread(_verify, stored, password)


def needs_rehash(stored: str) -> bool:
    """True when ``stored`` was made with weaker parameters than today's."""
    return _hasher.check_needs_rehash(stored)
