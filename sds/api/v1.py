"""Envoy's v1 SDS read API (``GET /v1/registration/...``), lyft/discovery's answer shape.

Answers are rendered once per service version and served from cache; a weak ``ETag`` lets
pollers get a 304 when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sds import metrics, validation
from sds.api.openapi import errors
from sds.caching import Lru, still_current
from sds.errors import NotSynced, SdsError
from sds.model import Endpoint, ServiceSnapshot
from sds.registry import Registry

# A heartbeat moves only ``last_check_in``; answers show it at most this many seconds late.
CHECK_IN_REFRESH = 1.0
# Rendered and prepared answers kept (bounded LRUs).
ANSWER_CACHE_SIZE = 100_000


def host_json(service: str, endpoint: Endpoint) -> dict[str, Any]:
    """One host as Envoy's v1 SDS client and lyft/discovery's clients expect it."""
    tags: dict[str, Any] = dict(endpoint.tags)
    tags.update(az=endpoint.zone, canary=endpoint.canary, load_balancing_weight=endpoint.weight)
    if endpoint.region:
        tags["region"] = endpoint.region
    checked_in = (
        datetime.fromtimestamp(endpoint.last_check_in, UTC).isoformat()
        if endpoint.last_check_in is not None
        else None
    )
    return {
        "ip_address": endpoint.address,
        "port": endpoint.port,
        "tags": tags,
        "revision": endpoint.revision,
        "service": service,
        "service_repo_name": endpoint.service_repo_name,
        "last_check_in": checked_in,
    }


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2) of ``etag`` against an If-None-Match header."""
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/")
    return any(
        tag.strip() == "*" or tag.strip().removeprefix("W/") == opaque
        for tag in if_none_match.split(",")
    )


@dataclass(frozen=True, slots=True)
class _Rendered:
    snapshot: ServiceSnapshot
    body: bytes
    etag: str
    has_hosts: bool
    rendered_at: float


class V1Api:
    """Read-only v1 routes over the registry."""

    def __init__(self, registry: Registry, env: str) -> None:
        self._registry = registry
        self._env = env
        self._cache: Lru[str, _Rendered] = Lru(ANSWER_CACHE_SIZE)

    def _snapshot(self, name: str) -> ServiceSnapshot:
        return self._registry.snapshot(self._registry.resolve(name))

    def _render(self, name: str) -> _Rendered:
        """The answer for ``name``, rendered once per service version (see :mod:`sds.caching`).

        Heartbeats make new snapshots (for ``last_check_in``) without a new version; those
        re-render at most every CHECK_IN_REFRESH seconds and keep the ETag.
        """
        snap = self._snapshot(name)
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached is not None and still_current(
            cached.snapshot, snap, age=now - cached.rendered_at, refresh=CHECK_IN_REFRESH
        ):
            return cached
        hosts = [host_json(snap.name, e) for e in snap.healthy]
        body = json.dumps(
            {"service": name, "env": self._env, "hosts": hosts}, separators=(",", ":")
        ).encode()
        if cached is not None and still_current(cached.snapshot, snap):
            etag = cached.etag  # same routing, only check-in times moved
        else:
            # Weak: identifies what a proxy routes on (not last_check_in), and a content hash,
            # so it means the same on every sds replica and after a restart.
            routed = [{k: v for k, v in h.items() if k != "last_check_in"} for h in hosts]
            digest = hashlib.sha256(json.dumps([name, routed], sort_keys=True).encode())
            etag = f'W/"{digest.hexdigest()[:20]}"'
        rendered = _Rendered(snap, body, etag, bool(hosts), now)
        self._cache.put(name, rendered)
        return rendered

    def prepared(self, service: str, if_none_match: str | None = None) -> _Rendered:
        """The 200 answer for ``GET /v1/registration/{service}``.

        Raises :class:`~sds.errors.InvalidInput` for an invalid name; :class:`~sds.errors.NotSynced`
        for a service with no hosts
        while sources are still syncing (not learned yet is not "no hosts", and v1 clients
        keep their hosts on a non-200), unless the client's ETag shows it holds that very
        empty answer. A poll without an ETag cannot tell a fresh client from one that never
        sends ETags but has hosts, so it waits too.
        """
        validation.service_name(service, qualified=True)
        rendered = self._render(service)
        if (
            not rendered.has_hosts
            and not self._registry.ready
            and not etag_matches(if_none_match, rendered.etag)
        ):
            raise NotSynced("sds has not synced its sources yet; keep your hosts and retry")
        return rendered

    def still_valid(self, rendered: _Rendered, service: str) -> bool:
        """Whether a prepared answer for ``service`` may still be served as it is."""
        return (rendered.has_hosts or self._registry.ready) and still_current(
            rendered.snapshot,
            self._snapshot(service),
            age=time.monotonic() - rendered.rendered_at,
            refresh=CHECK_IN_REFRESH,
        )

    def answer(self, service: str, if_none_match: str | None) -> tuple[int, bytes, str]:
        """(status 200 or 304, body, ETag) for ``GET /v1/registration/{service}``.

        Raises as :meth:`prepared` does.
        """
        rendered = self.prepared(service, if_none_match)
        if etag_matches(if_none_match, rendered.etag):
            return 304, b"", rendered.etag
        return 200, rendered.body, rendered.etag

    def router(self) -> APIRouter:
        """The routes, ready to include in the app."""
        router = APIRouter(tags=["v1 SDS"])

        @router.get(
            "/v1/registration/{service}",
            summary="Healthy hosts of a service (Envoy v1 SDS)",
            responses={
                304: {"description": "unchanged since the ETag sent in If-None-Match"},
                **errors(503),
            },
        )
        async def registration(service: str, request: Request) -> Response:
            status, body, etag = self.answer(service, request.headers.get("if-none-match"))
            if status == 304:
                return Response(status_code=304, headers={"etag": etag})
            return Response(body, media_type="application/json", headers={"etag": etag})

        @router.get(
            "/v1/registration/repo/{service_repo_name}",
            summary="Hosts of every service built from one repository",
        )
        async def by_repo(service_repo_name: str) -> dict[str, Any]:
            hosts = [
                host_json(name, e)
                for name in self._registry.services()
                for e in self._registry.snapshot(name).healthy
                if e.service_repo_name == service_repo_name
            ]
            return {"service_repo_name": service_repo_name, "env": self._env, "hosts": hosts}

        return router


@dataclass(frozen=True, slots=True)
class _Ready:
    """A prepared 200 answer with its headers, valid as long as its rendering is."""

    rendered: _Rendered
    service: str
    headers: list[tuple[bytes, bytes]]


class V1FastPath:
    """Answers ``GET /v1/registration/{service}`` in front of the framework.

    Legacy pollers hit this one path far more than any other; the answer is a cached byte
    string, so the framework's per-request machinery would be most of the cost. Anything
    unusual (an error, another method or path) goes on to the app, which answers it the
    same way through :meth:`V1Api.answer`. Prepared answers follow their service's version
    (the rule of :mod:`sds.caching`); a heartbeat-only refresh of ``last_check_in`` shows
    within CHECK_IN_REFRESH seconds.
    """

    PREFIX = "/v1/registration/"
    ROUTE = "/v1/registration/{service}"

    def __init__(self, app: ASGIApp, api: V1Api) -> None:
        self.app = app
        self.api = api
        self._ready: Lru[str, _Ready] = Lru(ANSWER_CACHE_SIZE)
        self._counted = {
            status: metrics.HTTP_REQUESTS.labels("GET", self.ROUTE, str(status))
            for status in (200, 304)
        }

    def _prepare(self, path: str, service: str) -> _Ready | None:
        try:
            rendered = self.api.prepared(service)
        except SdsError:
            return None  # the app formats errors
        ready = _Ready(
            rendered,
            service,
            [
                (b"etag", rendered.etag.encode("latin-1")),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(rendered.body)).encode()),
            ],
        )
        self._ready.put(path, ready)
        return ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and path.startswith(self.PREFIX)
            and not scope["query_string"]  # the app checks and ignores queries
        ):
            ready = self._ready.get(path)
            if ready is None or not self.api.still_valid(ready.rendered, ready.service):
                service = path[len(self.PREFIX) :]
                ready = self._prepare(path, service) if service and "/" not in service else None
            if ready is not None:
                if_none_match = None
                for key, value in scope["headers"]:
                    if key == b"if-none-match":
                        if_none_match = value.decode("latin-1")
                if if_none_match is not None and etag_matches(if_none_match, ready.rendered.etag):
                    await send(
                        {"type": "http.response.start", "status": 304, "headers": ready.headers[:1]}
                    )
                    await send({"type": "http.response.body", "body": b""})
                    self._counted[304].inc()
                    return
                await send({"type": "http.response.start", "status": 200, "headers": ready.headers})
                await send({"type": "http.response.body", "body": ready.rendered.body})
                self._counted[200].inc()
                return
        await self.app(scope, receive, send)
