"""Write the rendered Envoy configs that Kubernetes and Compose load.

Neither kustomize nor Compose can fill in the templates in ``envoy/`` at deploy time, so their
rendered copies are checked in; ``tests/test_deployment.py`` fails when a copy differs from
its template rendered with the values below. After editing a template or a value, run:

    .venv/bin/python k8s/render-envoy.py
"""

from __future__ import annotations

from pathlib import Path

from envoymesh.envoyconf import render

ROOT = Path(__file__).resolve().parent.parent

# The sidecar in every usersvc replica: the pod's entrance on 8080 (a non-root Envoy cannot
# bind 80), usersvc beside it on 127.0.0.1:5000. The same in a pod and in a Compose replica.
SIDECAR = {
    "NODE_ID": "usersvc-sidecar",
    "LISTEN_ADDRESS": "0.0.0.0",
    "LISTEN_PORT": 8080,
    "ADMIN_PORT": 9901,
    "APP_ADDRESS": "127.0.0.1",
    "APP_PORT": 5000,
}

# The edge: clients on 8000, admin on loopback 8001, endpoints pushed by sds over ADS.
EDGE = {
    "NODE_ID": "edge",
    "LISTEN_ADDRESS": "0.0.0.0",
    "LISTEN_PORT": 8000,
    "ADMIN_PORT": 8001,
    "ADS_API_TYPE": "GRPC",
    "SDS_GRPC_PORT": 18000,
}

# Kubernetes: sds names a Service `<name>.<namespace>`; the namespace is the overlays' one.
# Full DNS names: one lookup per refresh instead of a walk through the search domains.
K8S_EDGE_EDS = {
    **EDGE,
    "SERVICE_NAME": "usersvc.envoymesh",
    "SDS_ADDRESS": "sds.envoymesh.svc.cluster.local",
}
K8S_EDGE_STRICT_DNS = {
    key: EDGE[key] for key in ("NODE_ID", "LISTEN_ADDRESS", "LISTEN_PORT", "ADMIN_PORT")
} | {"UPSTREAM_HOST": "usersvc.envoymesh.svc.cluster.local", "UPSTREAM_PORT": 80}

# Compose: replicas register themselves under the plain name `usersvc`.
COMPOSE_EDGE_EDS = {**EDGE, "SERVICE_NAME": "usersvc", "SDS_ADDRESS": "sds"}

# Checked-in file (relative to the repository root) -> (template, values).
CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "k8s/base/envoy/sidecar.yaml": ("sidecar", SIDECAR),
    "k8s/overlays/eds/edge-eds.yaml": ("edge-eds", K8S_EDGE_EDS),
    "k8s/overlays/step1-strict-dns/edge-strict-dns.yaml": (
        "edge-strict-dns",
        K8S_EDGE_STRICT_DNS,
    ),
    "compose/envoy/sidecar.yaml": ("sidecar", SIDECAR),
    "compose/envoy/edge-eds.yaml": ("edge-eds", COMPOSE_EDGE_EDS),
}


def main() -> None:
    """Render every entry of :data:`CONFIGS` into its file."""
    for relative, (template, values) in CONFIGS.items():
        path = ROOT / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(template, values))
        print(f"wrote {relative} from envoy/{template}.yaml")


if __name__ == "__main__":
    main()
