"""What the discovery server knows about: endpoints of services, and their health."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum


class Health(StrEnum):
    """Endpoint health, in the terms Envoy's EDS uses."""

    HEALTHY = "HEALTHY"
    DRAINING = "DRAINING"
    UNHEALTHY = "UNHEALTHY"


class Source(StrEnum):
    """Where an endpoint was learned."""

    KUBERNETES = "kubernetes"
    REGISTRATION = "registration"


class IpFamily(StrEnum):
    """Which address families of a dual-stack service are served."""

    IPV4 = "IPv4"
    IPV6 = "IPv6"
    BOTH = "both"

    @classmethod
    def _missing_(cls, value: object) -> IpFamily | None:
        """Accept any spelling of the case: ``ipv6`` is ``IPv6``."""
        text = str(value).lower()
        return next((member for member in cls if member.value.lower() == text), None)

    @property
    def address_types(self) -> frozenset[str]:
        """The EndpointSlice ``addressType`` values of this choice."""
        if self is IpFamily.BOTH:
            return frozenset({IpFamily.IPV4.value, IpFamily.IPV6.value})
        return frozenset({self.value})


def normalize_ip(text: str) -> str:
    """The canonical text form of an IPv4 or IPv6 address; ValueError when not one."""
    return str(ipaddress.ip_address(text.strip()))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a service.

    Equality ignores ``last_check_in`` so a heartbeat is not a change: Envoy only needs a new
    version when something it routes on changes.
    """

    address: str
    port: int
    source: Source
    zone: str = ""
    region: str = ""
    canary: bool = False
    weight: int = 1
    health: Health = Health.HEALTHY
    revision: str = ""
    service_repo_name: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    last_check_in: float | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the endpoint within one source of one service."""
        return (self.address, self.port)

    def sort_key(self) -> tuple[int, bytes, int, str]:
        """Stable order: by address family, address bytes, port, source."""
        ip = ipaddress.ip_address(self.address)
        return (ip.version, ip.packed, self.port, self.source.value)


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    """A service as surfaces see it: immutable, with the version of its last real change."""

    name: str
    version: int
    endpoints: tuple[Endpoint, ...]

    @property
    def healthy(self) -> tuple[Endpoint, ...]:
        """The endpoints that should receive new traffic."""
        return tuple(e for e in self.endpoints if e.health is Health.HEALTHY)
