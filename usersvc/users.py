"""The user rules both APIs apply: who may read, create, change and delete a user.

The HTTP and the gRPC surface turn a request into a call here and map the errors
(:class:`UserError` and its kinds, :class:`usersvc.passwords.HashingBusy`,
:class:`usersvc.ratelimit.TooManyFailures`, :class:`usersvc.db.DatabaseUnavailable`) to their
own status codes, once each. Creating a user is open; changing or deleting an existing one
needs that user's own Basic credentials or the admin token.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from fastapi.security import HTTPAuthorizationCredentials, HTTPBasicCredentials
from pydantic import SecretStr

from usersvc import auth, passwords, ratelimit
from usersvc.store import User, UserStore

log = logging.getLogger("usersvc")

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
USERNAME_RULE = "must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
# fullmatch, not the anchors: Python's ``$`` would also match before a trailing newline.
_USERNAME = re.compile(USERNAME_PATTERN.removeprefix("^").removesuffix("$"))
MAX_FULLNAME = 2048
MAX_PASSWORD = 1024
# A change re-reads the user when its password changed under it; this often, then Conflict.
CHANGE_ATTEMPTS = 3


def bad_text(value: str) -> str | None:
    """Why ``value`` cannot be stored as PostgreSQL text (UTF-8), or None when it can."""
    if "\x00" in value:
        return "must not contain NUL (U+0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain lone surrogates (not valid Unicode)"
    return None


class UserError(Exception):
    """A request the rules refuse; ``message`` is safe to show the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(UserError):
    """A field breaks the rules (HTTP validates with its own models, so only gRPC sees this)."""


class NotFound(UserError):
    """No such user."""


class Unauthenticated(UserError):
    """No credentials, undecodable ones, or a wrong password."""


class WrongUser(Unauthenticated):
    """Credentials that name another user: they can never change this one, whatever their
    password (which is checked against this user's hash only, so nothing is learnt of it)."""


class Conflict(UserError):
    """The user kept changing under the request."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the caller presented: Basic credentials, a bearer token, both or neither."""

    basic: HTTPBasicCredentials | None = None
    bearer: HTTPAuthorizationCredentials | None = None

    @classmethod
    def from_authorization(cls, authorization: str | None) -> Credentials:
        """Read one ``authorization`` value; :class:`Unauthenticated` for malformed Basic."""
        try:
            basic = auth.basic_credentials(authorization)
        except auth.MalformedCredentials as exc:
            raise Unauthenticated(str(exc)) from None
        return cls(basic=basic, bearer=auth.bearer_credentials(authorization))


def check_fields(username: str, fullname: str | None = None, password: str | None = None) -> None:
    """Raise :class:`InvalidInput` unless the fields are ones the HTTP API would accept."""
    fields = {"username": username, "fullname": fullname, "password": password}
    for name, value in fields.items():
        if value is not None and (problem := bad_text(value)):
            raise InvalidInput(f"{name}: {problem}")
    if not _USERNAME.fullmatch(username):
        raise InvalidInput(f"username: {USERNAME_RULE}")
    if fullname is not None and len(fullname) > MAX_FULLNAME:
        raise InvalidInput(f"fullname: must be at most {MAX_FULLNAME} characters")
    if password is not None and not 1 <= len(password) <= MAX_PASSWORD:
        raise InvalidInput(f"password: must be 1-{MAX_PASSWORD} characters")


class Users:
    """The rules over one store, hashing pool and failed-attempt limiter."""

    def __init__(
        self,
        store: UserStore,
        hashing: passwords.Hashing,
        failures: ratelimit.FailureLimiter,
        admin_token: SecretStr | None,
    ) -> None:
        self.store = store
        self.hashing = hashing
        self.failures = failures
        self._admin_token = admin_token

    async def authorize(self, key: tuple[str, str], stored: str, creds: Credentials) -> None:
        """Return when the caller may change user ``key[0]`` (whose hash is ``stored``).

        ``key`` is (username, client address), what failures are counted under. Else
        :class:`Unauthenticated`, or :class:`ratelimit.TooManyFailures` after too many failures
        from this client. The password is checked even when the name in the credentials is
        another user's, so every wrong answer costs the same argon2 verification as a wrong
        login.
        """
        if auth.is_admin(creds.bearer, self._admin_token):
            return
        if creds.basic is None and creds.bearer is None:
            raise Unauthenticated("credentials required to change an existing user")
        self.failures.check(key)
        if creds.basic is None:
            self.failures.failed(key)
            raise Unauthenticated("invalid credentials")
        same_user = auth.same_text(creds.basic.username, key[0])
        right_password = await self.hashing.verify(stored, creds.basic.password)
        if not (right_password and same_user):
            self.failures.failed(key)
            # HTTP answers both alike (a 401 as for a wrong login); gRPC tells them apart.
            kind = Unauthenticated if same_user else WrongUser
            raise kind("invalid username or password")
        self.failures.succeeded(key)

    async def get(self, username: str) -> User:
        """The user called ``username``; :class:`NotFound` when there is none."""
        user = await self.store.get(username)
        if user is None:
            raise NotFound(f"user {username} not found")
        return user

    async def put(
        self, username: str, fullname: str, password: str, creds: Credentials, client: str
    ) -> tuple[User, bool]:
        """Create ``username`` (anyone) or update it (owner or admin); True when created."""
        new_hash: str | None = None
        for _ in range(CHANGE_ATTEMPTS):
            stored = await self.store.password_hash(username)
            if stored is not None:
                await self.authorize((username, client), stored, creds)
                if (
                    creds.basic is not None
                    and auth.same_text(creds.basic.password, password)
                    and not passwords.needs_rehash(stored)
                ):
                    new_hash = stored  # the password just proven stays: no new hash to make
            new_hash = new_hash or await self.hashing.hash(password)
            if stored is None:
                user = await self.store.create(username, fullname, new_hash)
                if user is not None:
                    log.info("user created", extra={"username": username})
                    return user, True
            else:
                user = await self.store.update(username, fullname, new_hash, expected_hash=stored)
                if user is not None:
                    log.info("user updated", extra={"username": username})
                    return user, False
        raise Conflict(f"user {username} changed meanwhile; try again")

    async def delete(self, username: str, creds: Credentials, client: str) -> None:
        """Delete ``username`` (owner or admin); :class:`NotFound` when there is none."""
        for _ in range(CHANGE_ATTEMPTS):
            stored = await self.store.password_hash(username)
            if stored is None:
                raise NotFound(f"user {username} not found")
            await self.authorize((username, client), stored, creds)
            if await self.store.delete(username, expected_hash=stored):
                log.info("user deleted", extra={"username": username})
                return
        raise Conflict(f"user {username} changed meanwhile; try again")
