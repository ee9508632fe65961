"""Who may change a user: the user itself (HTTP Basic) or the admin (a bearer token).

The two schemes are FastAPI security dependencies, so the OpenAPI document declares them on the
operations that use them. Basic credentials are decoded as UTF-8 (RFC 7617's charset), so any
password usersvc accepts can also be presented in a Basic header. Nothing here logs a secret.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode

from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials
from fastapi.security import HTTPBearer as _HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import SecretStr
from starlette.requests import HTTPConnection

REALM = "usersvc"
CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}


def unauthorized(message: str) -> HTTPException:
    """A 401 carrying the Basic challenge."""
    return HTTPException(status_code=401, detail=message, headers=CHALLENGE)


class Basic(HTTPBasic):
    """HTTP Basic, optional: None without a Basic header, 401 when it cannot be decoded."""

    def __init__(self) -> None:
        super().__init__(
            scheme_name="basic",
            realm=REALM,
            description="The user's own name and current password.",
            auto_error=False,
        )

    async def __call__(self, request: HTTPConnection) -> HTTPBasicCredentials | None:  # type: ignore[override]
        try:
            return basic_credentials(request.headers.get("authorization"))
        except MalformedCredentials as exc:
            raise unauthorized(str(exc)) from None


class MalformedCredentials(ValueError):
    """An ``authorization`` value that says Basic but does not decode to ``name:password``."""


def basic_credentials(authorization: str | None) -> HTTPBasicCredentials | None:
    """The Basic credentials in an ``authorization`` value (HTTP header or gRPC metadata).

    None without one or for another scheme; :class:`MalformedCredentials` when undecodable.
    """
    scheme, param = get_authorization_scheme_param(authorization)
    if scheme.lower() != "basic":
        return None
    try:
        decoded = b64decode(param, validate=True).decode("utf-8")
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        raise MalformedCredentials("malformed Basic credentials") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise MalformedCredentials("malformed Basic credentials")
    return HTTPBasicCredentials(username=username, password=password)


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """The bearer token in an ``authorization`` value, as :class:`Bearer` reads it; or None."""
    scheme, param = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not param:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=param)


class Bearer(_HTTPBearer):
    """A bearer token, optional: None without one."""

    def __init__(self) -> None:
        super().__init__(
            scheme_name="admin",
            description="The admin token (USERSVC_ADMIN_TOKEN): may change or delete any user.",
            auto_error=False,
        )


def same_text(given: str, expected: str) -> bool:
    """Equality in time that does not depend on where the two first differ."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def is_admin(bearer: HTTPAuthorizationCredentials | None, admin_token: SecretStr | None) -> bool:
    """True when ``bearer`` carries the admin token (never when no admin token is set)."""
    if bearer is None or admin_token is None or not admin_token.get_secret_value():
        return False
    return same_text(bearer.credentials, admin_token.get_secret_value())
