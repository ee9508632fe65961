"""The input side of our Gateway API support: the objects' schemas and what Envoy accepts.

``schema`` checks and defaults GatewayClass, Gateway, HTTPRoute, GRPCRoute, ReferenceGrant and
Service documents as the Kubernetes API server would; ``regex`` tells whether Envoy would
accept a regular expression as a ``safe_regex``.
"""
