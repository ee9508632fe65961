"""What a proxy's node says about it: which Gateway it serves."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from sds.gatewayapi.model import GATEWAY, ObjectKey

# The node metadata field naming the Gateway a proxy serves (``namespace/name``).
GATEWAY_METADATA = "envoymesh.io/gateway"


def gateway_of(node: base_pb2.Node) -> ObjectKey | None:
    """The Gateway a node serves, from its metadata; None for an endpoints-only proxy."""
    value = node.metadata.fields.get(GATEWAY_METADATA)
    if value is None or not value.string_value:
        return None
    namespace, _, name = value.string_value.partition("/")
    if not name:
        namespace, name = "default", namespace
    return ObjectKey(GATEWAY, namespace, name)
