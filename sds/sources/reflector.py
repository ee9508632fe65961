"""One reflector: list and watch one kind of Kubernetes object in one scope, as client-go does.

It lists (paginated), then watches from the list's resourceVersion with bookmarks; a stream
that ends or drops is resumed from the last resourceVersion seen; ``410 Gone`` means that
version is compacted away, so it lists again and the handler reconciles, which removes objects
deleted meanwhile. A watch stream silent for longer than the read timeout (bookmarks arrive
about once a minute) is presumed dead and resumed; an event that cannot be decoded relists
rather than asking for the same resourceVersion again; a list whose ``continue`` token expired
starts over unpaginated, so it always finishes. Failures never empty the handler's state: while
the API server is unreachable or refuses us, the last state we knew stays. Every timing lives
in one :class:`WatchSettings`.

What an object means is the handler's business (a parser per kind); the reflector only moves
raw JSON. Responses are read raw (``_preload_content=False``) and parsed as plain JSON:
building the generated model objects for 100,000 endpoints would cost most of the start-up time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import aiohttp
from kubernetes_asyncio import client, config

from sds import metrics

K = TypeVar("K")
V = TypeVar("V")

_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK"})
MALFORMED = (KeyError, TypeError, AttributeError, ValueError)
"""What a parser raises for an object that is not what its kind should be."""
_MIN_HEALTHY_STREAM = 1.0  # seconds

ListCall = Callable[..., Awaitable[Any]]
"""The client's list function for one kind and scope, called with the list/watch parameters."""


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
    """How sources list and watch: every timeout, size and backoff in one place.

    ``read_timeout`` bounds the silence on a watch stream: with bookmarks requested the API
    server sends something about once a minute, so two minutes of nothing means a dead
    connection (a NAT or load balancer dropped it without a reset). ``server_timeout`` is the
    ``timeoutSeconds`` asked of the server, jittered up to twice that (as client-go does) so
    replicas do not reconnect in step. ``max_event_bytes`` is client-go's limit on one decoded
    object (16 MiB), far above what etcd can store. ``absent_interval`` is how often a kind
    whose resource the API server does not have (CRDs not installed) is looked for again.
    """

    read_timeout: float = 120.0
    server_timeout: int = 300
    request_timeout: float = 60.0
    page_size: int = 500
    max_event_bytes: int = 16 * 1024 * 1024
    absent_interval: float = 30.0
    backoff: Backoff = field(default_factory=Backoff)


class UndecodableEvent(Exception):
    """A watch event that is not the JSON object it should be: the reflector lists again."""


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


class Handler(Protocol[K, V]):
    """What a reflector feeds: the parser of its kind and the state built from it."""

    def parse(self, obj: Mapping[str, Any]) -> tuple[K, V | None]:
        """The object's key, and its parsed value (None: not wanted); raises MALFORMED."""

    def key_of(self, metadata: Mapping[str, Any]) -> K:
        """The key of a deleted object, from its metadata alone."""

    def listed(self, scope: str | None, fresh: dict[K, V]) -> dict[str, Any]:
        """Make ``fresh`` the whole state of ``scope``; figures for the list's log line."""

    def changed(self, key: K, value: V | None) -> None:
        """One object added or modified (``value``) or deleted or unwanted (None)."""

    def status_changed(self) -> None:
        """A reflector's synced/forbidden/absent/error state moved."""


async def connect(kube_api_url: str, kubeconfig: str) -> client.ApiClient:
    """An API client: ``kube_api_url`` without auth, else the kubeconfig, else in-cluster."""
    return client.ApiClient(await _configuration(kube_api_url, kubeconfig))


async def connect_retrying(
    kube_api_url: str, kubeconfig: str, backoff: Backoff, logger: logging.Logger
) -> client.ApiClient:
    """:func:`connect`, retried with ``backoff`` until a configuration loads."""
    attempt = 0
    while True:
        try:
            return await connect(kube_api_url, kubeconfig)
        # Configuration loading fails in many library-specific ways (missing files, bad
        # YAML, exec plugins); all of them mean the same: retry later.
        except Exception as exc:
            logger.error("no usable Kubernetes API configuration", extra={"error": str(exc)})
        await asyncio.sleep(backoff.delay(attempt))
        attempt += 1


async def _configuration(kube_api_url: str, kubeconfig: str) -> client.Configuration:
    if kube_api_url:
        return client.Configuration(host=kube_api_url.rstrip("/"))
    configuration = client.Configuration()
    if kubeconfig:
        await config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
        return configuration
    try:
        # It reads the service account files: keep that off the event loop.
        await asyncio.to_thread(config.load_incluster_config, client_configuration=configuration)
    except config.ConfigException:
        await config.load_kube_config(client_configuration=configuration, persist_config=False)
    return configuration


class Reflector(Generic[K, V]):
    """Lists and watches one kind in one scope (a namespace, or None for all) into a handler.

    ``kind`` names the objects in logs ("EndpointSlices"), ``resource`` their resource
    ("endpointslices.discovery.k8s.io") and ``rbac_hint`` the grant a 403 asks for. With
    ``absent_ok`` a 404 (the kind's CRD is not installed) is a normal state: the scope is
    empty and the kind is looked for again every ``absent_interval``.
    """

    def __init__(
        self,
        *,
        kind: str,
        resource: str,
        rbac_hint: str,
        call: ListCall,
        handler: Handler[K, V],
        settings: WatchSettings,
        logger: logging.Logger,
        scope: str | None = None,
        absent_ok: bool = False,
    ) -> None:
        self.kind = kind
        self.resource = resource
        self.scope = scope
        self._rbac_hint = rbac_hint
        self._call = call
        self._handler = handler
        self._settings = settings
        self._log = logger
        self._absent_ok = absent_ok
        self.synced = False
        """Whether a list has completed (the handler holds the scope's state)."""
        self.forbidden = ""
        """Why RBAC refuses us, while it does; empty otherwise."""
        self.absent = False
        """Whether the API server does not serve the kind (its CRD is not installed)."""
        self.last_error = ""
        """The last failure other than a 403, for the status of a source not yet synced."""
        self._resource_version = ""  # empty: list before watching
        self._attempt = 0  # consecutive failures, for the backoff
        self._list_reason = "initial"
        self._restart_reason = ""  # why the next watch is a restart; empty for the first one

    @property
    def where(self) -> str:
        """The scope, for messages."""
        return f'in namespace "{self.scope}"' if self.scope else "cluster-wide"

    async def run(self) -> None:
        """List and watch until cancelled; the caller owns the task and awaits its end."""
        while True:
            try:
                if not self._resource_version:
                    await self._list()
                    if self.absent:
                        await asyncio.sleep(self._settings.absent_interval)
                        continue
                if await self._watch():
                    self._attempt = 0
                    continue
                delay = self._delay()
            except KubernetesApiError as exc:
                if exc.status == 404 and self._absent_ok:
                    self._missing()
                    delay = self._settings.absent_interval
                elif exc.status != 410:
                    delay = self._failed(exc)
                else:
                    self._log.info(
                        "resourceVersion expired, listing again",
                        extra={
                            "kind": self.kind,
                            "scope": self.where,
                            "resource_version": self._resource_version,
                        },
                    )
                    if (delay := self._relist("gone")) == 0:
                        continue
            except UndecodableEvent as exc:
                # The same resourceVersion would replay the same bytes: list instead, and watch
                # on from the list's version, past the bad event.
                metrics.API_ERRORS.labels(status="undecodable").inc()
                self._log.warning(
                    "undecodable watch event, listing again",
                    extra={
                        "kind": self.kind,
                        "scope": self.where,
                        "error": str(exc),
                        "resource_version": self._resource_version,
                    },
                )
                if (delay := self._relist("undecodable")) == 0:
                    continue
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                delay = self._failed(exc)
            # A bug must not end discovery: report it loudly and start over with a list.
            except Exception as exc:
                self._log.exception(
                    "unexpected failure", extra={"kind": self.kind, "scope": self.where}
                )
                self._resource_version = ""
                delay = self._failed(exc)
            await asyncio.sleep(delay)
            self._attempt += 1

    def _relist(self, reason: str) -> float:
        """Forget the resourceVersion; 0 to list at once, else the pause before listing."""
        self._resource_version = ""
        self._list_reason = self._restart_reason = reason
        if self._attempt == 0:  # at once, unless this keeps happening
            self._attempt = 1
            return 0.0
        return self._delay()

    # ----- list ----------------------------------------------------------------------------

    async def _list(self) -> None:
        metrics.RELISTS.labels(reason=self._list_reason).inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            fresh, resource_version = await self._list_pages(self._settings.page_size)
        except ContinueExpired:
            # The snapshot behind the continue token was compacted while we paged (a large
            # list on a busy cluster). Paging again could expire again; one unpaginated list
            # always finishes, as client-go's pager does.
            self._log.info(
                "continue token expired mid-list, listing again unpaginated",
                extra={"kind": self.kind, "scope": self.where},
            )
            metrics.RELISTS.labels(reason="continue_expired").inc()
            fresh, resource_version = await self._list_pages(0)
        figures = self._handler.listed(self.scope, fresh)
        self._resource_version = resource_version
        was_absent, self.absent = self.absent, False
        if was_absent:
            self._log.info("Kubernetes API serves the kind now", extra={"kind": self.kind})
        self.synced = True
        self._allowed()
        self._log.info(
            f"listed {self.kind}",
            extra={
                "scope": self.where,
                "reason": self._list_reason,
                "objects": len(fresh),
                **figures,
                "resource_version": resource_version,
                "elapsed_s": round(loop.time() - started, 3),
            },
        )

    async def _list_pages(self, page_size: int) -> tuple[dict[K, V], str]:
        """Every object in scope, and the list's resourceVersion; ``page_size`` 0: one page."""
        fresh: dict[K, V] = {}
        token = ""
        while True:
            async with asyncio.timeout(self._settings.request_timeout):
                try:
                    response = await _open(
                        self._call(limit=page_size or None, _continue=token or None)
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
                    key, parsed = self._handler.parse(item)
                except MALFORMED as exc:
                    self._malformed(exc)
                    continue
                if parsed is not None:
                    fresh[key] = parsed
            metadata = page.get("metadata") or {}
            token = metadata.get("continue") or ""
            if not token:
                break
        resource_version = metadata.get("resourceVersion") or ""
        if not resource_version:
            raise ValueError(f"{self.kind} list without a resourceVersion")
        return fresh, resource_version

    # ----- watch ---------------------------------------------------------------------------

    async def _watch(self) -> bool:
        """Follow one watch stream; whether it was healthy (resume at once).

        A stream that delivered nothing and ended at once is not: the caller then pauses, so a
        server that keeps closing streams is not hammered. A stream that fell silent for the
        read timeout is closed and counts as healthy: the caller resumes it at once.
        """
        if self._restart_reason:
            metrics.WATCH_RESTARTS.labels(reason=self._restart_reason).inc()
        self._restart_reason = "error"  # until the stream ends cleanly
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
            response = await _open(
                self._call(
                    watch=True,
                    resource_version=self._resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=server_timeout,
                )
            )
            whole.reschedule(started + server_timeout + settings.read_timeout)
            events = 0
            try:
                self._allowed()
                lines = _lines(response.content, settings.read_timeout, settings.max_event_bytes)
                async for line in lines:
                    self._on_event(_decode(line))
                    events += 1
                    self._attempt = 0
            except WatchSilent:
                self._log.warning(
                    "watch stream silent, resuming it",
                    extra={
                        "kind": self.kind,
                        "scope": self.where,
                        "silent_s": settings.read_timeout,
                        "resource_version": self._resource_version,
                    },
                )
                self._restart_reason = "silent"
                return True
            finally:
                response.close()
        self._restart_reason = "closed"
        return events > 0 or loop.time() - started >= _MIN_HEALTHY_STREAM

    def _on_event(self, event: Mapping[str, Any]) -> None:
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
            self._log.warning("ignoring unknown watch event", extra={"event_type": str(kind)})
            return
        metrics.WATCH_EVENTS.labels(type=kind).inc()
        metadata = obj.get("metadata") or {}
        if kind == "DELETED":
            try:
                self._handler.changed(self._handler.key_of(metadata), None)
            except MALFORMED as exc:
                self._malformed(exc)
        elif kind != "BOOKMARK":
            try:
                key, value = self._handler.parse(obj)
            except MALFORMED as exc:
                self._malformed(exc)
            else:
                self._handler.changed(key, value)
        resource_version = metadata.get("resourceVersion")
        if resource_version:
            self._resource_version = resource_version

    def _malformed(self, exc: Exception) -> None:
        self._log.warning(
            f"skipping malformed {self.kind.removesuffix('s')}", extra={"error": repr(exc)}
        )

    # ----- state and failures --------------------------------------------------------------

    def _failed(self, exc: Exception) -> float:
        """Record and report a failed call; how long to wait before the next try."""
        status = exc.status if isinstance(exc, KubernetesApiError) else None
        metrics.API_ERRORS.labels(status=_error_label(exc)).inc()
        if not self._resource_version and self.synced:
            self._list_reason = "error"
        delay = self._delay()
        retry_in = round(delay, 2)
        if status == 403:
            metrics.FORBIDDEN.labels(kind=self.kind).inc()
            self.forbidden = (
                f"forbidden by RBAC: the service account may not read {self.kind} "
                f"{self.where}; grant {self._rbac_hint}"
            )
            self._log.error(
                "Kubernetes API refused access (403 Forbidden): grant the service account "
                f"{self._rbac_hint}; keeping the last known state and retrying",
                extra={
                    "kind": self.kind,
                    "scope": self.where,
                    "error": str(exc),
                    "retry_in_s": retry_in,
                },
            )
        else:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._log.warning(
                "Kubernetes API call failed; keeping the last known state and retrying",
                extra={
                    "kind": self.kind,
                    "scope": self.where,
                    "error": self.last_error,
                    "retry_in_s": retry_in,
                },
            )
        self._handler.status_changed()
        return delay

    def _missing(self) -> None:
        """The API server does not serve the kind: nothing of it exists, which is normal."""
        self._resource_version = ""
        self._list_reason = "absent"
        if not self.absent:
            self._log.info(
                "Kubernetes API does not serve the kind (CRD not installed); looking again later",
                extra={"kind": self.kind, "resource": self.resource},
            )
        self.absent = self.synced = True
        self.forbidden = self.last_error = ""
        self._handler.listed(self.scope, {})
        self._handler.status_changed()

    def _allowed(self) -> None:
        if self.forbidden:
            self.forbidden = ""
            self._log.info(
                "Kubernetes API access granted again",
                extra={"kind": self.kind, "scope": self.where},
            )
        self._handler.status_changed()

    def _delay(self) -> float:
        return self._settings.backoff.delay(self._attempt)


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
