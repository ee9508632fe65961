"""Free TCP ports for servers started by tests, benchmarks and ``meshctl``.

Ports are drawn below Linux's ephemeral range (32768-60999 by default) so a port we picked
cannot be taken in the meantime by the source port of some outgoing connection.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32000


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` right now.

    The probe binds as our servers do, with ``SO_REUSEADDR``: connections that closed a moment
    ago linger in TIME_WAIT on the port, and they block a plain bind but not a server.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports that nothing listens on right now."""
    for _ in range(1000):
        base = random.randrange(_LOW, _HIGH - count)  # noqa: S311 - not security
        if all(port_is_free(host, base + i) for i in range(count)):
            return base
    raise OSError(f"no {count} free consecutive ports between {_LOW} and {_HIGH}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    return free_port_block(1, host)
