"""A Kubernetes API server for tests: list and watch of EndpointSlices, Services, Gateway API.

The kinds: ``discovery.k8s.io/v1`` EndpointSlices, ``v1`` Services, and the Gateway API's
``gateway.networking.k8s.io/v1`` GatewayClasses, Gateways, HTTPRoutes, GRPCRoutes and
``v1beta1`` ReferenceGrants; a kind can be made absent (its CRD not installed: 404) or
forbidden (403) on its own.

No real API server can run where the tests run, so this one speaks enough of the real
protocol for the unpatched kubernetes-asyncio client: paginated lists with a consistent
snapshot per continue token, label and field selectors, chunked JSON-lines watches that replay
a bounded history from a resourceVersion, bookmarks, and ``410 Gone`` once that history is
compacted. Tests steer it from their own event loop (``apply``, ``delete``, ``compact``,
``drop_watches``, ``set_forbidden``, ``stop``/``start``) and read its request counters.

Run as a script it serves a preloaded cluster in its own process (used by the benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import copy
import itertools
import json
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_VERSION = "discovery.k8s.io/v1"
GROUP_PATH = "/apis/discovery.k8s.io/v1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True, slots=True)
class Resource:
    """One kind the server serves: where, and whether per namespace."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool = True

    @property
    def base(self) -> str:
        """The path prefix of its API group and version."""
        if "/" in self.api_version:
            return f"/apis/{self.api_version}"
        return f"/api/{self.api_version}"

    @property
    def group(self) -> str:
        """Its API group (empty for the core group)."""
        return self.api_version.rpartition("/")[0]


RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        Resource("EndpointSlice", API_VERSION, "endpointslices"),
        Resource("Service", "v1", "services"),
        Resource("GatewayClass", f"{GATEWAY_GROUP}/v1", "gatewayclasses", namespaced=False),
        Resource("Gateway", f"{GATEWAY_GROUP}/v1", "gateways"),
        Resource("HTTPRoute", f"{GATEWAY_GROUP}/v1", "httproutes"),
        Resource("GRPCRoute", f"{GATEWAY_GROUP}/v1", "grpcroutes"),
        Resource("ReferenceGrant", f"{GATEWAY_GROUP}/v1beta1", "referencegrants"),
        Resource("Lease", "coordination.k8s.io/v1", "leases"),
    )
}
GATEWAY_API_KINDS = tuple(k for k, r in RESOURCES.items() if r.group == GATEWAY_GROUP)
LEASES = RESOURCES["Lease"]

Obj = dict[str, Any]
Predicate = Callable[[Obj], bool]


# ----- building objects ------------------------------------------------------------------


def slice_endpoint(
    *addresses: str,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    pod: str | None = None,
    node: str | None = None,
) -> Obj:
    """One entry of an EndpointSlice's ``endpoints``; a None condition or field is left out.

    ``pod`` adds the ``targetRef`` the EndpointSlice controller writes, ``node`` the
    ``nodeName``: they make entries as large as real ones.
    """
    conditions = {
        key: value
        for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if value is not None
    }
    entry: Obj = {"addresses": list(addresses), "conditions": conditions}
    if zone is not None:
        entry["zone"] = zone
    if node is not None:
        entry["nodeName"] = node
    if pod is not None:
        entry["targetRef"] = {
            "kind": "Pod",
            "namespace": "default",
            "name": pod,
            "uid": f"{pod}-0000-4000-8000-000000000000",
        }
    return entry


def endpoint_slice(
    name: str,
    namespace: str = "default",
    service: str | None = None,
    *,
    addresses: Sequence[str] = (),
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    ports: Sequence[tuple[str | None, int | None]] = (("http", 80),),
    address_type: str = "IPv4",
    endpoints: Sequence[Obj] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """An EndpointSlice as the API serves it (without resourceVersion, which ``apply`` sets).

    ``service`` becomes the ``kubernetes.io/service-name`` label (None: no label). Every
    address gets its own endpoint with the given conditions and zone, unless ``endpoints``
    spells them out.
    """
    all_labels = dict(labels or {})
    if service is not None:
        all_labels[SERVICE_NAME_LABEL] = service
    if endpoints is None:
        endpoints = [
            slice_endpoint(a, ready=ready, serving=serving, terminating=terminating, zone=zone)
            for a in addresses
        ]
    port_list: list[Obj] = []
    for port_name, port in ports:
        entry: Obj = {"protocol": "TCP"}
        if port_name is not None:
            entry["name"] = port_name
        if port is not None:
            entry["port"] = port
        port_list.append(entry)
    return {
        "kind": "EndpointSlice",
        "apiVersion": API_VERSION,
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": port_list,
    }


def gateway_class(
    name: str = "envoymesh", controller: str = "envoymesh.io/gateway-controller"
) -> Obj:
    """A GatewayClass for ``controller``."""
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "GatewayClass",
        "metadata": {"name": name},
        "spec": {"controllerName": controller},
    }


def gateway(name: str = "edge", namespace: str = "default", class_name: str = "envoymesh") -> Obj:
    """A Gateway with one HTTP listener on port 8080, admitting routes of every namespace."""
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gatewayClassName": class_name,
            "listeners": [
                {
                    "name": "http",
                    "port": 8080,
                    "protocol": "HTTP",
                    "allowedRoutes": {"namespaces": {"from": "All"}},
                }
            ],
        },
    }


def http_route(
    name: str,
    namespace: str = "default",
    *,
    gateway_name: str = "edge",
    path: str = "/",
    backend: str = "usersvc",
    port: int = 8080,
) -> Obj:
    """An HTTPRoute attached to ``gateway_name``, sending ``path`` to one Service port."""
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": gateway_name}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                    "backendRefs": [{"name": backend, "port": port}],
                }
            ],
        },
    }


def grpc_route(name: str, namespace: str = "default", *, backend: str = "usersvc") -> Obj:
    """A GRPCRoute attached to the ``edge`` Gateway, sending everything to one Service."""
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "rules": [{"backendRefs": [{"name": backend, "port": 5001}]}],
        },
    }


def reference_grant(name: str, namespace: str, *, from_namespace: str) -> Obj:
    """A ReferenceGrant letting HTTPRoutes of ``from_namespace`` use this namespace's Services."""
    return {
        "apiVersion": f"{GATEWAY_GROUP}/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "from": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "namespace": from_namespace}],
            "to": [{"group": "", "kind": "Service"}],
        },
    }


def service(
    name: str, namespace: str = "default", *, ports: Sequence[tuple[str, int]] = (("http", 8080),)
) -> Obj:
    """A ClusterIP Service as the API serves it, with the fields a real one has."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "selector": {"app": name},
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports],
        },
        "status": {"loadBalancer": {}},
    }


def status_object(code: int, reason: str, message: str) -> Obj:
    """A ``v1 Status`` failure, the body of every API error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# ----- selectors -------------------------------------------------------------------------


class SelectorError(ValueError):
    """A label or field selector the server does not understand."""


def _parse_terms(text: str) -> list[tuple[str, str, str]]:
    """Split ``a=b,c!=d,e,!f`` into (key, operator, value) terms."""
    terms: list[tuple[str, str, str]] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "==" in term:
            key, value = term.split("==", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif "=" in term:
            key, value = term.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif term.startswith("!"):
            terms.append((term[1:].strip(), "!exists", ""))
        else:
            terms.append((term, "exists", ""))
    for key, _, _ in terms:
        if not key:
            raise SelectorError(f"invalid selector {text!r}")
    return terms


def parse_label_selector(text: str) -> Predicate:
    """A predicate on objects for a label selector (equality-based and existence terms)."""
    terms = _parse_terms(text)

    def matches(obj: Obj) -> bool:
        labels: Mapping[str, str] = obj["metadata"].get("labels") or {}
        for key, op, value in terms:
            present = key in labels
            if op == "exists" and not present:
                return False
            if op == "!exists" and present:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and present and labels[key] == value:
                return False
        return True

    return matches


def parse_field_selector(text: str) -> Predicate:
    """A predicate for ``metadata.name`` / ``metadata.namespace`` field selectors."""
    terms = _parse_terms(text)
    for key, op, _ in terms:
        if key not in ("metadata.name", "metadata.namespace") or op not in ("=", "!="):
            raise SelectorError(f'field label not supported: "{key}"')

    def matches(obj: Obj) -> bool:
        meta = obj["metadata"]
        for key, op, value in terms:
            actual = meta.get(key.split(".", 1)[1], "")
            if (actual == value) != (op == "="):
                return False
        return True

    return matches


def _parse_bool(text: str | None) -> bool:
    """Query booleans as Go's strconv.ParseBool reads them (the client sends ``True``)."""
    return text in ("1", "t", "T", "true", "TRUE", "True")


# ----- the server ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    obj: Obj
    raw: bytes  # serialised once: lists are mostly byte joins


@dataclass(frozen=True, slots=True)
class _Change:
    kind: str
    rv: int
    type: str  # ADDED, MODIFIED or DELETED, before selector filtering
    old: Obj | None
    new: Obj


@dataclass(frozen=True, slots=True)
class _ListSnapshot:
    rv: int
    items: list[_Stored]
    query: str  # a continue token is only valid for the same selectors and scope


@dataclass(eq=False)
class _Watcher:
    kind: str
    matches: Predicate
    bookmarks: bool
    queue: asyncio.Queue[_Change | int | bytes | None] = field(default_factory=asyncio.Queue)
    silent: bool = False  # a dead connection: the stream stays open and delivers nothing
    # queue items: a change, a bookmark (its resourceVersion), a raw line, None to drop it


class FakeApiServer:
    """List/watch of every kind in RESOURCES over HTTP on 127.0.0.1, with knobs to misbehave."""

    def __init__(self, *, history_limit: int = 1000, first_resource_version: int = 1000) -> None:
        self._objects: dict[tuple[str, str, str], _Stored] = {}  # kind, namespace, name
        self._rv = first_resource_version
        self._history: deque[_Change] = deque()
        self._history_limit = history_limit
        self._compacted_rv = first_resource_version  # watches from before this get 410
        self._watchers: set[_Watcher] = set()
        self._snapshots: dict[int, _ListSnapshot] = {}
        self._snapshot_ids = itertools.count(1)
        self._forbidden: set[str] = set()
        self._absent: set[str] = set()
        self.expire_continue_tokens = False
        """When set, every ``continue`` token is too old: 410 as after a compaction."""
        self.hang_new_watches = False
        """When set, new watch requests get no answer at all, not even headers."""
        self._runner: web.AppRunner | None = None
        self._port = 0
        self.list_requests = 0
        """Every list request, each page counted."""
        self.lists = 0
        """Lists started (first pages): what a relist adds to."""
        self.watches = 0
        """Watch requests, each resume counted."""
        self.watch_resource_versions: list[str] = []
        """The ``resourceVersion`` of every watch request, in order."""
        self.object_reads = 0
        """GETs of one object (or of its status subresource)."""
        self.status_writes = 0
        """Accepted writes of a status subresource."""
        self.status_writes_of: dict[tuple[str, str, str], int] = {}
        """Accepted status writes by (kind, namespace, name)."""
        self.lease_writes = 0
        """Accepted creates and replaces of Leases."""
        self.lease_conflicts = 0
        """Lease replaces refused 409 for a stale resourceVersion."""
        self.list_failures_to_inject: dict[str, int] = {}
        """List requests of a kind to answer 500, as an API server in trouble would."""
        self.conflicts_to_inject = 0
        """Status writes to answer 409 Conflict whatever their resourceVersion."""
        self.lists_of: dict[str, int] = dict.fromkeys(RESOURCES, 0)
        """Lists started, by kind."""
        self.watches_of: dict[str, int] = dict.fromkeys(RESOURCES, 0)
        """Watch requests, by kind."""

    # ----- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the API, as ``kubectl proxy`` would give it."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._runner is not None

    async def start(self) -> None:
        """Listen (again): a random port the first time, the same port after a ``stop``."""
        if self._runner is not None:
            return
        app = web.Application()
        for resource in RESOURCES.values():
            handler = self._handler(resource)
            app.router.add_get(f"{resource.base}/{resource.plural}", handler)
            if resource.namespaced:
                path = f"{resource.base}/namespaces/{{namespace}}/{resource.plural}"
                app.router.add_get(path, handler)
        leases = f"{LEASES.base}/namespaces/{{namespace}}/leases"
        app.router.add_post(leases, self._create_lease)
        app.router.add_get(f"{leases}/{{name}}", self._object_handler(LEASES))
        app.router.add_put(f"{leases}/{{name}}", self._replace_lease)
        for resource in RESOURCES.values():
            if resource.group == GATEWAY_GROUP:
                scoped = "/namespaces/{namespace}" if resource.namespaced else ""
                one = f"{resource.base}{scoped}/{resource.plural}/{{name}}"
                app.router.add_get(one, self._object_handler(resource))
                app.router.add_get(f"{one}/status", self._object_handler(resource))
                app.router.add_put(f"{one}/status", self._status_handler(resource))
                app.router.add_patch(f"{one}/status", self._status_handler(resource))
        # handler_cancellation: notice clients that hang up, as a real API server does.
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
        await site.start()
        self._port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Go down like a crashed API server: streams cut, connections refused; state kept."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.drop_watches()
        await runner.cleanup()

    # ----- test controls -------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._rv

    @property
    def open_watches(self) -> int:
        """Watch streams open right now."""
        return len(self._watchers)

    def apply(self, obj: Obj) -> Obj:
        """Create or replace an object (keyed by kind, namespace and name); the stored copy.

        A replaced object whose ``spec`` changed gets the next ``metadata.generation``.
        """
        kind = obj["kind"]
        meta = obj["metadata"]
        key = (kind, meta.get("namespace", "") if RESOURCES[kind].namespaced else "", meta["name"])
        previous = self._objects.get(key)
        generation = 1
        if previous is not None:
            generation = int(previous.obj["metadata"].get("generation") or 1)
            if previous.obj.get("spec") != obj.get("spec"):
                generation += 1
        if previous is not None and "status" in previous.obj:
            # As through the main resource of a kind with a status subresource: the status
            # is not the writer's to change.
            obj = {**obj, "status": previous.obj["status"]}
        stored = self._store(obj, generation)
        if previous is None:
            self._append(_Change(kind, self._rv, "ADDED", None, stored.obj))
        else:
            self._append(_Change(kind, self._rv, "MODIFIED", previous.obj, stored.obj))
        return stored.obj

    def delete(self, namespace: str, name: str, kind: str = "EndpointSlice") -> None:
        """Delete an object; KeyError when there is none."""
        previous = self._objects.pop((kind, namespace, name))
        self._rv += 1
        gone = copy.deepcopy(previous.obj)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._append(_Change(kind, self._rv, "DELETED", previous.obj, gone))

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """The stored object, or None."""
        stored = self._objects.get((kind, namespace, name))
        return stored.obj if stored is not None else None

    def compact(self) -> None:
        """Forget the event history: watches from an older resourceVersion get 410 Gone."""
        self._history.clear()
        self._compacted_rv = self._rv

    def drop_watches(self) -> None:
        """Cut every open watch stream mid-flight (no clean end of the chunked body)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)

    def silence_watches(self) -> None:
        """Make every open watch stream go quiet without closing, like a dropped connection."""
        for watcher in self._watchers:
            watcher.silent = True

    def send_raw_event(self, line: bytes) -> None:
        """Write ``line`` as is to every open watch stream (a corrupt or foreign event)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(line)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to watches that asked for them."""
        for watcher in self._watchers:
            if watcher.bookmarks:
                watcher.queue.put_nowait(self._rv)

    def set_forbidden(self, forbidden: bool, kinds: Iterable[str] = ()) -> None:
        """Answer new requests for ``kinds`` (default: all) 403, as when the RBAC grant is
        missing; open watches stay."""
        chosen = set(kinds or RESOURCES)
        self._forbidden = self._forbidden | chosen if forbidden else self._forbidden - chosen

    def set_absent(self, absent: bool, kinds: Iterable[str] = GATEWAY_API_KINDS) -> None:
        """Answer requests for ``kinds`` 404, as when their CRDs are not installed."""
        chosen = set(kinds)
        self._absent = self._absent | chosen if absent else self._absent - chosen

    # ----- storage -------------------------------------------------------------------------

    def _store(self, obj: Obj, generation: int = 1) -> _Stored:
        self._rv += 1
        stored_obj = copy.deepcopy(obj)
        kind = stored_obj["kind"]
        meta = stored_obj["metadata"]
        if not RESOURCES[kind].namespaced:
            meta.pop("namespace", None)
        namespace = meta.get("namespace", "")
        meta["resourceVersion"] = str(self._rv)
        meta.setdefault("uid", f"uid-{kind}-{namespace}-{meta['name']}")
        meta["generation"] = generation
        raw = json.dumps(stored_obj, separators=(",", ":")).encode()
        stored = _Stored(stored_obj, raw)
        self._objects[(kind, namespace, meta["name"])] = stored
        return stored

    def _append(self, change: _Change) -> None:
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._compacted_rv = self._history.popleft().rv
        for watcher in self._watchers:
            if watcher.kind == change.kind:
                watcher.queue.put_nowait(change)

    # ----- HTTP ----------------------------------------------------------------------------

    def _object_handler(
        self, resource: Resource
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.object_reads += 1
            found = self._lookup(resource, request)
            if isinstance(found, web.Response):
                return found
            return web.Response(body=found.raw, content_type="application/json")

        return handle

    def _lookup(self, resource: Resource, request: web.Request) -> _Stored | web.Response:
        if resource.kind in self._absent:
            return _status_response(
                status_object(404, "NotFound", "the server could not find the requested resource")
            )
        namespace = request.match_info.get("namespace", "")
        name = request.match_info["name"]
        stored = self._objects.get((resource.kind, namespace, name))
        if stored is None:
            message = f'{resource.plural}.{resource.group} "{name}" not found'
            return _status_response(status_object(404, "NotFound", message))
        return stored

    async def _create_lease(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        namespace = request.match_info["namespace"]
        name = body["metadata"]["name"]
        if ("Lease", namespace, name) in self._objects:
            message = f'leases.coordination.k8s.io "{name}" already exists'
            return _status_response(status_object(409, "AlreadyExists", message))
        body["metadata"]["namespace"] = namespace
        stored = self._store({**body, "kind": "Lease", "apiVersion": LEASES.api_version})
        self._append(_Change("Lease", self._rv, "ADDED", None, stored.obj))
        self.lease_writes += 1
        return web.Response(status=201, body=stored.raw, content_type="application/json")

    async def _replace_lease(self, request: web.Request) -> web.Response:
        found = self._lookup(LEASES, request)
        if isinstance(found, web.Response):
            return found
        body = json.loads(await request.read())
        sent = (body.get("metadata") or {}).get("resourceVersion")
        current = found.obj
        if not sent or sent != current["metadata"]["resourceVersion"]:
            message = (
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "'
                f'{current["metadata"]["name"]}": the object has been modified; please apply'
                " your changes to the latest version and try again"
            )
            self.lease_conflicts += 1
            return _status_response(status_object(409, "Conflict", message))
        replaced = {**current, "spec": body.get("spec") or {}}
        stored = self._store(replaced, int(current["metadata"]["generation"]))
        self._append(_Change("Lease", self._rv, "MODIFIED", current, stored.obj))
        self.lease_writes += 1
        return web.Response(body=stored.raw, content_type="application/json")

    def _status_handler(
        self, resource: Resource
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            found = self._lookup(resource, request)
            if isinstance(found, web.Response):
                return found
            try:
                body = json.loads(await request.read())
            except ValueError as exc:
                return _status_response(status_object(400, "BadRequest", str(exc)))
            content_type = request.headers.get("Content-Type", "")
            current = found.obj
            if request.method == "PATCH":
                if content_type.startswith("application/json-patch+json"):
                    if not isinstance(body, list):
                        message = (
                            "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                        )
                        return _status_response(status_object(400, "BadRequest", message))
                    return _status_response(
                        status_object(415, "UnsupportedMediaType", "JSON patch not implemented")
                    )
                if not content_type.startswith("application/merge-patch+json"):
                    return _status_response(
                        status_object(415, "UnsupportedMediaType", f"{content_type} not supported")
                    )
                wanted = _merge_patch(current, body)
                sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            else:
                if not isinstance(body, dict):
                    return _status_response(status_object(400, "BadRequest", "not an object"))
                wanted = {**current, "status": body.get("status")}
                sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            if self.conflicts_to_inject > 0 or (
                sent_rv and sent_rv != current["metadata"]["resourceVersion"]
            ):
                self.conflicts_to_inject = max(0, self.conflicts_to_inject - 1)
                message = (
                    f"Operation cannot be fulfilled on {resource.plural}.{resource.group} "
                    f'"{current["metadata"]["name"]}": the object has been modified; please apply'
                    " your changes to the latest version and try again"
                )
                return _status_response(status_object(409, "Conflict", message))
            problems = status_problems(resource.kind, wanted.get("status"))
            if problems:
                message = (
                    f'{resource.kind} "{current["metadata"]["name"]}" is invalid: '
                    + ", ".join(problems)
                )
                return _status_response(status_object(422, "Invalid", message))
            updated = copy.deepcopy(current)
            updated["status"] = wanted.get("status")
            key = (
                resource.kind,
                current["metadata"].get("namespace", ""),
                current["metadata"]["name"],
            )
            stored = self._store(updated, int(current["metadata"]["generation"]))
            self._append(_Change(resource.kind, self._rv, "MODIFIED", current, stored.obj))
            self.status_writes += 1
            self.status_writes_of[key] = self.status_writes_of.get(key, 0) + 1
            return web.Response(body=stored.raw, content_type="application/json")

        return handle

    def _handler(
        self, resource: Resource
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(resource, request)

        return handle

    async def _handle(self, resource: Resource, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info.get("namespace")
        watching = _parse_bool(request.query.get("watch"))
        if resource.kind in self._absent:
            # What a real API server says for a resource no CRD defines.
            return _status_response(
                status_object(404, "NotFound", "the server could not find the requested resource")
            )
        if resource.kind in self._forbidden:
            return self._forbidden_response(resource, "watch" if watching else "list", namespace)
        try:
            matches = self._predicate(request, resource, namespace)
        except SelectorError as exc:
            return _status_response(status_object(400, "BadRequest", str(exc)))
        if watching:
            return await self._watch(request, resource, matches)
        return self._list(request, resource, namespace, matches)

    def _predicate(
        self, request: web.Request, resource: Resource, namespace: str | None
    ) -> Predicate:
        labels = parse_label_selector(request.query.get("labelSelector", ""))
        fields = parse_field_selector(request.query.get("fieldSelector", ""))

        def matches(obj: Obj) -> bool:
            if obj["kind"] != resource.kind:
                return False
            in_scope = namespace is None or obj["metadata"].get("namespace") == namespace
            return in_scope and labels(obj) and fields(obj)

        return matches

    def _forbidden_response(
        self, resource: Resource, verb: str, namespace: str | None
    ) -> web.Response:
        where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        qualified = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        message = (
            f'{qualified} is forbidden: User "system:serviceaccount:mesh:sds"'
            f' cannot {verb} resource "{resource.plural}" in API group "{resource.group}" {where}'
        )
        body = status_object(403, "Forbidden", message)
        body["details"] = {"group": resource.group, "kind": resource.plural}
        return _status_response(body)

    def _list(
        self, request: web.Request, resource: Resource, namespace: str | None, matches: Predicate
    ) -> web.Response:
        self.list_requests += 1
        if self.list_failures_to_inject.get(resource.kind, 0) > 0:
            self.list_failures_to_inject[resource.kind] -= 1
            return _status_response(status_object(500, "InternalError", "etcd is unhappy"))
        query = "|".join(
            (
                resource.kind,
                namespace or "",
                request.query.get("labelSelector", ""),
                request.query.get("fieldSelector", ""),
            )
        )
        limit = int(request.query.get("limit") or 0)
        token = request.query.get("continue", "")
        if token:
            snapshot_id, offset = _decode_continue(token)
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is None or snapshot.query != query:
                return _status_response(status_object(400, "BadRequest", "invalid continue token"))
            if snapshot.rv < self._compacted_rv or self.expire_continue_tokens:
                self._snapshots.pop(snapshot_id, None)
                return _status_response(
                    status_object(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent"
                        " list result. You can start a new list without the continue parameter.",
                    )
                )
        else:
            self.lists += 1
            self.lists_of[resource.kind] += 1
            items = [s for _, s in sorted(self._objects.items()) if matches(s.obj)]
            snapshot_id, offset = next(self._snapshot_ids), 0
            snapshot = _ListSnapshot(self._rv, items, query)
        end = len(snapshot.items) if limit <= 0 else offset + limit
        page = snapshot.items[offset:end]
        metadata: Obj = {"resourceVersion": str(snapshot.rv)}
        if end < len(snapshot.items):
            metadata["continue"] = _encode_continue(snapshot_id, end)
            metadata["remainingItemCount"] = len(snapshot.items) - end
            self._snapshots[snapshot_id] = snapshot
            while len(self._snapshots) > 64:  # abandoned paginations must not pile up
                del self._snapshots[next(iter(self._snapshots))]
        else:
            self._snapshots.pop(snapshot_id, None)
        head = json.dumps(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": metadata,
            },
            separators=(",", ":"),
        ).encode()
        body = head[:-1] + b',"items":[' + b",".join(s.raw for s in page) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def _watch(
        self, request: web.Request, resource: Resource, matches: Predicate
    ) -> web.StreamResponse:
        self.watches += 1
        self.watches_of[resource.kind] += 1
        if self.hang_new_watches:
            await asyncio.Event().wait()  # until the client gives up and the handler is cancelled
        requested = request.query.get("resourceVersion", "")
        self.watch_resource_versions.append(requested)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = _parse_bool(request.query.get("allowWatchBookmarks"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        if requested not in ("", "0") and int(requested) < self._compacted_rv:
            # Real API servers answer 200 and say it in the stream, then end it.
            await response.prepare(request)
            error = status_object(410, "Expired", f"too old resource version: {requested}")
            await response.write(_event_line("ERROR", error))
            await response.write_eof()
            return response
        watcher = _Watcher(resource.kind, matches, bookmarks)
        # Register and collect the replay without an await in between: nothing is lost.
        self._watchers.add(watcher)
        try:
            if requested in ("", "0"):
                backlog = [
                    _event_line("ADDED", s.obj)
                    for _, s in sorted(self._objects.items())
                    if matches(s.obj)
                ]
            else:
                since = int(requested)
                backlog = [
                    line
                    for change in self._history
                    if change.rv > since
                    and change.kind == resource.kind
                    and (line := self._translate(change, matches))
                ]
            await response.prepare(request)
            for line in backlog:
                await response.write(line)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        item = await watcher.queue.get()
                except TimeoutError:
                    break
                if item is None:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if watcher.silent:
                    continue
                if isinstance(item, bytes):
                    await response.write(item)
                elif isinstance(item, int):
                    bookmark = {
                        "kind": resource.kind,
                        "apiVersion": resource.api_version,
                        "metadata": {"resourceVersion": str(item)},
                    }
                    await response.write(_event_line("BOOKMARK", bookmark))
                elif line := self._translate(item, matches):
                    await response.write(line)
            await response.write_eof()
            return response
        finally:
            self._watchers.discard(watcher)

    @staticmethod
    def _translate(change: _Change, matches: Predicate) -> bytes:
        """The event a selective watcher sees: objects moving in or out are ADDED or DELETED."""
        was = change.old is not None and matches(change.old)
        now = matches(change.new)
        if change.type == "DELETED":
            kind = "DELETED" if was else ""
        elif was and now:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif was:
            kind = "DELETED"
        else:
            kind = ""
        return _event_line(kind, change.new) if kind else b""


def _event_line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _condition_problems(where: str, conditions: Any) -> list[str]:
    if not isinstance(conditions, list) or len(conditions) > 8:
        return [f"{where}.conditions: must be a list of at most 8"]
    problems: list[str] = []
    for i, c in enumerate(conditions):
        at = f"{where}.conditions[{i}]"
        if not isinstance(c, dict):
            problems.append(f"{at}: must be an object")
            continue
        for field_name in ("type", "status", "reason", "message", "lastTransitionTime"):
            if not isinstance(c.get(field_name), str):
                problems.append(f"{at}.{field_name}: Required value")
        if c.get("status") not in ("True", "False", "Unknown"):
            problems.append(f"{at}.status: Unsupported value: {c.get('status')!r}")
        if isinstance(c.get("reason"), str) and not _REASON.match(c["reason"]):
            problems.append(f"{at}.reason: Invalid value")
        if isinstance(c.get("lastTransitionTime"), str) and not _TIME.match(
            c["lastTransitionTime"]
        ):
            problems.append(f"{at}.lastTransitionTime: Invalid value")
        generation = c.get("observedGeneration", 0)
        if not isinstance(generation, int) or generation < 0:
            problems.append(f"{at}.observedGeneration: Invalid value")
    return problems


def status_problems(kind: str, status: Any) -> list[str]:
    """What the v1.6.1 CRD schema refuses in a status (a subset of its rules: the required
    fields, condition shapes and list limits)."""
    if status is None:
        return []
    if not isinstance(status, dict):
        return ["status: must be an object"]
    problems: list[str] = []
    if "conditions" in status:
        problems += _condition_problems("status", status["conditions"])
    if kind in ("HTTPRoute", "GRPCRoute"):
        parents = status.get("parents")
        if not isinstance(parents, list) or len(parents) > 32:
            return [*problems, "status.parents: Required value, at most 32"]
        for i, parent in enumerate(parents):
            at = f"status.parents[{i}]"
            if not isinstance(parent, dict):
                problems.append(f"{at}: must be an object")
                continue
            if not isinstance((parent.get("parentRef") or {}).get("name"), str):
                problems.append(f"{at}.parentRef.name: Required value")
            if not isinstance(parent.get("controllerName"), str):
                problems.append(f"{at}.controllerName: Required value")
            problems += _condition_problems(at, parent.get("conditions"))
    if kind == "Gateway":
        for i, listener in enumerate(status.get("listeners") or ()):
            at = f"status.listeners[{i}]"
            if not isinstance(listener, dict):
                problems.append(f"{at}: must be an object")
                continue
            if not isinstance(listener.get("name"), str):
                problems.append(f"{at}.name: Required value")
            if not isinstance(listener.get("attachedRoutes"), int):
                problems.append(f"{at}.attachedRoutes: Required value")
            if not isinstance(listener.get("supportedKinds"), list):
                problems.append(f"{at}.supportedKinds: Required value")
            problems += _condition_problems(at, listener.get("conditions"))
        for i, address in enumerate(status.get("addresses") or ()):
            if not isinstance(address, dict) or not isinstance(address.get("value"), str):
                problems.append(f"status.addresses[{i}].value: Required value")
    return problems


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: a merge patch applied to ``target``."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(merged.get(key), value)
    return merged


def _status_response(status: Obj) -> web.Response:
    return web.Response(
        status=int(status["code"]),
        body=json.dumps(status).encode(),
        content_type="application/json",
    )


def _encode_continue(snapshot_id: int, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([snapshot_id, offset]).encode()).decode()


def _decode_continue(token: str) -> tuple[int, int]:
    try:
        snapshot_id, offset = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, TypeError):
        return (0, 0)
    return int(snapshot_id), int(offset)


# ----- a preloaded cluster in its own process ----------------------------------------------


def cluster(services: int, endpoints_per_service: int, namespaces: int) -> Iterable[Obj]:
    """``services`` one-slice services spread over namespaces, each with its own addresses."""
    addresses = (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}" for n in itertools.count(1))
    for i in range(services):
        yield endpoint_slice(
            f"svc-{i}-abcde",
            f"ns-{i % namespaces}",
            f"svc-{i}",
            addresses=[next(addresses) for _ in range(endpoints_per_service)],
            zone=f"zone-{i % 3}",
        )


async def _serve(args: argparse.Namespace) -> None:
    server = FakeApiServer()
    for obj in cluster(args.services, args.endpoints_per_service, args.namespaces):
        server.apply(obj)
    await server.start()
    print(json.dumps({"url": server.url, "objects": args.services}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a preloaded cluster until SIGTERM; prints ``{"url": ...}`` once listening."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints-per-service", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=10)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
