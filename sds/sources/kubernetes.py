"""The Kubernetes source: EndpointSlices, listed and watched, become the registry's endpoints.

It behaves like client-go's reflector: list (paginated), then watch from the list's
resourceVersion with bookmarks; a stream that ends or drops is resumed from the last
resourceVersion seen; ``410 Gone`` means that version is compacted away, so it lists again and
reconciles, which removes services deleted meanwhile. A watch stream silent for longer than the
read timeout (bookmarks arrive about once a minute) is presumed dead and resumed; an event that
cannot be decoded relists rather than asking for the same resourceVersion again; a list whose
``continue`` token expired starts over unpaginated, so it always finishes. Failures never empty
a service: while the API server is unreachable or refuses us, the registry keeps the last state
we knew. Every timing lives in one :class:`WatchSettings`.

Responses are read raw (``_preload_content=False``) and parsed as plain JSON: building the
generated model objects for 100,000 endpoints would cost most of the start-up time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client, config

from sds import metrics
from sds.model import Endpoint, Health, IpFamily, Source, normalize_ip
from sds.registry import Registry

log = logging.getLogger("sds.kubernetes")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
STATUS_NAME = Source.KUBERNETES.value
RBAC_HINT = "get, list and watch on endpointslices.discovery.k8s.io"

_HEALTH_RANK = {Health.HEALTHY: 0, Health.DRAINING: 1, Health.UNHEALTHY: 2}
_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK"})
_MALFORMED = (KeyError, TypeError, AttributeError, ValueError)
_MIN_HEALTHY_STREAM = 1.0  # seconds

SliceKey = tuple[str, str]  # (namespace, slice name)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter between failed attempts."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
        base = min(self.maximum, self.initial * 2.0 ** min(attempt, 32))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How the source lists and watches: every timeout, size and backoff in one place.

    ``read_timeout`` bounds the silence on a watch stream: with bookmarks requested the API
    server sends something about once a minute, so two minutes of nothing means a dead
    connection (a NAT or load balancer dropped it without a reset). ``server_timeout`` is the
    ``timeoutSeconds`` asked of the server, jittered up to twice that (as client-go does) so
    replicas do not reconnect in step. ``max_event_bytes`` is client-go's limit on one decoded
    object (16 MiB), far above what etcd can store.
    """

    read_timeout: float = 120.0
    server_timeout: int = 300
    request_timeout: float = 60.0
    page_size: int = 500
    max_event_bytes: int = 16 * 1024 * 1024
    backoff: Backoff = field(default_factory=Backoff)


class UndecodableEvent(Exception):
    """A watch event that is not the JSON object it should be: the source lists again."""


class EventTooLarge(UndecodableEvent):
    """A watch event longer than ``WatchSettings.max_event_bytes``."""


class WatchSilent(Exception):
    """Nothing arrived on a watch stream for ``WatchSettings.read_timeout`` seconds."""


class ContinueExpired(Exception):
    """410 on a ``continue`` request: the list's snapshot is gone, the list must restart."""


class KubernetesApiError(Exception):
    """The API server answered with a failure ``Status`` (HTTP error or watch ERROR event)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Slice:
    service: str  # canonical name, ``<service>.<namespace>``
    endpoints: tuple[Endpoint, ...]
    ambiguous_ports: tuple[str, ...] = ()  # several ports and no --port-name: none is used


@dataclass(slots=True)
class _Cursor:
    """Where one informer loop (one namespace, or all of them) stands."""

    scope: str | None  # a namespace; None for all namespaces
    resource_version: str = ""  # empty: list before watching
    attempt: int = 0  # consecutive failures, for the backoff
    list_reason: str = "initial"
    restart_reason: str = ""  # why the next watch is a restart; empty for the first one

    @property
    def where(self) -> str:
        return f'in namespace "{self.scope}"' if self.scope else "cluster-wide"


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
        self._synced: set[str | None] = set()
        self._forbidden: dict[str | None, str] = {}
        self._ambiguous: dict[str, tuple[str, ...]] = {}  # service -> its ports
        self._last_error = ""
        self._status: tuple[bool, str] | None = None

    async def run(self) -> None:
        """List and watch until cancelled; the caller owns the task and awaits its end."""
        self._set_status(False, "waiting for the initial list of EndpointSlices")
        api_client = await self._connect()
        try:
            api = client.DiscoveryV1Api(api_client)
            async with asyncio.TaskGroup() as group:
                for scope in self._scopes:
                    group.create_task(
                        self._informer(api, _Cursor(scope)),
                        name=f"kubernetes-informer-{scope or '*'}",
                    )
        finally:
            await api_client.close()

    # ----- connection ----------------------------------------------------------------------

    async def _connect(self) -> client.ApiClient:
        attempt = 0
        while True:
            try:
                return client.ApiClient(await self._configuration())
            # Configuration loading fails in many library-specific ways (missing files, bad
            # YAML, exec plugins); all of them mean the same: retry later.
            except Exception as exc:
                reason = f"no usable Kubernetes API configuration: {exc}"
                log.error(reason, extra={"error": str(exc)})
                self._set_status(False, reason)
            await asyncio.sleep(self._delay(attempt))
            attempt += 1

    async def _configuration(self) -> client.Configuration:
        if self._kube_api_url:
            return client.Configuration(host=self._kube_api_url)
        configuration = client.Configuration()
        if self._kubeconfig:
            await config.load_kube_config(
                config_file=self._kubeconfig,
                client_configuration=configuration,
                persist_config=False,
            )
            return configuration
        try:
            # It reads the service account files: keep that off the event loop.
            await asyncio.to_thread(
                config.load_incluster_config, client_configuration=configuration
            )
        except config.ConfigException:
            await config.load_kube_config(client_configuration=configuration, persist_config=False)
        return configuration

    # ----- the informer loop ---------------------------------------------------------------

    async def _informer(self, api: client.DiscoveryV1Api, cursor: _Cursor) -> None:
        while True:
            try:
                if not cursor.resource_version:
                    await self._list(api, cursor)
                if await self._watch(api, cursor):
                    cursor.attempt = 0
                    continue
                delay = self._delay(cursor.attempt)
            except KubernetesApiError as exc:
                if exc.status != 410:
                    delay = self._failed(cursor, exc)
                else:
                    log.info(
                        "resourceVersion expired, listing again",
                        extra={"scope": cursor.where, "resource_version": cursor.resource_version},
                    )
                    if (delay := self._relist(cursor, "gone")) == 0:
                        continue
            except UndecodableEvent as exc:
                # The same resourceVersion would replay the same bytes: list instead, and watch
                # on from the list's version, past the bad event.
                metrics.API_ERRORS.labels(status="undecodable").inc()
                log.warning(
                    "undecodable watch event, listing again",
                    extra={
                        "scope": cursor.where,
                        "error": str(exc),
                        "resource_version": cursor.resource_version,
                    },
                )
                if (delay := self._relist(cursor, "undecodable")) == 0:
                    continue
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                delay = self._failed(cursor, exc)
            # A bug must not end discovery: report it loudly and start over with a list.
            except Exception as exc:
                log.exception("unexpected failure", extra={"scope": cursor.where})
                cursor.resource_version = ""
                delay = self._failed(cursor, exc)
            await asyncio.sleep(delay)
            cursor.attempt += 1

    def _relist(self, cursor: _Cursor, reason: str) -> float:
        """Forget the resourceVersion; 0 to list at once, else the pause before listing."""
        cursor.resource_version = ""
        cursor.list_reason = cursor.restart_reason = reason
        if cursor.attempt == 0:  # at once, unless this keeps happening
            cursor.attempt = 1
            return 0.0
        return self._delay(cursor.attempt)

    async def _list(self, api: client.DiscoveryV1Api, cursor: _Cursor) -> None:
        metrics.RELISTS.labels(reason=cursor.list_reason).inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            fresh, resource_version = await self._list_pages(api, cursor, self._settings.page_size)
        except ContinueExpired:
            # The snapshot behind the continue token was compacted while we paged (a large
            # list on a busy cluster). Paging again could expire again; one unpaginated list
            # always finishes, as client-go's pager does.
            log.info(
                "continue token expired mid-list, listing again unpaginated",
                extra={"scope": cursor.where},
            )
            metrics.RELISTS.labels(reason="continue_expired").inc()
            fresh, resource_version = await self._list_pages(api, cursor, 0)
        changed = self._reconcile(cursor.scope, fresh)
        cursor.resource_version = resource_version
        self._synced.add(cursor.scope)
        self._allowed(cursor)
        services, endpoints = self._counts()
        log.info(
            "listed EndpointSlices",
            extra={
                "scope": cursor.where,
                "reason": cursor.list_reason,
                "slices": len(fresh),
                "services": services,
                "endpoints": endpoints,
                "changed_services": len(changed),
                "resource_version": resource_version,
                "elapsed_s": round(loop.time() - started, 3),
            },
        )

    async def _list_pages(
        self, api: client.DiscoveryV1Api, cursor: _Cursor, page_size: int
    ) -> tuple[dict[SliceKey, _Slice], str]:
        """Every slice in scope, and the list's resourceVersion; ``page_size`` 0: one page."""
        fresh: dict[SliceKey, _Slice] = {}
        token = ""
        while True:
            async with asyncio.timeout(self._settings.request_timeout):
                try:
                    response = await self._open(
                        self._call(
                            api, cursor.scope, limit=page_size or None, _continue=token or None
                        )
                    )
                except KubernetesApiError as exc:
                    if token and exc.status == 410:
                        raise ContinueExpired(exc.message) from exc
                    raise
                try:
                    body = await response.read()
                finally:
                    response.release()
            page = json.loads(body)
            for item in page.get("items") or ():
                # Skipped, not fatal: a relist would meet the same object and never finish.
                try:
                    key, parsed = self._parse(item)
                except _MALFORMED as exc:
                    log.warning("skipping malformed EndpointSlice", extra={"error": repr(exc)})
                    continue
                if parsed is not None:
                    fresh[key] = parsed
            metadata = page.get("metadata") or {}
            token = metadata.get("continue") or ""
            if not token:
                break
        resource_version = metadata.get("resourceVersion") or ""
        if not resource_version:
            raise ValueError("EndpointSlice list without a resourceVersion")
        return fresh, resource_version

    async def _watch(self, api: client.DiscoveryV1Api, cursor: _Cursor) -> bool:
        """Follow one watch stream to its end; whether it was a healthy one.

        A stream that delivered nothing and ended at once is not: the caller then pauses, so a
        server that keeps closing streams is not hammered. A stream that fell silent for the
        read timeout is closed and counts as healthy: the caller resumes it at once.
        """
        if cursor.restart_reason:
            metrics.WATCH_RESTARTS.labels(reason=cursor.restart_reason).inc()
        cursor.restart_reason = "error"  # until the stream ends cleanly
        settings = self._settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        server_timeout = int(settings.server_timeout * random.uniform(1.0, 2.0))  # noqa: S311
        # The server ends the stream after server_timeout; the read timeout catches a dead
        # peer, and this outer bound a server that trickles bookmarks past its own deadline.
        async with asyncio.timeout(server_timeout + settings.read_timeout) as whole:
            # Until the headers are in, the request timeout holds: a server that accepts the
            # connection and never answers must not hold the watch for the whole stream.
            whole.reschedule(loop.time() + settings.request_timeout)
            response = await self._open(
                self._call(
                    api,
                    cursor.scope,
                    watch=True,
                    resource_version=cursor.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=server_timeout,
                )
            )
            whole.reschedule(started + server_timeout + settings.read_timeout)
            events = 0
            try:
                self._allowed(cursor)
                lines = _lines(response.content, settings.read_timeout, settings.max_event_bytes)
                async for line in lines:
                    self._on_event(cursor, _decode(line))
                    events += 1
                    cursor.attempt = 0
            except WatchSilent:
                log.warning(
                    "watch stream silent, resuming it",
                    extra={
                        "scope": cursor.where,
                        "silent_s": settings.read_timeout,
                        "resource_version": cursor.resource_version,
                    },
                )
                cursor.restart_reason = "silent"
                return True
            finally:
                response.close()
        cursor.restart_reason = "closed"
        return events > 0 or loop.time() - started >= _MIN_HEALTHY_STREAM

    def _call(self, api: client.DiscoveryV1Api, scope: str | None, **params: Any) -> Any:
        if scope is None:
            return api.list_endpoint_slice_for_all_namespaces(
                label_selector=SERVICE_NAME_LABEL, _preload_content=False, **params
            )
        return api.list_namespaced_endpoint_slice(
            scope, label_selector=SERVICE_NAME_LABEL, _preload_content=False, **params
        )

    @staticmethod
    async def _open(request: Awaitable[Any]) -> aiohttp.ClientResponse:
        # With _preload_content=False the client hands back aiohttp's response, unchecked.
        response = cast(aiohttp.ClientResponse, await request)
        if response.status != 200:
            try:
                body = await response.read()
            finally:
                response.release()
            raise _status_error(response.status, body)
        return response

    # ----- events --------------------------------------------------------------------------

    def _on_event(self, cursor: _Cursor, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata") or {}, dict):
            raise UndecodableEvent("watch event without an object")
        if kind == "ERROR":
            code = obj.get("code")
            raise KubernetesApiError(
                code if isinstance(code, int) else 500, str(obj.get("message", ""))
            )
        if kind not in _EVENT_TYPES:
            log.warning("ignoring unknown watch event", extra={"event_type": str(kind)})
            return
        metrics.WATCH_EVENTS.labels(type=kind).inc()
        if kind == "DELETED":
            self._delete(obj)
        elif kind != "BOOKMARK":
            self._upsert(obj)
        resource_version = (obj.get("metadata") or {}).get("resourceVersion")
        if resource_version:
            cursor.resource_version = resource_version

    def _upsert(self, obj: Mapping[str, Any]) -> None:
        try:
            key, new = self._parse(obj)
        except _MALFORMED as exc:
            log.warning("skipping malformed EndpointSlice", extra={"error": repr(exc)})
            return
        old = self._put(key, new) if new is not None else self._drop(key)
        for name in {s.service for s in (old, new) if s is not None}:
            self._push(name)

    def _delete(self, obj: Mapping[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        old = self._drop((metadata.get("namespace", ""), metadata.get("name", "")))
        if old is not None:
            self._push(old.service)

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

    def _parse(self, obj: Mapping[str, Any]) -> tuple[SliceKey, _Slice | None]:
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

    def _failed(self, cursor: _Cursor, exc: Exception) -> float:
        """Record and report a failed call; how long to wait before the next try."""
        status = exc.status if isinstance(exc, KubernetesApiError) else None
        metrics.API_ERRORS.labels(status=_error_label(exc)).inc()
        if not cursor.resource_version and cursor.scope in self._synced:
            cursor.list_reason = "error"
        delay = self._delay(cursor.attempt)
        retry_in = round(delay, 2)
        if status == 403:
            reason = (
                f"forbidden by RBAC: the service account may not read EndpointSlices "
                f"{cursor.where}; grant {RBAC_HINT}"
            )
            log.error(
                "Kubernetes API refused access (403 Forbidden): grant the service account "
                f"{RBAC_HINT}; keeping the last known endpoints and retrying",
                extra={"scope": cursor.where, "error": str(exc), "retry_in_s": retry_in},
            )
            self._forbidden[cursor.scope] = reason
        else:
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "Kubernetes API call failed; keeping the last known endpoints and retrying",
                extra={"scope": cursor.where, "error": self._last_error, "retry_in_s": retry_in},
            )
        self._update_status()
        return delay

    def _allowed(self, cursor: _Cursor) -> None:
        if self._forbidden.pop(cursor.scope, None) is not None:
            log.info("Kubernetes API access granted again", extra={"scope": cursor.where})
        self._update_status()

    def _update_status(self) -> None:
        if self._forbidden:
            self._set_status(False, next(iter(self._forbidden.values())))
        elif len(self._synced) == len(self._scopes):
            self._set_status(True, self._ports_reason())
        elif self._last_error:
            self._set_status(False, f"initial list of EndpointSlices failing: {self._last_error}")
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

    def _delay(self, attempt: int) -> float:
        return self._settings.backoff.delay(attempt)


async def _lines(
    stream: aiohttp.StreamReader, read_timeout: float, max_bytes: int
) -> AsyncIterator[bytes]:
    """The non-blank lines of a JSON-lines stream, each of any length up to ``max_bytes``.

    aiohttp's own line iterator refuses lines over 128 KiB, and an EndpointSlice of a
    thousand endpoints is larger. Raises WatchSilent when nothing arrives for
    ``read_timeout`` seconds, EventTooLarge past ``max_bytes``. An unfinished line at the end
    is dropped: the stream was cut, and resuming from the last resourceVersion replays it.
    """
    buffer = bytearray()
    while True:
        try:
            async with asyncio.timeout(read_timeout):
                chunk = await stream.readany()
        except TimeoutError:
            raise WatchSilent from None
        if not chunk:
            return
        scanned = len(buffer)  # only the new bytes can hold a newline
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scanned)) != -1:
            line = bytes(buffer[start:end])
            start = scanned = end + 1
            if line.strip():
                yield line
        del buffer[:start]
        if len(buffer) > max_bytes:
            raise EventTooLarge(f"watch event larger than {max_bytes} bytes")


def _decode(line: bytes) -> Mapping[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as exc:  # invalid JSON or UTF-8
        raise UndecodableEvent(f"{exc} in {line[:100]!r}") from None
    if not isinstance(event, dict):
        raise UndecodableEvent(f"watch event is not an object: {line[:100]!r}")
    return event


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


def _status_error(status: int, body: bytes) -> KubernetesApiError:
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    return KubernetesApiError(status, message)


def _error_label(exc: Exception) -> str:
    if isinstance(exc, KubernetesApiError):
        return str(exc.status)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connection"
    return "invalid"
