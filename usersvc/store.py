"""User records in PostgreSQL. Only the argon2 hash of a password is ever stored."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from usersvc.db import Database


@dataclass(frozen=True, slots=True)
class User:
    """A user as the API shows it (never with the password)."""

    uuid: str
    username: str
    fullname: str


class UserStore:
    """Queries over the ``users`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, username: str, fullname: str, password_hash: str) -> User | None:
        """Create ``username``; None when it already exists (nothing is changed then).

        One statement, so concurrent PUTs of one new name can never create two rows.
        """
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO users (uuid, username, fullname, password_hash)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (username) DO NOTHING
                RETURNING uuid, username, fullname
                """,
                uuid.uuid4().hex.upper(),
                username,
                fullname,
                password_hash,
            )
        return None if row is None else User(row["uuid"], row["username"], row["fullname"])

    async def update(
        self, username: str, fullname: str, password_hash: str, *, expected_hash: str
    ) -> User | None:
        """Set fullname and password if the stored hash is still ``expected_hash``.

        A compare-and-set: the caller proved a right to change the user as it was when it
        read ``expected_hash``; if someone changed the password since, nothing is written and
        None comes back, so the caller checks again against the new hash.
        """
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                """
                UPDATE users SET fullname = $2, password_hash = $3, updated_at = now()
                 WHERE username = $1 AND password_hash = $4
                RETURNING uuid, username, fullname
                """,
                username,
                fullname,
                password_hash,
                expected_hash,
            )
        return None if row is None else User(row["uuid"], row["username"], row["fullname"])

    async def get(self, username: str) -> User | None:
        """The user called ``username``, or None."""
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "SELECT uuid, username, fullname FROM users WHERE username = $1", username
            )
        return None if row is None else User(row["uuid"], row["username"], row["fullname"])

    async def password_hash(self, username: str) -> str | None:
        """The stored hash for ``username``, or None when there is no such user."""
        async with self._db.connection() as conn:
            value = await conn.fetchval(
                "SELECT password_hash FROM users WHERE username = $1", username
            )
        return None if value is None else str(value)

    async def replace_password_hash(self, username: str, old_hash: str, new_hash: str) -> bool:
        """Swap ``old_hash`` for ``new_hash`` only if it is still stored (a compare-and-set).

        Used to upgrade hashes made with older parameters on login, without ever overwriting a
        password that a concurrent PUT has just set.
        """
        async with self._db.connection() as conn:
            status = await conn.execute(
                "UPDATE users SET password_hash = $3 WHERE username = $1 AND password_hash = $2",
                username,
                old_hash,
                new_hash,
            )
        return status != "UPDATE 0"

    async def delete(self, username: str, *, expected_hash: str) -> bool:
        """Delete ``username`` if its stored hash is still ``expected_hash``; True when done."""
        async with self._db.connection() as conn:
            status = await conn.execute(
                "DELETE FROM users WHERE username = $1 AND password_hash = $2",
                username,
                expected_hash,
            )
        return status != "DELETE 0"
