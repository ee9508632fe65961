"""Checks on what clients send: service names, addresses, ports, weights, tags."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from sds.errors import InvalidInput
from sds.model import normalize_ip

# Registered names are plain; Kubernetes services are also reachable as name.namespace.
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,252}$")
QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,252}(\.[A-Za-z0-9][A-Za-z0-9-]{0,62})?$")


def service_name(value: str, *, qualified: bool = False) -> str:
    """``value`` when it is a valid service name, else a 400."""
    pattern = QUALIFIED_NAME if qualified else SERVICE_NAME
    if not pattern.match(value):
        raise InvalidInput(
            f"invalid service name {value[:80]!r}: use letters, digits, '-' and '_'"
            + (" (optionally .namespace)" if qualified else "")
        )
    return value


def json_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    """The JSON object in ``body``, else a 400 (bad JSON, too deep, or not an object)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # JSON and UTF-8 decode errors are ValueErrors
        raise InvalidInput(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return data


def ip_address(value: object) -> str:
    """The canonical form of an IPv4 or IPv6 address, else a 400."""
    if not isinstance(value, str):
        raise InvalidInput("ip must be a string holding an IPv4 or IPv6 address")
    if "%" in value:
        raise InvalidInput(f"invalid ip {value[:80]!r}: zone indexes (%...) are not accepted")
    try:
        return normalize_ip(value)
    except ValueError:
        raise InvalidInput(f"invalid ip {value[:80]!r}: not an IPv4 or IPv6 address") from None


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def host_address(value: object, *, allow_loopback: bool = False) -> str:
    """:func:`ip_address`, refusing addresses no other host could send traffic to.

    Loopback, unspecified, link-local (which includes cloud metadata at 169.254.169.254),
    multicast and broadcast addresses are refused; ``allow_loopback`` admits loopback for a
    mesh on one machine. IPv4-mapped IPv6 addresses are judged by the IPv4 address inside.
    """
    ip = ip_address(value)
    parsed = ipaddress.ip_address(ip)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if parsed.is_loopback:
        if allow_loopback:
            return ip
        kind = "loopback"
    elif parsed.is_unspecified:
        kind = "unspecified"
    elif parsed.is_link_local:
        kind = "link-local"
    elif parsed.is_multicast:
        kind = "multicast"
    elif parsed == _BROADCAST:
        kind = "broadcast"
    else:
        return ip
    hint = (
        " (start sds with --allow-loopback for a mesh on one machine)" if kind == "loopback" else ""
    )
    raise InvalidInput(f"ip {ip} is a {kind} address, which other hosts cannot reach{hint}")


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"{what} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,6}\s*", value):
        return int(value)
    raise InvalidInput(f"{what} must be an integer")


def port(value: object) -> int:
    """A TCP port 1-65535, else a 400."""
    number = _integer(value, "port")
    if not 1 <= number <= 65535:
        raise InvalidInput(f"port must be between 1 and 65535, got {number}")
    return number


def weight(value: object) -> int:
    """A load-balancing weight 1-100, else a 400."""
    number = _integer(value, "load_balancing_weight")
    if not 1 <= number <= 100:
        raise InvalidInput(f"load_balancing_weight must be between 1 and 100, got {number}")
    return number


def text(value: object, what: str, max_bytes: int, flag: str) -> str:
    """Clean text of at most ``max_bytes`` UTF-8 bytes (numbers become text), else a 400.

    Clean: no NUL and no lone surrogate (JSON's ``\\ud800`` escape makes one), so whatever is
    stored can be served back as valid UTF-8.
    """
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidInput(f"{what} must be a string")
    result = str(value)
    if "\x00" in result:
        raise InvalidInput(f"{what} contains a NUL character")
    try:
        size = len(result.encode())
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid Unicode (a lone surrogate)") from None
    if size > max_bytes:
        raise InvalidInput(f"{what} is {size} bytes, over the {max_bytes} allowed ({flag})")
    return result


@dataclass(frozen=True, slots=True)
class TagLimits:
    """How many tags a host may carry, and how long their names and values may be."""

    max_tags: int = 32
    max_key_bytes: int = 64
    max_value_bytes: int = 256


def tags(value: object, limits: TagLimits = TagLimits()) -> dict[str, Any]:
    """Tags as lyft sent them (a JSON string) or as an object; checked and normalised."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise InvalidInput("Invalid json supplied in tags") from None
    if not isinstance(value, dict):
        raise InvalidInput("tags must be a JSON object")
    if len(value) > limits.max_tags:
        raise InvalidInput(f"{len(value)} tags, over the {limits.max_tags} allowed (--max-tags)")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        text(key, "a tag name", limits.max_key_bytes, "--max-tag-key-bytes")
        if key == "canary":
            flag = item.lower() == "true" if isinstance(item, str) else item
            if not isinstance(flag, bool) or (
                isinstance(item, str) and item.lower() != str(flag).lower()
            ):
                raise InvalidInput("tag canary must be true or false")
            checked[key] = flag
        elif key == "load_balancing_weight":
            checked[key] = weight(item)
        else:
            checked[key] = text(
                item, f"tag {key[:64]!r}", limits.max_value_bytes, "--max-tag-value-bytes"
            )
    return checked
