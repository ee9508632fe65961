"""``/ui``: the page, its assets, its JSON endpoints and its event stream (all read-only)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from sds.api.errors import ApiError
from sds.api.openapi import ErrorBody
from sds.ui import routes, views
from sds.ui.live import HEARTBEAT, PING, LiveHub, PushHistory, Subscriber

# No inline script or style, no eval, nothing from elsewhere: data can never become code.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PANELS = ("services", "proxies", "routes", "push")
# Open event streams at most; each costs a little memory and a write per delta.
MAX_CLIENTS = 32

Filter = Annotated[str, Query(max_length=200, description="substring to look for")]
Offset = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=views.MAX_PAGE)]

_BUSY: dict[int | str, dict[str, Any]] = {
    503: {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        "description": f"already {MAX_CLIENTS} open streams, or sds is stopping; retry later",
    }
}
_NO_ASSET: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such asset"}
}


class _Assets:
    """The static files, read once; the page names them by content hash, cached for good."""

    def __init__(self) -> None:
        files = resources.files("sds.ui") / "static"
        self.body = {name: (files / name).read_bytes() for name in ASSETS}
        self.version = {n: hashlib.sha256(b).hexdigest()[:12] for n, b in self.body.items()}
        page = (files / "index.html").read_text()
        for name, version in self.version.items():
            page = page.replace(f"/ui/static/{name}", f"/ui/static/{name}?v={version}")
        self.page = page


class EventStream(Response):
    """``text/event-stream`` fed by one subscriber, ended by the client, the hub or sds."""

    media_type = "text/event-stream"

    def __init__(self, hub: LiveHub, subscriber: Subscriber, first: bytes) -> None:
        super().__init__(
            headers={**SECURITY_HEADERS, "cache-control": "no-store", "x-accel-buffering": "no"}
        )
        # An endless body: no Content-Length (Response sets one for its empty body).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._hub, self._subscriber, self._first = hub, subscriber, first

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Write frames as they come, a ping when none came for a while."""
        subscriber = self._subscriber

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            subscriber.end()

        listener = asyncio.create_task(listen())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            body = self._first
            while not subscriber.ended:
                await send({"type": "http.response.body", "body": body, "more_body": True})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT):
                        await subscriber.ready.wait()
                body = subscriber.take() or PING
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            self._hub.unsubscribe(subscriber)


def ui_router(hub: LiveHub) -> APIRouter:
    """The live view's routes; not mounted at all with ``--ui off``."""
    router = APIRouter(tags=["ui"])
    assets = _Assets()

    def page() -> HTMLResponse:
        headers = {**SECURITY_HEADERS, "cache-control": "no-cache"}
        return HTMLResponse(assets.page, headers=headers)

    @router.get("/ui", response_class=HTMLResponse, summary="The live view of the mesh")
    async def index() -> HTMLResponse:
        return page()

    for name in PANELS:
        router.add_api_route(
            f"/ui/{name}",
            index,
            response_class=HTMLResponse,
            summary=f"The live view opened on its {name} panel (filter and page in the query)",
            name=f"ui_{name}",
        )

    @router.get(
        "/ui/static/{name}",
        summary="A script or style sheet of the page",
        response_class=Response,
        responses={
            200: {"content": {"text/javascript": {}, "text/css": {}}},
            **_NO_ASSET,
        },
    )
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise ApiError(404, "no such asset")
        return Response(
            assets.body[name],
            media_type=ASSETS[name],
            headers={**SECURITY_HEADERS, "cache-control": "public, max-age=31536000, immutable"},
        )

    @router.get(
        "/ui/api/services",
        summary="Services and their endpoints, filtered and paged",
        response_model=views.ServicesPage,
    )
    async def services(
        filter: Filter = "", offset: Offset = 0, limit: Limit = 50
    ) -> views.ServicesPage:
        return views.services_page(hub.registry, hub.seq, filter, offset, limit)

    @router.get(
        "/ui/api/proxies",
        summary="Connected proxies and how far each is in sync, filtered and paged",
        response_model=views.ProxiesPage,
    )
    async def proxies(
        filter: Filter = "",
        node: Annotated[str | None, Query(max_length=1000, description="exact node id")] = None,
        state: Literal["SYNCED", "STALE", "NACKED"] | None = None,
        offset: Offset = 0,
        limit: Limit = 50,
    ) -> views.ProxiesPage:
        return views.proxies_page(
            hub.tracker,
            hub.seq,
            text=filter,
            node=node,
            state=state,
            offset=offset,
            limit=limit,
        )

    @router.get(
        "/ui/api/routes",
        summary="Gateways, one page of the HTTPRoutes and GRPCRoutes, and refused config files",
        description="Routes show, per parent (a Gateway or a Service), the Accepted and "
        "ResolvedRefs conditions with their reasons, and per rule the clusters it sends to with "
        "their weights (a null cluster is an invalid backend, answered with 500), as "
        "`/debug/config` does. `filter` matches a route's or a parent's `namespace/name` and a "
        "Gateway's; refused files are listed whatever the filter.",
        response_model=routes.RoutesPage,
    )
    async def routes_(
        filter: Filter = "",
        kind: Literal["HTTPRoute", "GRPCRoute"] | None = None,
        offset: Offset = 0,
        limit: Limit = 50,
    ) -> routes.RoutesPage:
        return routes.routes_page(
            hub.translator,
            hub.problems(),
            hub.seq,
            text=filter,
            kind=kind,
            offset=offset,
            limit=limit,
        )

    @router.get(
        "/ui/api/push",
        summary="Pushes per second and convergence (p50, p99) over the last five minutes",
        response_model=PushHistory,
    )
    async def push() -> PushHistory:
        return hub.sampler.history()

    @router.get(
        "/ui/api/events",
        summary="Server-Sent Events: a snapshot, then deltas of services, proxies, routes, pushes",
        response_class=EventStream,
        status_code=200,
        responses={200: {"content": {"text/event-stream": {}}}, **_BUSY},
    )
    async def events() -> Response:
        opened = hub.subscribe()
        if opened is None:
            raise ApiError(503, "too many open event streams; retry later")
        return EventStream(hub, *opened)

    return router
