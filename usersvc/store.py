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

    async def upsert(self, username: str, fullname: str, password_hash: str) -> tuple[User, bool]:
        """Create or update ``username`` atomically; return the user and whether it is new.

        One statement, so concurrent PUTs of one username can never create two rows.
        """
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO users (uuid, username, fullname, password_hash)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (username) DO UPDATE
                   SET fullname = EXCLUDED.fullname,
                       password_hash = EXCLUDED.password_hash,
                       updated_at = now()
                RETURNING uuid, username, fullname, (xmax = 0) AS created
                """,
                uuid.uuid4().hex.upper(),
                username,
                fullname,
                password_hash,
            )
        assert row is not None
        return User(row["uuid"], row["username"], row["fullname"]), bool(row["created"])

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

    async def set_password_hash(self, username: str, password_hash: str) -> None:
        """Replace the stored hash (used to upgrade hashes made with older parameters)."""
        async with self._db.connection() as conn:
            await conn.execute(
                "UPDATE users SET password_hash = $2 WHERE username = $1", username, password_hash
            )

    async def delete(self, username: str) -> bool:
        """Delete ``username``; True when it existed."""
        async with self._db.connection() as conn:
            status = await conn.execute("DELETE FROM users WHERE username = $1", username)
        return status != "DELETE 0"
