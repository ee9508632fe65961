"""Self-registration: hosts announce themselves over HTTP (lyft/discovery compatible).

A host POSTs ``/v1/registration/{service}`` when it starts and again as a heartbeat; it is
removed by DELETE or, when it stops checking in, ``host_ttl`` seconds later by a background
sweep. Unlike lyft/discovery the key is (service, ip, port), so one machine may run several
instances, and IPv6 works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from sds import metrics, validation
from sds.errors import InvalidInput, LimitReached, NotFound
from sds.model import Endpoint, Source
from sds.registry import Registry

log = logging.getLogger("sds.registration")

# Tags that map onto Endpoint fields rather than being carried along as-is.
_ROUTED_TAGS = frozenset({"az", "region", "canary", "load_balancing_weight"})


@dataclass(slots=True)
class Host:
    """One registered instance, as the registration source remembers it."""

    service: str
    ip: str
    port: int
    revision: str = ""
    service_repo_name: str = ""
    tags: dict[str, Any] = field(default_factory=dict)
    last_check_in: float = 0.0  # wall clock, for display
    seen: float = 0.0  # monotonic clock, for expiry: immune to clock steps

    def endpoint(self) -> Endpoint:
        """The registry's view of this host."""
        return Endpoint(
            address=self.ip,
            port=self.port,
            source=Source.REGISTRATION,
            zone=str(self.tags.get("az", "")),
            region=str(self.tags.get("region", "")),
            canary=bool(self.tags.get("canary", False)),
            weight=int(self.tags.get("load_balancing_weight", 1)),
            revision=self.revision,
            service_repo_name=self.service_repo_name,
            tags=tuple(sorted((k, str(v)) for k, v in self.tags.items() if k not in _ROUTED_TAGS)),
            last_check_in=self.last_check_in,
        )


# A sweep this much later than planned means sds itself was not running, not that it was busy.
STALL_SLACK = 1.0


@dataclass(frozen=True, slots=True)
class RegistrationLimits:
    """What self-registration accepts; every bound has a flag (see :mod:`sds.config`)."""

    allow_loopback: bool = False
    tags: validation.TagLimits = field(default_factory=validation.TagLimits)
    max_field_bytes: int = 256  # revision and service_repo_name
    max_hosts_per_service: int = 10_000
    max_services: int = 10_000


class RegistrationSource:
    """Accepts registrations, heartbeats and removals; expires silent hosts."""

    def __init__(
        self,
        registry: Registry,
        *,
        host_ttl: float,
        warmup: float = 0.0,
        heartbeat_interval: float | None = None,
        sweep_interval: float | None = None,
        limits: RegistrationLimits | None = None,
    ) -> None:
        self._registry = registry
        self._limits = limits or RegistrationLimits()
        self._ttl = host_ttl
        self._warmup = warmup
        self._interval = heartbeat_interval
        self._sweep_interval = sweep_interval or min(max(host_ttl / 10, 0.05), 30.0)
        self._hosts: dict[tuple[str, str, int], Host] = {}
        self._per_service: Counter[str] = Counter()

    async def run(self) -> None:
        """Warm up, then expire hosts whose last check-in is older than the TTL, until cancelled.

        Registrations are soft state: after a restart they return with each host's next
        heartbeat. Until the warm-up has passed, the source is not ready, so surfaces hold
        back empty answers rather than tell proxies a service has no hosts.
        """
        status = Source.REGISTRATION.value
        self._check_timing()
        if self._warmup:
            basis = ""
            if self._interval:
                multiple = self._warmup / self._interval
                basis = f" ({multiple:g} times the {self._interval:g}s heartbeat interval)"
            self._registry.set_source_status(
                status,
                ready=False,
                reason=f"warming up (registration): {self._warmup:g}s{basis} for registered hosts"
                " to check in again after a start; until then proxies that had hosts keep them",
                until=time.monotonic() + self._warmup,
            )
            await asyncio.sleep(self._warmup)
        self._registry.set_source_status(status, ready=True)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self._sweep_interval)
            now = time.monotonic()
            self.forgive_stall(now - last - self._sweep_interval)
            last = now
            self.expire(now)

    def forgive_stall(self, stalled: float) -> None:
        """Give every host back the ``stalled`` seconds in which sds itself did not run.

        A host cannot check in with a server that is frozen (SIGSTOP, a paused VM, a long
        GC pause): its heartbeats wait in the socket backlog. Expiring it the moment sds runs
        again, before those heartbeats are read, would empty every service at once.
        """
        if stalled < STALL_SLACK:
            return
        for host in self._hosts.values():
            host.seen += stalled
        metrics.STALLS.inc()
        log.warning(
            "sds did not run for a while; host TTLs extended by that time",
            extra={"stalled_seconds": round(stalled, 1), "hosts": len(self._hosts)},
        )

    def _check_timing(self) -> None:
        """Warn about timings that defeat themselves; they are allowed (tests need them)."""
        if self._interval is None:
            return
        timing = {"heartbeat_interval": self._interval, "ttl": self._ttl, "warmup": self._warmup}
        if self._ttl <= self._interval:
            log.warning(
                "host TTL is not longer than the heartbeat interval: live hosts will expire"
                " between heartbeats",
                extra=timing,
            )
        if 0 < self._warmup < self._interval:
            log.warning(
                "registration warm-up is shorter than the heartbeat interval: after a restart,"
                " hosts may be answered as gone before they check in",
                extra=timing,
            )

    def expire(self, now: float) -> int:
        """Remove every host not heard from for ``host_ttl`` seconds (``now``: monotonic)."""
        deadline = now - self._ttl
        expired = [key for key, host in self._hosts.items() if host.seen < deadline]
        for key in expired:
            host = self._hosts.pop(key)
            self._forget(host.service)
            self._registry.remove(Source.REGISTRATION, host.service, host.ip, host.port)
            log.info(
                "host expired",
                extra={"service": host.service, "ip": host.ip, "port": host.port, "ttl": self._ttl},
            )
        if expired:
            metrics.EXPIRIES.inc(len(expired))
        return len(expired)

    def register(self, service: str, fields: dict[str, Any]) -> Host:
        """Register or heartbeat a host from lyft-style fields; tags merge on re-post.

        Everything is checked before anything changes: a refused write leaves the host as
        it was.
        """
        limits = self._limits
        service = validation.service_name(service)
        if "ip" not in fields or "port" not in fields:
            raise InvalidInput("ip and port are required")
        ip = validation.host_address(fields["ip"], allow_loopback=limits.allow_loopback)
        port = validation.port(fields["port"])
        tags = validation.tags(fields.get("tags"), limits.tags)
        size, flag = limits.max_field_bytes, "--max-field-bytes"
        revision = validation.text(fields.get("revision"), "revision", size, flag)
        repo = validation.text(fields.get("service_repo_name"), "service_repo_name", size, flag)

        key = (service, ip, port)
        host = self._hosts.get(key)
        merged = len((host.tags if host else {}).keys() | tags.keys())
        if merged > limits.tags.max_tags:
            raise InvalidInput(
                f"the host would carry {merged} tags, over the {limits.tags.max_tags}"
                " allowed (--max-tags)",
            )
        kind = "heartbeat"
        if host is None:
            self._check_room(service)
            host = Host(service=service, ip=ip, port=port)
            self._hosts[key] = host
            self._per_service[service] += 1
            kind = "new"
        host.tags.update(tags)
        if revision:
            host.revision = revision
        if repo:
            host.service_repo_name = repo
        host.last_check_in = time.time()
        host.seen = time.monotonic()
        if self._registry.upsert(Source.REGISTRATION, service, host.endpoint()) and kind != "new":
            kind = "change"
        metrics.REGISTRATIONS.labels(kind=kind).inc()
        if kind != "heartbeat":
            log.info(
                "host registered", extra={"service": service, "ip": ip, "port": port, "kind": kind}
            )
        return replace(host, tags=dict(host.tags))

    def deregister(self, service: str, ip: str, port: int | None = None) -> int:
        """Remove one instance (``port``) or every instance on ``ip``; 404 when none."""
        service = validation.service_name(service)
        ip = validation.ip_address(ip)
        doomed = [k for k in self._hosts if k[0] == service and k[1] == ip and port in (None, k[2])]
        if not doomed:
            raise NotFound(f"no host {ip}{f':{port}' if port else ''} in service {service}")
        for key in doomed:
            del self._hosts[key]
            self._forget(service)
        self._registry.remove(Source.REGISTRATION, service, ip, port)
        metrics.DEREGISTRATIONS.inc(len(doomed))
        log.info("host deregistered", extra={"service": service, "ip": ip, "port": port})
        return len(doomed)

    def _check_room(self, service: str) -> None:
        """409 when a new host would take ``service`` or the registry past its bound."""
        limits = self._limits
        count = self._per_service.get(service, 0)
        if count >= limits.max_hosts_per_service:
            raise LimitReached(
                f"service {service} already has {count} registered hosts, the most allowed"
                " (--max-hosts-per-service)",
            )
        if count == 0 and len(self._per_service) >= limits.max_services:
            raise LimitReached(
                f"{len(self._per_service)} services are registered already, the most allowed"
                " (--max-services)",
            )

    def _forget(self, service: str) -> None:
        self._per_service[service] -= 1
        if self._per_service[service] <= 0:
            del self._per_service[service]

    def set_weight(self, service: str, ip: str | None, value: object) -> int:
        """Set the load-balancing weight of one IP's instances, or of the whole service."""
        service = validation.service_name(service)
        weight = validation.weight(value)
        address = validation.ip_address(ip) if ip is not None else None
        hosts = [h for k, h in self._hosts.items() if k[0] == service and address in (None, k[1])]
        if not hosts:
            target = f"host {address}" if address else "any host"
            raise NotFound(f"{target} not registered in service {service}")
        for host in hosts:
            host.tags["load_balancing_weight"] = weight
            self._registry.upsert(Source.REGISTRATION, service, host.endpoint())
        return len(hosts)
