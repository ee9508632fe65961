"""One-shot fetches (REST polling and gRPC ``FetchEndpoints``): no stream, one answer."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from sds import metrics
from sds.errors import InvalidInput, NotSynced
from sds.xds.cache import Answer, XdsCache
from sds.xds.node import gateway_of
from sds.xds.resources import CONFIG_TYPE_URLS, EDS_TYPE_URL, WILDCARD_TYPE_URLS
from sds.xds.subscription import DEFAULT_MAX_NAMES, Subscription, SubscriptionError

NOT_SYNCED = "sds has not synced its sources yet; keep what you have and retry"


def _subscribe(subscription: Subscription, names: list[str]) -> None:
    try:
        subscription.replace(names)
    except SubscriptionError as exc:
        metrics.XDS_REFUSED.labels("too_many_names" if exc.exhausted else "invalid_name").inc()
        raise InvalidInput(str(exc)) from None


def fetch(
    cache: XdsCache,
    request: discovery_pb2.DiscoveryRequest,
    subscription: Subscription | None = None,
    *,
    type_url: str = EDS_TYPE_URL,
    max_names: int = DEFAULT_MAX_NAMES,
) -> Answer | None:
    """The answer for the request's resources; None when its ``version_info`` is current.

    ``subscription`` is the client's own (REST pollers keep theirs, so a plain name they
    resolved keeps its target while it is ambiguous); a fresh one of at most ``max_names``
    otherwise. An empty list of names means no resources, as on every transport, except for
    the Listener and Cluster wildcard. Raises :class:`InvalidInput` for a type the endpoint
    does not serve or a refused name list, :class:`NotSynced` while every requested resource
    is withheld (a client that had resources, asking while sources sync).
    """
    if request.type_url not in ("", type_url):
        raise InvalidInput(f"only {type_url} is served here, not {request.type_url}")
    if type_url in CONFIG_TYPE_URLS:
        return _fetch_config(cache, request, type_url, max_names)
    if subscription is None:
        subscription = Subscription(max_names)
    _subscribe(subscription, list(request.resource_names))
    subscription.resolve(cache.resolve)
    items = cache.items(subscription)
    # Each poll repeats the version the client last accepted: that says what it has.
    had = cache.had(EDS_TYPE_URL, items, request.version_info)
    answer, withheld = cache.answer(EDS_TYPE_URL, items, had)
    if withheld:
        metrics.XDS_WITHHELD.labels("rest").inc(withheld)
        if not answer.resources:
            raise NotSynced(NOT_SYNCED)
    if request.version_info == answer.version:
        return None
    return answer


def _fetch_config(
    cache: XdsCache, request: discovery_pb2.DiscoveryRequest, type_url: str, max_names: int
) -> Answer | None:
    """Listeners, RouteConfigurations or Clusters of the node's Gateway."""
    subscription = Subscription(max_names, legacy_wildcard=type_url in WILDCARD_TYPE_URLS)
    _subscribe(subscription, list(request.resource_names))
    gateway = gateway_of(request.node)
    desired = cache.translator.resources(gateway, type_url) if gateway is not None else {}
    chosen = [
        desired[name]
        for name in sorted(desired)
        if subscription.wildcard or name in subscription.names
    ]
    # The answer is the whole set: while sources sync, one that had ours must not shrink.
    had = request.version_info and not cache.issued(request.version_info)
    if had and not cache.registry.ready:
        metrics.XDS_WITHHELD.labels("rest").inc()
        raise NotSynced(NOT_SYNCED)
    answer = cache.shared_answer(type_url, chosen)
    if request.version_info == answer.version:
        return None
    return answer
