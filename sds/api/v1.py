"""Envoy's v1 SDS read API (``GET /v1/registration/...``), lyft/discovery's answer shape.

Answers are rendered once per service version and served from cache; a weak ``ETag`` lets
pollers get a 304 when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response

from sds import validation
from sds.errors import ApiError
from sds.model import Endpoint, ServiceSnapshot
from sds.registry import Registry


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


class V1Api:
    """Read-only v1 routes over the registry."""

    def __init__(self, registry: Registry, env: str) -> None:
        self._registry = registry
        self._env = env
        self._cache: dict[str, tuple[ServiceSnapshot, bytes, str]] = {}

    def _render(self, name: str) -> tuple[bytes, str]:
        snap = self._registry.snapshot(self._registry.resolve(name))
        cached = self._cache.get(name)
        if cached is not None and cached[0] is snap:
            return cached[1], cached[2]
        hosts = [host_json(snap.name, e) for e in snap.healthy]
        body = json.dumps(
            {"service": name, "env": self._env, "hosts": hosts}, separators=(",", ":")
        ).encode()
        # Weak: identifies what a proxy routes on, so heartbeats (last_check_in) keep it, and a
        # content hash, so it means the same on every sds replica and after a restart.
        routed = [{k: v for k, v in h.items() if k != "last_check_in"} for h in hosts]
        digest = hashlib.sha256(json.dumps([name, routed], sort_keys=True).encode())
        etag = f'W/"{digest.hexdigest()[:20]}"'
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[name] = (snap, body, etag)
        return body, etag

    def router(self) -> APIRouter:
        """The routes, ready to include in the app."""
        router = APIRouter(tags=["v1 SDS"])

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

        @router.get(
            "/v1/registration/{service}",
            summary="Healthy hosts of a service (Envoy v1 SDS)",
            responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}},
        )
        async def registration(service: str, request: Request) -> Response:
            validation.service_name(service, qualified=True)
            snap = self._registry.snapshot(self._registry.resolve(service))
            if not snap.healthy and not self._registry.ready:
                # Not learned yet is not "no hosts": v1 clients keep their hosts on a non-200.
                raise ApiError(503, "sds has not synced its sources yet; keep your hosts and retry")
            body, etag = self._render(service)
            if etag_matches(request.headers.get("if-none-match"), etag):
                return Response(status_code=304, headers={"etag": etag})
            return Response(body, media_type="application/json", headers={"etag": etag})

        return router
