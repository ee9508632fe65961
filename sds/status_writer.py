"""Gateway API status written back to the cluster, through the status subresource.

What the translation decided (:class:`~sds.translate.translator.Translator`) becomes each
object's status: GatewayClass ``Accepted``; Gateway ``Accepted``/``Programmed``, its
listeners (``supportedKinds``, ``attachedRoutes``, conditions) and addresses; each route
parent's ``Accepted``/``ResolvedRefs`` under our controllerName. Every condition carries the
object's ``observedGeneration``.

Status is recomputed for every cluster object whenever the registry moves (a route, its
Gateway, a backend Service, a ReferenceGrant: anything the translation reads) and compared with
what the cluster shows; only a difference is queued. The queue is its own task, rate-limited by
a token bucket, so writes never delay a push. A write starts from the object as the watch last
showed it (its status and resourceVersion, so no read comes first), replaces only our part of
the status (other controllers' ``status.parents`` entries stay; a condition whose status did not
flip keeps its ``lastTransitionTime``) and sends it with that resourceVersion; a 409 Conflict
(the object moved since) reads it fresh and retries.

Only a replica allowed to (``may_write``, the Lease holder) writes, checked before every write,
and only once the source has listed every kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from sds import metrics
from sds.gatewayapi.model import (
    CONTROLLER_NAME,
    GATEWAY,
    GATEWAY_CLASS,
    GRPC_ROUTE,
    HTTP_ROUTE,
    GatewayClass,
    ObjectKey,
)
from sds.registry import Registry
from sds.sources.gateway_api import KINDS, GatewayApiSource
from sds.sources.reflector import Backoff, connect_retrying
from sds.translate.gateways import Condition
from sds.translate.translator import Translator

log = logging.getLogger("sds.status")

_PLURALS = {k.kind: k for k in KINDS}
_WRITTEN_KINDS = frozenset({GATEWAY_CLASS, GATEWAY, HTTP_ROUTE, GRPC_ROUTE})
_SLICE = 200  # objects checked between two yields to the event loop


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """How status is written: the rate, the retries, how long to let the translation settle.

    ``concurrency`` writes are in flight at most (one per object at a time). ``settle`` is the
    pause between a registry change and the recompute: the translation runs
    one xDS debounce after the change. ``resync`` recomputes everything even without a change
    (a missed moment costs nothing: equal statuses are not written). ``follower_poll`` is how
    often a replica that does not write looks whether it may now.
    """

    writes_per_second: float = 500.0
    burst: int = 500
    concurrency: int = 8
    conflict_retries: int = 5
    settle: float = 0.05
    follower_poll: float = 0.1
    resync: float = 30.0
    request_timeout: float = 10.0


class _Bucket:
    """A token bucket: ``rate`` writes a second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = asyncio.get_running_loop().time()

    async def take(self) -> None:
        """Wait for one token."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self._rate)


def _conditions(conditions: tuple[Condition, ...], generation: int) -> list[dict[str, Any]]:
    return [c.as_json(generation) for c in conditions]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _strip(value: Any) -> Any:
    """``value`` without ``lastTransitionTime``: what decides whether a write is needed."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "lastTransitionTime"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _stamped(conditions: list[dict[str, Any]], previous: Any, now: str) -> list[dict[str, Any]]:
    """Conditions with ``lastTransitionTime``: the previous one where the status is unchanged."""
    before = {
        c.get("type"): c
        for c in (previous if isinstance(previous, list) else ())
        if isinstance(c, dict)
    }
    stamped = []
    for condition in conditions:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"]
        when = old.get("lastTransitionTime") if same and old is not None else None
        stamped.append({**condition, "lastTransitionTime": when or now})
    return stamped


class StatusWriter:
    """Writes the status of the Gateway API objects the cluster holds."""

    def __init__(
        self,
        registry: Registry,
        translator: Translator,
        source: GatewayApiSource,
        *,
        kube_api_url: str = "",
        kubeconfig: str = "",
        settings: StatusSettings | None = None,
        may_write: Callable[[], bool] = lambda: True,
        gateway_addresses: Sequence[str] = (),
    ) -> None:
        self._registry = registry
        self._translator = translator
        self.source = source
        """Where the cluster's objects and their statuses come from."""
        self._kube_api_url = kube_api_url
        self._kubeconfig = kubeconfig
        self._settings = settings or StatusSettings()
        self._may_write = may_write
        self._gateway_addresses = tuple(gateway_addresses)
        self._queue: dict[ObjectKey, None] = {}  # an ordered set
        self._queued = asyncio.Event()
        self._in_flight: set[ObjectKey] = set()
        self._written: dict[ObjectKey, Any] = {}  # our part, as last written (stripped)
        self.writes = 0
        """Status writes the API server accepted."""

    # ----- what the status should be -------------------------------------------------------

    def desired(self, key: ObjectKey) -> Any:
        """Our part of ``key``'s status (without transition times), or None for none."""
        obj = self.source.objects.get(key)
        if obj is None:
            return None
        generation = obj.meta.generation
        if key.kind == GATEWAY_CLASS:
            if not isinstance(obj, GatewayClass) or obj.controller_name != CONTROLLER_NAME:
                return None
            accepted = Condition("Accepted", True, "Accepted", "Accepted by envoymesh")
            supported = Condition("SupportedVersion", True, "SupportedVersion", "")
            return {"conditions": _conditions((accepted, supported), generation)}
        if key.kind == GATEWAY:
            binding = self._translator.bindings.get(key)
            if binding is None:
                return None
            status = binding.gateway_status
            return {
                "conditions": _conditions(status.conditions, generation),
                "listeners": [
                    {
                        "name": listener.name,
                        "supportedKinds": [
                            {"group": "gateway.networking.k8s.io", "kind": kind}
                            for kind in listener.supported_kinds
                        ],
                        "attachedRoutes": listener.attached_routes,
                        "conditions": _conditions(listener.conditions, generation),
                    }
                    for listener in status.listeners
                ],
                "addresses": [
                    {"type": "IPAddress" if _is_ip(a) else "Hostname", "value": a}
                    for a in self._addresses(key, status.addresses)
                ],
            }
        if key.kind in (HTTP_ROUTE, GRPC_ROUTE):
            parents = self._translator.route_status(key)
            return [
                {
                    "parentRef": p.parent.as_json(),
                    "controllerName": CONTROLLER_NAME,
                    "conditions": _conditions(p.conditions, generation),
                }
                for p in parents
            ]
        return None

    def _addresses(self, key: ObjectKey, declared: tuple[str, ...]) -> tuple[str, ...]:
        """--gateway-address, else the Gateway's labelled Service's, else its spec's."""
        if self._gateway_addresses:
            return self._gateway_addresses
        return self.source.gateway_addresses.get((key.namespace, key.name)) or declared

    @staticmethod
    def ours(kind: str, status: Any) -> Any:
        """Our part of a status as the cluster holds it (without transition times)."""
        status = status if isinstance(status, dict) else {}
        if kind in (HTTP_ROUTE, GRPC_ROUTE):
            return _strip(
                [
                    p
                    for p in status.get("parents") or ()
                    if isinstance(p, dict) and p.get("controllerName") == CONTROLLER_NAME
                ]
            )
        if kind == GATEWAY:
            return _strip(
                {
                    "conditions": status.get("conditions") or [],
                    "listeners": status.get("listeners") or [],
                    "addresses": status.get("addresses") or [],
                }
            )
        return _strip({"conditions": status.get("conditions") or []})

    def _stale(self, key: ObjectKey) -> bool:
        desired = self.desired(key)
        if desired is None:
            return False
        if desired == self._written.get(key):
            return False  # written; the watch has not shown it yet
        return bool(desired != self.ours(key.kind, self.source.statuses.get(key)))

    def recompute(self) -> int:
        """Queue every object whose status differs from what it should be; how many."""
        return sum(self._check(key) for key in list(self.source.objects))

    async def _recompute_in_slices(self) -> None:
        """:meth:`recompute`, giving the event loop back every slice of objects: at 3,000
        routes one pass takes about 50 ms, which a push must not wait for."""
        for number, key in enumerate(list(self.source.objects)):
            if number % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
            self._check(key)

    def _check(self, key: ObjectKey) -> bool:
        """Queue ``key`` if its status is stale; whether it was queued now."""
        if key.kind in _WRITTEN_KINDS and key not in self._queue and self._stale(key):
            self._queue[key] = None
            self._queued.set()
            return True
        return False

    # ----- the tasks -----------------------------------------------------------------------

    async def run(self) -> None:
        """Recompute on every change and write the queue, until cancelled."""
        api_client = await connect_retrying(self._kube_api_url, self._kubeconfig, Backoff(), log)
        try:
            api = client.CustomObjectsApi(api_client)
            bucket = _Bucket(self._settings.writes_per_second, self._settings.burst)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._follow(), name="status-recompute")
                for number in range(self._settings.concurrency):
                    group.create_task(self._drain(api, bucket), name=f"status-writes-{number}")
        finally:
            await api_client.close()

    async def _follow(self) -> None:
        seen = -1
        leading = False
        while True:
            # A follower looks often whether it leads now: then it recomputes at once, since
            # the changes it saw as a follower were not written by anyone yet.
            timeout = self._settings.resync if leading else self._settings.follower_poll
            revision = await self._wait(seen, timeout)
            moved = revision != seen or self.source.inputs_changed.is_set()
            seen = revision
            self.source.inputs_changed.clear()
            # Until every kind is listed, nothing is decided: a status then would be written
            # again once the rest arrives (BackendNotFound for a Service not listed yet).
            was_leading, leading = leading, self._may_write() and self.source.settled
            if leading:  # a change, the resync, leadership just gained, or lists complete
                await asyncio.sleep(self._settings.settle)
                await self._recompute_in_slices()
            elif was_leading or moved:
                # Another replica writes: what we wrote may no longer be what the cluster has.
                self._written.clear()
                self._queue.clear()

    async def _wait(self, seen: int, timeout: float) -> int:
        """The registry's revision once it passed ``seen`` or the source's other inputs moved,
        or after ``timeout``."""
        changes = asyncio.create_task(self._registry.wait_for_change(seen, timeout))
        inputs = asyncio.create_task(self.source.inputs_changed.wait())
        try:
            await asyncio.wait({changes, inputs}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (changes, inputs):
                task.cancel()
            await asyncio.gather(changes, inputs, return_exceptions=True)
        return self._registry.revision

    async def _drain(self, api: client.CustomObjectsApi, bucket: _Bucket) -> None:
        while True:
            key = next((k for k in self._queue if k not in self._in_flight), None)
            if key is None:
                self._queued.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queued.wait(), self._settings.resync)
                continue
            del self._queue[key]
            if not self._may_write() or not self._stale(key):
                continue
            self._in_flight.add(key)
            try:
                await bucket.take()
                await self._write(api, key)
            finally:
                self._in_flight.discard(key)
                if self._queue:
                    self._queued.set()  # a key skipped while this one was in flight

    async def _write(self, api: client.CustomObjectsApi, key: ObjectKey) -> None:
        watched = _PLURALS[key.kind]
        current = self._watched(key)
        for _ in range(self._settings.conflict_retries + 1):
            desired = self.desired(key)
            if desired is None or not self._may_write():
                return
            try:
                async with asyncio.timeout(self._settings.request_timeout):
                    if current is None:
                        current = await self._get(api, key)
                    body = self._merged(key, current, desired)
                    await self._replace(api, key, body)
            except ApiException as exc:
                if exc.status == 409:
                    metrics.STATUS_WRITES.labels(result="conflict").inc()
                    current = None  # read it fresh and retry
                    continue
                metrics.STATUS_WRITES.labels(result=str(exc.status)).inc()
                if exc.status != 404:  # a deleted object needs no status
                    log.error(
                        "status write refused",
                        extra={"object": str(key), "status": exc.status, "error": exc.reason},
                    )
                self._written[key] = desired  # the same write would be refused again
                return
            except (TimeoutError, OSError) as exc:
                metrics.STATUS_WRITES.labels(result="error").inc()
                log.warning("status write failed", extra={"object": str(key), "error": str(exc)})
                self._queue[key] = None  # later, on the next pass
                return
            self._written[key] = desired
            self.writes += 1
            metrics.STATUS_WRITES.labels(result="written").inc()
            return
        log.warning(
            "status write kept conflicting; retried on the next change",
            extra={"object": str(key), "kind": watched.kind},
        )

    def _watched(self, key: ObjectKey) -> dict[str, Any] | None:
        """``key`` as its watch last showed it, as much as a status write needs; None if the
        watch has not shown its resourceVersion."""
        resource_version = self.source.resource_versions.get(key)
        if not resource_version:
            return None
        watched = _PLURALS[key.kind]
        metadata = {"name": key.name, "resourceVersion": resource_version}
        if watched.namespaced:
            metadata["namespace"] = key.namespace
        return {
            "apiVersion": watched.api_version,
            "kind": key.kind,
            "metadata": metadata,
            "status": self.source.statuses.get(key),
        }

    async def _get(self, api: client.CustomObjectsApi, key: ObjectKey) -> dict[str, Any]:
        watched = _PLURALS[key.kind]
        if watched.namespaced:
            found = await api.get_namespaced_custom_object(
                watched.group, watched.version, key.namespace, watched.plural, key.name
            )
        else:
            found = await api.get_cluster_custom_object(
                watched.group, watched.version, watched.plural, key.name
            )
        assert isinstance(found, dict)
        return found

    async def _replace(
        self, api: client.CustomObjectsApi, key: ObjectKey, body: dict[str, Any]
    ) -> None:
        watched = _PLURALS[key.kind]
        # A replace carries the resourceVersion the status came with: the API server refuses
        # it (409) if the object moved since, and only then do we read it.
        if watched.namespaced:
            await api.replace_namespaced_custom_object_status(
                watched.group, watched.version, key.namespace, watched.plural, key.name, body
            )
        else:
            await api.replace_cluster_custom_object_status(
                watched.group, watched.version, watched.plural, key.name, body
            )

    @staticmethod
    def _merged(key: ObjectKey, current: dict[str, Any], desired: Any) -> dict[str, Any]:
        """``current`` with our part of its status replaced by ``desired``."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = dict(current.get("status") or {})
        if key.kind in (HTTP_ROUTE, GRPC_ROUTE):
            parents = [p for p in status.get("parents") or () if isinstance(p, dict)]
            mine = {
                repr(sorted(p.get("parentRef", {}).items())): p
                for p in parents
                if p.get("controllerName") == CONTROLLER_NAME
            }
            others = [p for p in parents if p.get("controllerName") != CONTROLLER_NAME]
            ours = []
            for entry in desired:
                old = mine.get(repr(sorted(entry["parentRef"].items()))) or {}
                conditions = _stamped(entry["conditions"], old.get("conditions"), now)
                ours.append({**entry, "conditions": conditions})
            status["parents"] = others + ours
        else:
            status["conditions"] = _stamped(desired["conditions"], status.get("conditions"), now)
            if key.kind == GATEWAY:
                before = {
                    listener.get("name"): listener
                    for listener in status.get("listeners") or ()
                    if isinstance(listener, dict)
                }
                status["listeners"] = [
                    {
                        **listener,
                        "conditions": _stamped(
                            listener["conditions"],
                            (before.get(listener["name"]) or {}).get("conditions"),
                            now,
                        ),
                    }
                    for listener in desired["listeners"]
                ]
                status["addresses"] = desired["addresses"]
        metadata = {
            k: current["metadata"][k]
            for k in ("name", "namespace", "resourceVersion")
            if k in current["metadata"]
        }
        return {
            "apiVersion": current["apiVersion"],
            "kind": current["kind"],
            "metadata": metadata,
            "status": status,
        }
