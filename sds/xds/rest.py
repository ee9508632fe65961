"""REST-JSON xDS (``POST /v3/discovery:endpoints``) and the proxy status page.

Envoy's REST subscription polls with the version it last accepted; we answer 304 when that is
still current, so an idle mesh costs one tiny exchange per poll.
"""

from __future__ import annotations

from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from fastapi import APIRouter, Request, Response
from google.protobuf import json_format

from sds import metrics, validation
from sds.api.openapi import errors
from sds.errors import bad_request
from sds.xds.cache import XdsCache
from sds.xds.fetch import fetch
from sds.xds.proxies import ProxyTracker, listed


def xds_rest_router(cache: XdsCache, tracker: ProxyTracker) -> APIRouter:
    """The REST xDS endpoint and ``/debug/proxies``."""
    router = APIRouter()

    @router.post(
        "/v3/discovery:endpoints",
        tags=["v3 xDS"],
        summary="EDS over REST: a DiscoveryRequest in, a DiscoveryResponse out (JSON)",
        responses={304: {"description": "the request's version_info is current"}, **errors(503)},
    )
    async def discovery(request: Request) -> Response:
        document = validation.json_object(await request.body() or b"{}", "a DiscoveryRequest")
        try:
            req = json_format.ParseDict(
                document, discovery_pb2.DiscoveryRequest(), ignore_unknown_fields=True
            )
        except (json_format.ParseError, RecursionError) as exc:
            raise bad_request(f"not a DiscoveryRequest: {exc}") from None
        subscription = tracker.rest_subscription(req.node)
        answer = fetch(cache, req, subscription)
        status = tracker.rest_client(req.node, subscription)
        status.subscribed = listed(subscription.listed())
        status.last_version_acked = req.version_info
        if answer is None:
            status.last_version_sent = req.version_info
            return Response(status_code=304)
        status.last_version_sent = answer.version
        status.responses_sent += 1
        metrics.XDS_PUSHES.labels("rest").inc()
        return Response(cache.answer_json(answer), media_type="application/json")

    @router.get(
        "/debug/proxies",
        tags=["operations"],
        summary="Every connected proxy and how far it is in sync (like istioctl proxy-status)",
        description="With `node`, only that node's streams, each with what it was sent per "
        "resource type: subscribed names, the version of every resource sent, and nonces.",
    )
    async def proxies(node: str | None = None) -> dict[str, Any]:
        if node is None:
            return {"proxies": [p.as_json() for p in tracker.all()]}
        return {"proxies": [p.as_json(detail=True) for p in tracker.all() if p.node_id == node]}

    return router
