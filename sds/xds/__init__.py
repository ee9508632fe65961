"""v3 xDS endpoint discovery: REST-JSON and gRPC (state-of-the-world and delta)."""
