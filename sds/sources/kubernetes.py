"""The Kubernetes source: EndpointSlices, listed and watched, become the registry's endpoints.

Each namespace (or the whole cluster) is one :class:`~sds.sources.reflector.Reflector`, with
client-go's list/watch discipline; this module is the EndpointSlice parser and the cache that
turns slices into services. Failures never empty a service: while the API server is
unreachable or refuses us, the registry keeps the last state we knew.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from sds import metrics
from sds.model import Endpoint, Health, IpFamily, Source, normalize_ip
from sds.registry import Registry
from sds.sources.reflector import Backoff, Reflector, WatchSettings, connect

__all__ = ["Backoff", "KubernetesSource", "WatchSettings"]

log = logging.getLogger("sds.kubernetes")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
STATUS_NAME = Source.KUBERNETES.value
RBAC_HINT = "get, list and watch on endpointslices.discovery.k8s.io"

_HEALTH_RANK = {Health.HEALTHY: 0, Health.DRAINING: 1, Health.UNHEALTHY: 2}

SliceKey = tuple[str, str]  # (namespace, slice name)


@dataclass(frozen=True, slots=True)
class _Slice:
    service: str  # canonical name, ``<service>.<namespace>``
    endpoints: tuple[Endpoint, ...]
    ambiguous_ports: tuple[str, ...] = ()  # several ports and no --port-name: none is used


class KubernetesSource:
    """Keeps the registry's ``kubernetes`` endpoints equal to the cluster's EndpointSlices.

    Each Service becomes the registry service ``<service>.<namespace>``; its endpoints are the
    union of its slices' addresses (of the address families ``ip_family`` allows) on the chosen
    port: the one named ``port_name``, else the slice's only port. A slice with several ports
    and no ``port_name`` contributes nothing: Kubernetes does not order them, so taking the first
    could send traffic to an admin or metrics port. Such services are logged and named in the
    source's status.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        namespaces: Sequence[str] = (),
        port_name: str = "",
        ip_family: IpFamily = IpFamily.BOTH,
        kube_api_url: str = "",
        kubeconfig: str = "",
        watch: WatchSettings | None = None,
    ) -> None:
        self._registry = registry
        self._scopes: tuple[str | None, ...] = tuple(dict.fromkeys(namespaces)) or (None,)
        self._port_name = port_name
        self._address_types = ip_family.address_types
        self._kube_api_url = kube_api_url.rstrip("/")
        self._kubeconfig = kubeconfig
        self._settings = watch or WatchSettings()
        self._slices: dict[SliceKey, _Slice] = {}
        self._service_slices: dict[str, set[SliceKey]] = {}
        self._reflectors: list[Reflector[SliceKey, _Slice]] = []
        self._ambiguous: dict[str, tuple[str, ...]] = {}  # service -> its ports
        self._status: tuple[bool, str] | None = None

    async def run(self) -> None:
        """List and watch until cancelled; the caller owns the task and awaits its end."""
        self._set_status(False, "waiting for the initial list of EndpointSlices")
        api_client = await self._connect()
        try:
            api = client.DiscoveryV1Api(api_client)
            self._reflectors = [self._reflector(api, scope) for scope in self._scopes]
            async with asyncio.TaskGroup() as group:
                for reflector in self._reflectors:
                    group.create_task(
                        reflector.run(), name=f"kubernetes-informer-{reflector.scope or '*'}"
                    )
        finally:
            await api_client.close()

    def _reflector(
        self, api: client.DiscoveryV1Api, scope: str | None
    ) -> Reflector[SliceKey, _Slice]:
        def call(**params: Any) -> Any:
            if scope is None:
                return api.list_endpoint_slice_for_all_namespaces(
                    label_selector=SERVICE_NAME_LABEL, _preload_content=False, **params
                )
            return api.list_namespaced_endpoint_slice(
                scope, label_selector=SERVICE_NAME_LABEL, _preload_content=False, **params
            )

        return Reflector(
            kind="EndpointSlices",
            resource="endpointslices.discovery.k8s.io",
            rbac_hint=RBAC_HINT,
            call=call,
            handler=self,
            settings=self._settings,
            logger=log,
            scope=scope,
        )

    async def _connect(self) -> client.ApiClient:
        attempt = 0
        while True:
            try:
                return await connect(self._kube_api_url, self._kubeconfig)
            # Configuration loading fails in many library-specific ways (missing files, bad
            # YAML, exec plugins); all of them mean the same: retry later.
            except Exception as exc:
                reason = f"no usable Kubernetes API configuration: {exc}"
                log.error(reason, extra={"error": str(exc)})
                self._set_status(False, reason)
            await asyncio.sleep(self._settings.backoff.delay(attempt))
            attempt += 1

    # ----- the reflector's handler -----------------------------------------------------------

    def key_of(self, metadata: Mapping[str, Any]) -> SliceKey:
        """A slice's key: its namespace and name."""
        return (metadata.get("namespace", ""), metadata.get("name", ""))

    def listed(self, scope: str | None, fresh: dict[SliceKey, _Slice]) -> dict[str, Any]:
        """Make the scope's slices ``fresh``; the figures for the list's log line."""
        changed = self._reconcile(scope, fresh)
        services, endpoints = self._counts()
        return {"services": services, "endpoints": endpoints, "changed_services": len(changed)}

    def changed(self, key: SliceKey, new: _Slice | None) -> None:
        """One slice added, modified (``new``) or deleted or without a service (None)."""
        old = self._put(key, new) if new is not None else self._drop(key)
        for name in {s.service for s in (old, new) if s is not None}:
            self._push(name)

    def status_changed(self) -> None:
        """A reflector's state moved: recompute the source's status."""
        self._update_status()

    def _push(self, name: str) -> None:
        self._registry.replace(Source.KUBERNETES, name, self._endpoints_of(name))
        if self._check_ports(name):
            self._update_status()

    # ----- the slice cache -----------------------------------------------------------------

    def _put(self, key: SliceKey, new: _Slice) -> _Slice | None:
        old = self._drop(key)
        self._slices[key] = new
        self._service_slices.setdefault(new.service, set()).add(key)
        return old

    def _drop(self, key: SliceKey) -> _Slice | None:
        old = self._slices.pop(key, None)
        if old is not None:
            keys = self._service_slices[old.service]
            keys.discard(key)
            if not keys:
                del self._service_slices[old.service]
        return old

    def _reconcile(self, scope: str | None, fresh: Mapping[SliceKey, _Slice]) -> set[str]:
        """Make the cache hold exactly ``fresh`` for ``scope``, then the registry the cache.

        Other namespaces' slices stay in the cache, so one namespace's relist leaves their
        services alone; services with no slice left are not in the mapping and are emptied.
        """
        for key in [k for k in self._slices if scope is None or k[0] == scope]:
            self._drop(key)
        for key, new in fresh.items():
            self._put(key, new)
        changed = self._registry.replace_source(
            Source.KUBERNETES, {name: self._endpoints_of(name) for name in self._service_slices}
        )
        moved = [n for n in {*self._ambiguous, *self._service_slices} if self._check_ports(n)]
        if moved:
            self._update_status()
        return changed

    def _check_ports(self, name: str) -> bool:
        """Track whether ``name`` has a slice with several ports and no --port-name to pick
        one; log when that changes, and return whether it did."""
        ports = sorted(
            {
                p
                for key in self._service_slices.get(name, ())
                for p in self._slices[key].ambiguous_ports
            }
        )
        if tuple(ports) == self._ambiguous.get(name, ()):
            return False
        if ports:
            self._ambiguous[name] = tuple(ports)
            log.warning(
                "service has several ports and no --port-name picks one: not served",
                extra={"service": name, "ports": ports},
            )
        else:
            del self._ambiguous[name]
            log.info("service ports no longer ambiguous", extra={"service": name})
        metrics.AMBIGUOUS_PORT_SERVICES.set(len(self._ambiguous))
        return True

    def _endpoints_of(self, name: str) -> tuple[Endpoint, ...]:
        """The service's endpoints over all its slices; a duplicate keeps its healthiest."""
        best: dict[tuple[str, int], Endpoint] = {}
        for key in sorted(self._service_slices.get(name, ())):
            for endpoint in self._slices[key].endpoints:
                address = (endpoint.address, endpoint.port)
                seen = best.get(address)
                if seen is None or _HEALTH_RANK[endpoint.health] < _HEALTH_RANK[seen.health]:
                    best[address] = endpoint
        return tuple(best.values())

    def _counts(self) -> tuple[int, int]:
        return len(self._service_slices), sum(len(s.endpoints) for s in self._slices.values())

    def parse(self, obj: Mapping[str, Any]) -> tuple[SliceKey, _Slice | None]:
        """The slice's key, and the slice when it names a service; raises when malformed."""
        metadata = obj["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        service = (metadata.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            return (namespace, name), None
        canonical = f"{service}.{namespace}"
        if obj.get("addressType") not in self._address_types:
            # FQDN slices name hosts, not addresses Envoy can use; the other family of a
            # dual-stack service is not wanted.
            return (namespace, name), _Slice(canonical, ())
        ports: Sequence[Mapping[str, Any]] = obj.get("ports") or ()
        if not self._port_name and len(ports) > 1:
            names = tuple(str(p.get("name") or p.get("port")) for p in ports)
            return (namespace, name), _Slice(canonical, (), names)
        return (namespace, name), _Slice(canonical, self._slice_endpoints(obj, ports))

    def _slice_endpoints(
        self, obj: Mapping[str, Any], ports: Sequence[Mapping[str, Any]]
    ) -> tuple[Endpoint, ...]:
        port = self._port_of(ports)
        if port is None:
            return ()
        canonical = _ipv4 if obj["addressType"] == "IPv4" else normalize_ip
        endpoints: list[Endpoint] = []
        for entry in obj.get("endpoints") or ():
            health = _health(entry.get("conditions") or {})
            zone = entry.get("zone") or ""
            for address in entry.get("addresses") or ():
                try:
                    ip = canonical(address)
                except ValueError:
                    continue
                endpoints.append(
                    Endpoint(
                        address=ip, port=port, source=Source.KUBERNETES, zone=zone, health=health
                    )
                )
        return tuple(endpoints)

    def _port_of(self, ports: Sequence[Mapping[str, Any]]) -> int | None:
        if self._port_name:
            chosen = next((p for p in ports if p.get("name") == self._port_name), None)
        else:
            chosen = ports[0] if len(ports) == 1 else None
        port = chosen.get("port") if chosen is not None else None
        return int(port) if port is not None else None

    # ----- status and failures -------------------------------------------------------------

    def _update_status(self) -> None:
        forbidden = [r.forbidden for r in self._reflectors if r.forbidden]
        errors = [r.last_error for r in self._reflectors if r.last_error]
        if forbidden:
            self._set_status(False, forbidden[0])
        elif self._reflectors and all(r.synced for r in self._reflectors):
            self._set_status(True, self._ports_reason())
        elif errors:
            self._set_status(False, f"initial list of EndpointSlices failing: {errors[0]}")
        else:
            self._set_status(False, "waiting for the initial list of EndpointSlices")

    def _ports_reason(self) -> str:
        """The services left unserved for want of --port-name, for /readyz; empty if none."""
        if not self._ambiguous:
            return ""
        shown = [f"{name} ({', '.join(ports)})" for name, ports in sorted(self._ambiguous.items())]
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        return (
            "not served, several ports and no --port-name to choose one: "
            + "; ".join(shown[:5])
            + more
        )

    def _set_status(self, ready: bool, reason: str) -> None:
        if self._status == (ready, reason):
            return
        if ready and (self._status is None or not self._status[0]):
            services, endpoints = self._counts()
            log.info(
                "Kubernetes source ready", extra={"services": services, "endpoints": endpoints}
            )
        self._status = (ready, reason)
        self._registry.set_source_status(STATUS_NAME, ready=ready, reason=reason)


def _ipv4(text: str) -> str:
    """``normalize_ip`` for an IPv4 slice, in C: at 100,000 addresses ipaddress is the cost.

    inet_pton accepts exactly the dotted quads ipaddress does (no leading zeros); anything
    else takes the general path, which raises ValueError as before.
    """
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
    except (OSError, TypeError):
        return normalize_ip(text)


def _health(conditions: Mapping[str, Any]) -> Health:
    """Per the API, an unset ``ready`` means ready; terminating-but-serving drains."""
    ready = conditions.get("ready")
    if ready is None or ready:
        return Health.HEALTHY
    if conditions.get("serving") and conditions.get("terminating"):
        return Health.DRAINING
    return Health.UNHEALTHY
