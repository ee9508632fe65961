"""The errors of sds's core: a small hierarchy that every surface maps once.

The core (sources, validation, the xDS cache and fetches) raises these and never an HTTP or
gRPC error. The HTTP surface maps them in :func:`sds.api.errors.http_status`, the gRPC
surface in :func:`sds.xds.grpc_server.grpc_code`.
"""

from __future__ import annotations


class SdsError(Exception):
    """Something sds refuses, with a message for a human (never holding a secret)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(SdsError):
    """The request or document is malformed or breaks a rule (HTTP 400, INVALID_ARGUMENT)."""


class LimitReached(SdsError):
    """A cap that protects sds was reached (HTTP 409, RESOURCE_EXHAUSTED)."""


class NotFound(SdsError):
    """What was named does not exist (HTTP 404, NOT_FOUND)."""


class NotSynced(SdsError):
    """sds has not synced its sources yet; the client should keep what it has and retry
    (HTTP 503, UNAVAILABLE)."""
