"""Translation: the store's objects become Envoy resources, one module per xDS type."""
