"""REST-JSON xDS (``POST /v3/discovery:endpoints``, ``:clusters``, ``:listeners``,
``:routes``) and the proxy status page.

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
from sds.errors import InvalidInput
from sds.xds.cache import XdsCache
from sds.xds.fetch import fetch
from sds.xds.proxies import ProxyTracker, listed
from sds.xds.resources import CDS_TYPE_URL, EDS_TYPE_URL, LDS_TYPE_URL, RDS_TYPE_URL
from sds.xds.subscription import DEFAULT_MAX_NAMES

# REST path suffix -> the type it serves (Envoy's REST subscriptions use these paths).
REST_TYPES = {
    "endpoints": EDS_TYPE_URL,
    "clusters": CDS_TYPE_URL,
    "listeners": LDS_TYPE_URL,
    "routes": RDS_TYPE_URL,
}


def xds_rest_router(
    cache: XdsCache, tracker: ProxyTracker, max_names: int = DEFAULT_MAX_NAMES
) -> APIRouter:
    """The REST xDS endpoints (one per type) and ``/debug/proxies``."""
    router = APIRouter()

    def endpoint(path: str, type_url: str) -> None:
        async def discovery(request: Request) -> Response:
            document = validation.json_object(await request.body() or b"{}", "a DiscoveryRequest")
            try:
                req = json_format.ParseDict(
                    document, discovery_pb2.DiscoveryRequest(), ignore_unknown_fields=True
                )
            except (json_format.ParseError, RecursionError) as exc:
                raise InvalidInput(f"not a DiscoveryRequest: {exc}") from None
            subscription = tracker.rest_subscription(req.node, max_names)
            answer = fetch(cache, req, subscription, type_url=type_url, max_names=max_names)
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

        short = type_url.rsplit(".", 1)[-1]
        router.add_api_route(
            f"/v3/discovery:{path}",
            discovery,
            methods=["POST"],
            status_code=200,
            tags=["v3 xDS"],
            summary=f"{short}s over REST: a DiscoveryRequest in, a DiscoveryResponse out (JSON)",
            description="Listeners, RouteConfigurations and Clusters are those of the Gateway "
            "named in the node's metadata (`envoymesh.io/gateway`); a node naming none gets "
            "none."
            if type_url != EDS_TYPE_URL
            else "Endpoints of the named services.",
            responses={
                304: {"description": "the request's version_info is current"},
                **errors(503),
            },
        )

    for path, type_url in REST_TYPES.items():
        endpoint(path, type_url)

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
