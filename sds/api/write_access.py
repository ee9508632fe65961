"""Who may write to the registration API.

Writes need a bearer token: ``SDS_WRITE_TOKEN`` may write every service, and each line of the
``--write-tokens-file`` (``token service-glob[,service-glob...]``) gives one token the services
its globs match. Without any token, writes are refused unless the operator opted out with
``--allow-anonymous-writes``. Tokens are kept only as SHA-256 digests and every digest is
compared in constant time, so neither a token's content nor which line matched shows in the
timing; tokens never reach a log line or an error message.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from sds.api.errors import ApiError

_GLOB = re.compile(r"^[A-Za-z0-9_*?\[\]!.-]{1,253}$")
_TOKEN = re.compile(r"^[\x21-\x7e]{1,4096}$")  # what fits a bearer header, no spaces


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and line, never a token."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One token (as a SHA-256 digest) and the service globs it may write."""

    digest: bytes
    globs: tuple[str, ...]

    def covers(self, service: str) -> bool:
        """Whether this token may write ``service``."""
        return any(fnmatch.fnmatchcase(service, glob) for glob in self.globs)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens_file(path: Path, text: str) -> list[Grant]:
    """Grants from the text of a tokens file; ``#`` starts a comment line."""
    grants: list[Grant] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, _, rest = line.partition(" ")
        globs = tuple(g.strip() for g in rest.replace(" ", ",").split(",") if g.strip())
        where = f"{path}:{number}"
        if not _TOKEN.match(token):
            raise TokenFileError(f"{where}: the token has characters a bearer header cannot hold")
        if not globs:
            raise TokenFileError(f"{where}: a token needs at least one service glob after it")
        for glob in globs:
            if not _GLOB.match(glob):
                raise TokenFileError(
                    f"{where}: {glob[:80]!r} is not a service glob (letters, digits, -_. *?[])"
                )
        grants.append(Grant(_digest(token), globs))
    return grants


def read_tokens_file(path: Path) -> list[Grant]:
    """Grants from the tokens file at ``path`` (blocking: call it off the event loop)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: cannot read the write tokens file: {exc}") from None
    return parse_tokens_file(path, text)


class WriteAccess:
    """Decides whether a write to one service may go ahead."""

    def __init__(
        self,
        token: SecretStr | None,
        tokens_file: str = "",
        *,
        allow_anonymous: bool = False,
    ) -> None:
        self._single = [Grant(_digest(token.get_secret_value()), ("*",))] if token else []
        self.tokens_file = Path(tokens_file) if tokens_file else None
        self.allow_anonymous = allow_anonymous
        self._from_file = read_tokens_file(self.tokens_file) if self.tokens_file else []

    @property
    def token_count(self) -> int:
        """How many tokens are configured (the single one and the file's)."""
        return len(self._single) + len(self._from_file)

    def reload(self) -> int:
        """Re-read the tokens file; on an error the tokens in use stay. Returns the count."""
        if self.tokens_file is not None:
            self._from_file = read_tokens_file(self.tokens_file)
        return self.token_count

    def check(self, authorization: str | None, service: str) -> None:
        """Return when the write may go ahead; raise a 401 or 403 :class:`ApiError` if not.

        With ``allow_anonymous`` a request without credentials passes; one that presents a
        token must still present a valid one, so tokens can be rolled out before the opt-out
        is dropped.
        """
        grants = self._single + self._from_file
        if self.allow_anonymous and not (authorization and grants):
            return
        if not grants:
            raise ApiError(
                403,
                "registration writes are disabled: this sds has no write token. Set"
                " SDS_WRITE_TOKEN (or --write-tokens-file) and send 'Authorization: Bearer"
                " <token>', or start sds with --allow-anonymous-writes on a trusted network",
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "a valid 'Authorization: Bearer <token>' is required for writes")
        digest = _digest(given.strip())
        matched: list[Grant] = []
        for grant in grants:  # no early exit: the time taken says nothing about the match
            if hmac.compare_digest(digest, grant.digest):
                matched.append(grant)
        if not matched:
            raise ApiError(401, "a valid 'Authorization: Bearer <token>' is required for writes")
        if not any(grant.covers(service) for grant in matched):
            raise ApiError(403, f"this token may not write service {service[:80]!r}")
