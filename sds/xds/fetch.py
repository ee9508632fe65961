"""One-shot fetches (REST polling and gRPC ``FetchEndpoints``): no stream, one answer."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from sds import metrics
from sds.errors import ApiError, bad_request
from sds.xds.cache import Answer, XdsCache
from sds.xds.resources import EDS_TYPE_URL
from sds.xds.subscription import Subscription, SubscriptionError


def fetch(
    cache: XdsCache,
    request: discovery_pb2.DiscoveryRequest,
    subscription: Subscription | None = None,
) -> Answer | None:
    """The answer for the request's resources; None when its ``version_info`` is current.

    ``subscription`` is the client's own (REST pollers keep theirs, so a plain name they
    resolved keeps its target while it is ambiguous); a fresh one otherwise. An empty list
    of names means no resources, as on every transport. Raises :class:`ApiError`: 400 for a
    type other than ClusterLoadAssignment or a refused name list, 503 while every requested
    resource is withheld (a client that had endpoints, asking while sources sync).
    """
    if request.type_url not in ("", EDS_TYPE_URL):
        raise bad_request(f"only {EDS_TYPE_URL} is served here, not {request.type_url}")
    if subscription is None:
        subscription = Subscription()
    try:
        subscription.replace(request.resource_names)
    except SubscriptionError as exc:
        metrics.XDS_REFUSED.labels("too_many_names" if exc.exhausted else "invalid_name").inc()
        raise bad_request(str(exc)) from None
    subscription.resolve(cache.resolve)
    items = cache.items(subscription)
    # Each poll repeats the version the client last accepted: that says what it has.
    had = cache.had(EDS_TYPE_URL, items, request.version_info)
    answer, withheld = cache.answer(EDS_TYPE_URL, items, had)
    if withheld:
        metrics.XDS_WITHHELD.labels("rest").inc(withheld)
        if not answer.resources:
            raise ApiError(503, "sds has not synced its sources yet; keep what you have and retry")
    if request.version_info == answer.version:
        return None
    return answer
