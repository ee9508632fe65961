"""The Gateway API from a cluster: Services and Gateway API objects, watched, become the config.

One :class:`~sds.sources.reflector.Reflector` per kind and scope lists and watches ``v1``
Services and the ``gateway.networking.k8s.io`` GatewayClasses, Gateways, HTTPRoutes, GRPCRoutes
(``v1``) and ReferenceGrants (``v1beta1``); each object is checked and defaulted with the CRD
schemas (:mod:`sds.gatewayapi.schema`) and parsed (:func:`sds.gatewayapi.model.parse`), and the
whole set is delivered to the registry as one :class:`GatewayConfig` under the ``kubernetes``
source, as the config directory delivers its files. The translation then ignores Gateways whose
GatewayClass names another controller.

A cluster without the Gateway API CRDs is normal: those kinds answer 404, are reported absent
by ``/readyz`` (which stays 200) and are looked for again now and then. A kind RBAC refuses
(403) is logged, counted, and named in ``/readyz``; the other kinds go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from sds.gatewayapi import model, schema
from sds.gatewayapi.model import ConfigObject, GatewayConfig, ObjectKey
from sds.registry import Registry
from sds.sources.reflector import ListCall, Reflector, WatchSettings, connect

log = logging.getLogger("sds.gateway_api")

CONFIG_SOURCE = "kubernetes"
"""The name the objects are delivered under (``registry.set_config``)."""
STATUS_NAME = "gateway-api"
"""This source's entry in ``/readyz``."""
GROUP = "gateway.networking.k8s.io"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
"""The label of the Service in front of a Gateway's Envoys: its addresses are the Gateway's."""


@dataclass(frozen=True, slots=True)
class WatchedKind:
    """One kind this source watches: its API group, version and resource name."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        """``group/version``, or the version alone for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> str:
        """``plural.group`` as RBAC names it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


KINDS: tuple[WatchedKind, ...] = (
    WatchedKind(model.SERVICE, "", "v1", "services"),
    WatchedKind(model.GATEWAY_CLASS, GROUP, "v1", "gatewayclasses", namespaced=False),
    WatchedKind(model.GATEWAY, GROUP, "v1", "gateways"),
    WatchedKind(model.HTTP_ROUTE, GROUP, "v1", "httproutes"),
    WatchedKind(model.GRPC_ROUTE, GROUP, "v1", "grpcroutes"),
    WatchedKind(model.REFERENCE_GRANT, GROUP, "v1beta1", "referencegrants"),
)


class _KindHandler:
    """The parser of one kind, feeding the source's object set."""

    def __init__(self, source: GatewayApiSource, watched: WatchedKind) -> None:
        self._source = source
        self._watched = watched

    def key_of(self, metadata: Mapping[str, Any]) -> ObjectKey:
        """The object's key from its metadata."""
        namespace = metadata.get("namespace", "") if self._watched.namespaced else ""
        return ObjectKey(self._watched.kind, namespace, metadata["name"])

    def parse(self, obj: Mapping[str, Any]) -> tuple[ObjectKey, ConfigObject | None]:
        """The object's key and typed object; None when the CRD schema refuses it."""
        metadata = obj["metadata"]
        key = self.key_of(metadata)
        if not self._watched.group:
            self._source.note_gateway_service(key, obj)
        if self._watched.group:
            self._source.statuses[key] = obj.get("status")
            self._source.resource_versions[key] = str(metadata.get("resourceVersion") or "")
            # A write of the status subresource leaves generation and labels alone: the
            # object need not be checked and parsed again.
            known = self._source.objects.get(key)
            if (
                known is not None
                and known.meta.generation == int(metadata.get("generation") or 1)
                and known.meta.labels
                == tuple(
                    sorted((str(k), str(v)) for k, v in (metadata.get("labels") or {}).items())
                )
            ):
                return key, known
        # List items of built-in kinds come without apiVersion and kind.
        document = {**obj, "apiVersion": self._watched.api_version, "kind": self._watched.kind}
        errors = schema.validate(document)
        if errors:
            log.warning(
                "object refused by its schema, not served",
                extra={"object": str(key), "path": errors[0].path, "error": errors[0].message},
            )
            return key, None
        return key, model.parse(schema.with_defaults(document))

    def listed(self, scope: str | None, fresh: dict[ObjectKey, ConfigObject]) -> dict[str, Any]:
        """Make ``fresh`` this kind's objects in ``scope``."""
        self._source.replace_scope(self._watched.kind, scope, fresh)
        return {}

    def changed(self, key: ObjectKey, value: ConfigObject | None) -> None:
        """One object added, modified or deleted."""
        self._source.put(key, value)

    def status_changed(self) -> None:
        """A reflector's state moved."""
        self._source.update_status()


class GatewayApiSource:
    """Keeps the registry's ``kubernetes`` config equal to the cluster's Gateway API objects."""

    def __init__(
        self,
        registry: Registry,
        *,
        namespaces: Sequence[str] = (),
        kube_api_url: str = "",
        kubeconfig: str = "",
        watch: WatchSettings | None = None,
    ) -> None:
        self._registry = registry
        self._scopes: tuple[str | None, ...] = tuple(dict.fromkeys(namespaces)) or (None,)
        self._kube_api_url = kube_api_url
        self._kubeconfig = kubeconfig
        self._settings = watch or WatchSettings()
        self._objects: dict[ObjectKey, ConfigObject] = {}
        self.gateway_addresses: dict[tuple[str, str], tuple[str, ...]] = {}
        """(namespace, Gateway name) -> the addresses of the Service labelled for it."""
        self._gateway_services: dict[ObjectKey, tuple[str, str]] = {}
        self.inputs_changed = asyncio.Event()
        """Set when status inputs that are not config move (a Gateway Service's addresses)."""
        self.statuses: dict[ObjectKey, Any] = {}
        """Each object's ``status`` as the cluster last showed it (what the writer compares)."""
        self.resource_versions: dict[ObjectKey, str] = {}
        """The ``resourceVersion`` that status came with: a status write sends it unread."""
        self._reflectors: list[Reflector[ObjectKey, ConfigObject]] = []
        self._delivery: asyncio.Handle | None = None
        self._status: tuple[bool, str] | None = None

    @property
    def objects(self) -> Mapping[ObjectKey, ConfigObject]:
        """Every object the cluster holds that this source serves, live (not a copy)."""
        return self._objects

    @property
    def config(self) -> GatewayConfig:
        """Every object the cluster holds that this source serves."""
        return GatewayConfig(dict(self._objects))

    async def run(self) -> None:
        """List and watch every kind until cancelled; the caller owns the task."""
        self._set_status(False, "waiting for the initial lists of Services and Gateway API")
        api_client = await self._connect()
        try:
            core = client.CoreV1Api(api_client)
            custom = client.CustomObjectsApi(api_client)
            self._reflectors = [
                Reflector(
                    kind=f"{watched.kind}s" if watched.kind != "GatewayClass" else "GatewayClasses",
                    resource=watched.resource,
                    rbac_hint=f"get, list and watch on {watched.resource}",
                    call=_call(core, custom, watched, scope),
                    handler=_KindHandler(self, watched),
                    settings=self._settings,
                    logger=log,
                    scope=scope,
                    absent_ok=bool(watched.group),
                )
                for watched in KINDS
                for scope in (self._scopes if watched.namespaced else (None,))
            ]
            async with asyncio.TaskGroup() as group:
                for reflector in self._reflectors:
                    group.create_task(
                        reflector.run(),
                        name=f"gateway-api-{reflector.kind}-{reflector.scope or '*'}",
                    )
        finally:
            if self._delivery is not None:
                self._delivery.cancel()
            await api_client.close()

    async def _connect(self) -> client.ApiClient:
        attempt = 0
        while True:
            try:
                return await connect(self._kube_api_url, self._kubeconfig)
            # Configuration loading fails in many library-specific ways; all mean: retry.
            except Exception as exc:
                reason = f"no usable Kubernetes API configuration: {exc}"
                log.error(reason, extra={"error": str(exc)})
                self._set_status(False, reason)
            await asyncio.sleep(self._settings.backoff.delay(attempt))
            attempt += 1

    # ----- the object set ------------------------------------------------------------------

    def replace_scope(
        self, kind: str, scope: str | None, fresh: Mapping[ObjectKey, ConfigObject]
    ) -> None:
        """Make ``fresh`` every object of ``kind`` in ``scope`` (None: all namespaces)."""
        for key in [
            k for k in self._objects if k.kind == kind and (scope is None or k.namespace == scope)
        ]:
            del self._objects[key]
        for key in [
            k for k in self.statuses if k.kind == kind and (scope is None or k.namespace == scope)
        ]:
            if key not in fresh:
                del self.statuses[key]
                self.resource_versions.pop(key, None)
        for key in [
            k
            for k in self._gateway_services
            if k.kind == kind and (scope is None or k.namespace == scope) and k not in fresh
        ]:
            self.note_gateway_service(key, None)
        self._objects.update(fresh)
        self._deliver_soon()

    def put(self, key: ObjectKey, value: ConfigObject | None) -> None:
        """One object added or replaced (``value``), or gone (None)."""
        if key.kind == model.SERVICE and value is None:
            self.note_gateway_service(key, None)
        if value is None:
            self.statuses.pop(key, None)
            self.resource_versions.pop(key, None)
            if self._objects.pop(key, None) is None:
                return
        elif self._objects.get(key) is value:
            return
        else:
            self._objects[key] = value
        self._deliver_soon()

    def note_gateway_service(self, key: ObjectKey, obj: Mapping[str, Any] | None) -> None:
        """Track the addresses of a Service labelled with a Gateway's name (None: gone)."""
        previous = self._gateway_services.pop(key, None)
        labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
        gateway_name = labels.get(GATEWAY_NAME_LABEL)
        before = dict(self.gateway_addresses)
        if previous is not None:
            self.gateway_addresses.pop(previous, None)
        if obj is not None and isinstance(gateway_name, str):
            target = (key.namespace, gateway_name)
            self._gateway_services[key] = target
            self.gateway_addresses[target] = _service_addresses(obj)
        if self.gateway_addresses != before:
            self.inputs_changed.set()

    def _deliver_soon(self) -> None:
        # The events of one read arrive without a pause: deliver them as one config.
        if self._delivery is None:
            self._delivery = asyncio.get_running_loop().call_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivery = None
        changed = self._registry.set_config(CONFIG_SOURCE, self.config)
        if changed:
            log.debug("Gateway API config changed", extra={"objects": len(changed)})

    # ----- status --------------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Every kind listed once (or refused): before that, a status could rest on objects
        not seen yet (a route's Service still being listed is not missing)."""
        # A refused kind does not hold the others back: they are served without it.
        return bool(self._reflectors) and all(r.synced or r.forbidden for r in self._reflectors)

    def update_status(self) -> None:
        """Recompute the ``/readyz`` entry from the reflectors' states."""
        reflectors = self._reflectors
        forbidden = [r.forbidden for r in reflectors if r.forbidden]
        absent = sorted({r.kind for r in reflectors if r.absent})
        errors = [r.last_error for r in reflectors if r.last_error and not r.synced]
        settled = self.settled
        parts = []
        if forbidden:
            parts.append(f"{len(forbidden)} kind(s) forbidden, first: {forbidden[0]}")
        if absent:
            parts.append(f"absent (Gateway API CRDs not installed): {', '.join(absent)}")
        if settled:
            self._set_status(True, "; ".join(parts))
        elif errors:
            self._set_status(False, f"initial lists failing: {errors[0]}")
        else:
            self._set_status(False, "waiting for the initial lists of Services and Gateway API")

    def _set_status(self, ready: bool, reason: str) -> None:
        if self._status == (ready, reason):
            return
        if ready and (self._status is None or not self._status[0]):
            log.info("Gateway API source ready", extra={"objects": len(self._objects)})
        self._status = (ready, reason)
        self._registry.set_source_status(STATUS_NAME, ready=ready, reason=reason)


def _service_addresses(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """A Service's load balancer addresses, else its cluster IPs."""
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ()
    found = [i.get("ip") or i.get("hostname") for i in ingress if isinstance(i, dict)]
    if not any(found):
        spec = obj.get("spec") or {}
        found = list(spec.get("clusterIPs") or [spec.get("clusterIP")])
    return tuple(a for a in found if isinstance(a, str) and a and a != "None")


def _call(
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    watched: WatchedKind,
    scope: str | None,
) -> ListCall:
    """The list/watch call of one kind in one scope."""

    def call(**params: Any) -> Any:
        params["_preload_content"] = False
        if not watched.group:
            if scope is None:
                return core.list_service_for_all_namespaces(**params)
            return core.list_namespaced_service(scope, **params)
        if scope is None:
            return custom.list_cluster_custom_object(
                watched.group, watched.version, watched.plural, **params
            )
        return custom.list_namespaced_custom_object(
            watched.group, watched.version, scope, watched.plural, **params
        )

    return call
