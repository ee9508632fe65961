"""The HTTP surfaces of sds: v1 SDS, registration writes, v3 REST xDS, health and metrics."""
