"""Errors the HTTP surfaces turn into 4xx answers with a JSON message."""

from __future__ import annotations


class ApiError(Exception):
    """A client error: ``status`` and a message for a human."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ApiError:
    """400 with ``message``."""
    return ApiError(400, message)
