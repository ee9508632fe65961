"""Errors of the HTTP surface: the core's errors mapped to statuses, and its own refusals."""

from __future__ import annotations

from sds.errors import InvalidInput, LimitReached, NotFound, NotSynced, SdsError

_STATUS: dict[type[SdsError], int] = {
    InvalidInput: 400,
    LimitReached: 409,
    NotFound: 404,
    NotSynced: 503,
}


def http_status(exc: SdsError) -> int:
    """The HTTP status of a core error."""
    for kind, status in _STATUS.items():
        if isinstance(exc, kind):
            return status
    return 400


class ApiError(Exception):
    """A refusal only the HTTP surface makes (credentials, content types): status, message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
