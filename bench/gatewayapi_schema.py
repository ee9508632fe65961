"""How long sds.gatewayapi.schema takes to check and default 5,000 HTTPRoutes at startup.

Runs in this process, from a cold start of the module: the first call loads the HTTPRoute
schema (the CRD's when it is in sds/gatewayapi/crds/, else our built-in one; the output says
which) and builds its validator; then each route, a typical two-rule HTTPRoute with its own
name, is validated and defaulted as the translator would. Run it under the heavy lock:

    flock /tmp/envoymesh-heavy.lock .venv/bin/python bench/gatewayapi_schema.py [--routes N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any


def route(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": f"route-{i}", "namespace": f"team-{i % 50}"},
        "spec": {
            "parentRefs": [{"name": "edge", "namespace": "infra", "sectionName": "https"}],
            "hostnames": [f"svc-{i}.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": f"/api/v{i % 3}"}}],
                    "backendRefs": [{"name": f"svc-{i}", "port": 8080}],
                },
                {
                    "matches": [
                        {
                            "path": {"type": "Exact", "value": "/health"},
                            "headers": [{"name": "x-env", "value": "prod"}],
                        }
                    ],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-route", "value": "a"}]},
                        }
                    ],
                    "backendRefs": [
                        {"name": f"svc-{i}", "port": 8080, "weight": 90},
                        {"name": f"svc-{i}-canary", "port": 8080, "weight": 10},
                    ],
                },
            ],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=5000)
    args = parser.parse_args()
    routes = [route(i) for i in range(args.routes)]

    started = time.perf_counter()
    from sds.gatewayapi import schema  # noqa: PLC0415 - the import is part of the cold start

    imported = time.perf_counter()
    assert schema.validate(routes[0]) == []
    first = time.perf_counter()
    per_route: list[float] = []
    for document in routes:
        t0 = time.perf_counter()
        errors = schema.validate(document)
        schema.with_defaults(document)
        per_route.append(time.perf_counter() - t0)
        assert errors == [], errors
    done = time.perf_counter()

    per_route.sort()
    print(f"python {platform.python_version()} on {platform.machine()}, {args.routes} routes")
    print(f"schemas: {schema.source()}")
    print(f"import sds.gatewayapi.schema: {(imported - started) * 1e3:.1f} ms")
    print(f"first validate (schema load + validator build): {(first - imported) * 1e3:.1f} ms")
    print(
        f"validate + with_defaults per route: median {statistics.median(per_route) * 1e6:.0f} us,"
        f" p99 {per_route[int(len(per_route) * 0.99)] * 1e6:.0f} us"
    )
    print(f"all {args.routes} routes, cold start included: {(done - started):.2f} s")


if __name__ == "__main__":
    main()
