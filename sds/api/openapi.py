"""The OpenAPI document says what sds really answers.

Routes declare the errors their handlers raise (:func:`errors`); :func:`install` adds what
the layers in front of every route answer: 400 from the text guard and the request checks
(FastAPI would document those as 422, which sds never sends) and 413 from the body limit.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer of sds."""

    error: str = Field(description="what went wrong, for a human")


_MEANING = {
    400: "invalid input: a bad name, address, field or bound; text that is not clean UTF-8"
    " (NUL, lone surrogate) in the path, query or body",
    401: "no valid `Authorization: Bearer <token>`",
    403: "no write token is configured (the message names the fix), or the token may not"
    " write this service",
    404: "no such host registered",
    409: "a bound is reached (--max-hosts-per-service, --max-services)",
    413: "request body larger than 1 MiB",
    415: "body neither JSON nor a form",
    503: "sds has not synced its sources yet; keep what you have and retry",
}

BEARER_SCHEME = "writeToken"
WRITE_SECURITY: dict[str, Any] = {"security": [{BEARER_SCHEME: []}]}
_BODY_METHODS = frozenset({"post", "put", "patch", "delete"})


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each code with the JSON error body and its meaning."""
    return {code: {"model": ErrorBody, "description": _MEANING[code]} for code in codes}


def _error(code: int) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {"description": _MEANING[code], "content": {"application/json": {"schema": schema}}}


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the answers of every layer, not just the handlers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        for operations in document.get("paths", {}).values():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses.setdefault("400", _error(400))
                if method in _BODY_METHODS:
                    responses.setdefault("413", _error(413))
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas["ErrorBody"] = ErrorBody.model_json_schema()
        components["securitySchemes"] = {
            BEARER_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "SDS_WRITE_TOKEN, or a token of --write-tokens-file that may"
                " write the service",
            }
        }
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
