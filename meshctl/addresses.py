"""Where each local replica lives: its own loopback address, like a pod IP, when possible."""

from __future__ import annotations

import socket
from dataclasses import dataclass


def loopback_aliases_work() -> bool:
    """True when 127.0.0.2 and beyond are usable (Linux: all of 127/8 is loopback)."""
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ReplicaAddress:
    """One replica's address and ports: usersvc, its sidecar, the sidecar's admin."""

    index: int
    address: str
    usersvc_port: int
    sidecar_port: int
    admin_port: int

    @property
    def name(self) -> str:
        return f"usersvc-{self.index}"


def replica_address(
    index: int, *, aliases: bool, usersvc_port: int, sidecar_port: int, admin_base: int
) -> ReplicaAddress:
    """Replica ``index`` (1-based): 127.0.0.<index+1>, else distinct ports on 127.0.0.1."""
    if aliases:
        return ReplicaAddress(
            index, f"127.0.0.{index + 1}", usersvc_port, sidecar_port, admin_base + index
        )
    return ReplicaAddress(
        index, "127.0.0.1", usersvc_port + index, sidecar_port + index, admin_base + index
    )
