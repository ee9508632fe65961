"""Who this replica is: the ``hostname`` and ``resolvedname`` every reply carries."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """The pod name and pod IP (or the machine's hostname and its address)."""

    hostname: str
    resolvedname: str


async def discover() -> Identity:
    """``$POD_NAME``/``$POD_IP`` when set, else the hostname and what it resolves to."""
    hostname = os.environ.get("POD_NAME") or socket.gethostname()
    address = os.environ.get("POD_IP")
    if not address:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                socket.gethostname(), None, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
            address = str(infos[0][4][0])
        except (OSError, IndexError):
            address = "127.0.0.1"
    return Identity(hostname=hostname, resolvedname=address)
