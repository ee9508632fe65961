"""The sds HTTP application: every HTTP surface over one registry."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from envoymesh.limits import BodySizeLimit
from sds import metrics
from sds.api import openapi
from sds.api.errors import ApiError, http_status
from sds.api.text_guard import TextGuard
from sds.errors import SdsError
from sds.registry import Registry

log = logging.getLogger("sds.http")

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class RequestMetrics:
    """Count requests by method, route template and status (pure ASGI: cheap on hot paths)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(scope["method"], path, str(status)).inc()


def ops_router(registry: Registry, started: float) -> APIRouter:
    """Liveness, readiness and Prometheus metrics."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthcheck", response_class=PlainTextResponse, summary="Liveness (lyft)")
    async def healthcheck() -> str:
        return "OK"

    @router.get("/v1/health", summary="Liveness (the tutorial's SDS)")
    async def health() -> dict[str, Any]:
        return {"ok": True, "msg": "SDS healthy!"}

    @router.get(
        "/readyz",
        summary="Ready once every source finished its initial sync",
        responses={
            503: {
                "description": "a source has not synced yet (the same body)",
                "content": {"application/json": {}},
            }
        },
    )
    async def readyz() -> JSONResponse:
        statuses = registry.source_statuses()
        ready = bool(statuses) and all(s.ready for s in statuses.values())
        now = time.monotonic()
        sources: dict[str, dict[str, Any]] = {}
        for name, s in statuses.items():
            sources[name] = {"ready": s.ready, "reason": s.reason}
            if not s.ready and s.until is not None:
                sources[name]["remaining_seconds"] = round(max(0.0, s.until - now), 1)
        return JSONResponse(
            {"ready": ready, "uptime_seconds": round(now - started, 3), "sources": sources},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        services, endpoints = registry.counts()
        metrics.REGISTRY_SERVICES.set(services)
        metrics.REGISTRY_ENDPOINTS.set(endpoints)
        metrics.REGISTRY_REVISION.set(registry.revision)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def create_app(registry: Registry, routers: Iterable[APIRouter]) -> FastAPI:
    """The FastAPI app with our error shape: 4xx/5xx answers are ``{"error": "..."}``."""
    app = FastAPI(title="sds", summary="The envoymesh discovery server", version="0.1.0")
    # Routes match in order: the hot read paths (v1 first) before the operational ones.
    for router in routers:
        app.include_router(router)
    app.include_router(ops_router(registry, time.monotonic()))
    openapi.install(app)

    @app.exception_handler(SdsError)
    async def on_core_error(_: Request, exc: SdsError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=http_status(exc))

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    # Innermost first: the text guard buffers bodies the size limit has already bounded.
    app.add_middleware(TextGuard)
    app.add_middleware(BodySizeLimit, max_bytes=1024 * 1024, extra_fields=dict)
    app.add_middleware(RequestMetrics)
    return app
