"""Self-registration with sds: announce this replica, heartbeat, deregister on the way out.

A replica registers one address under one or more services, each with its own port (the HTTP
API as ``usersvc``, the gRPC API as ``usersvc-grpc``); they come and go together.

The replica is registered only while its database answers: it registers once the database
does, and deregisters when the database stops answering, so the edge sends no requests to a
replica that could only answer 503; it registers again when the database is back. A failed
heartbeat is retried on the next tick; sds keeps registrations as soft state, so after an sds
restart the next heartbeat restores this replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

import httpx
from pydantic import SecretStr

log = logging.getLogger("usersvc.registration")

# Seconds between database checks while registered.
HEALTH_CHECK_INTERVAL = 1.0


class Registration:
    """Keeps one instance registered with sds, under each service of ``ports`` (service name to
    port), until :meth:`deregister`."""

    def __init__(
        self,
        sds_url: str,
        *,
        ports: Mapping[str, int],
        address: str,
        interval: float,
        token: SecretStr | None,
        healthy: Callable[[], Awaitable[bool]],
    ) -> None:
        headers = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self._client = httpx.AsyncClient(base_url=sds_url, headers=headers, timeout=2.0)
        self._ports = dict(ports)
        self._address = address
        self._interval = interval
        self._healthy = healthy
        self._registered = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin registering and heartbeating in the background."""
        self._task = asyncio.create_task(self._heartbeat(), name="sds-registration")

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        while not self._stop.is_set():
            # The database is checked more often than the heartbeat, so an outage takes this
            # replica out of the edge within about HEALTH_CHECK_INTERVAL.
            if await self._healthy():
                if not self._registered or loop.time() >= next_beat:
                    await self._register()
                    next_beat = loop.time() + self._interval
            elif self._registered:
                log.warning("database unreachable: leaving sds until it is back")
                await self._delete()
            delay = min(self._interval, HEALTH_CHECK_INTERVAL if self._registered else 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _register(self) -> None:
        registered = True
        for service, port in self._ports.items():
            try:
                response = await self._client.post(
                    f"/v1/registration/{service}", json={"ip": self._address, "port": port}
                )
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning(
                    "registration failed",
                    extra={"service": service, "error": str(exc) or type(exc).__name__},
                )
                registered = False
                continue
            if not self._registered:
                log.info(
                    "registered with sds",
                    extra={"service": service, "address": self._address, "port": port},
                )
        # Until every service took it, the next try comes soon rather than a heartbeat later.
        self._registered = registered

    async def deregister(self) -> None:
        """Stop heartbeating and remove this instance from sds (best effort).

        A heartbeat already on its way is let finish first: cancelled, it could still reach
        sds after our DELETE and leave a stopped replica registered until its TTL runs out.
        """
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
            await self._delete()

    async def _delete(self) -> None:
        for service, port in self._ports.items():
            try:
                response = await self._client.delete(
                    f"/v1/registration/{service}/{self._address}/{port}"
                )
                if response.status_code not in (200, 404):
                    response.raise_for_status()
                log.info("deregistered from sds", extra={"service": service})
            except httpx.HTTPError as exc:
                log.warning("deregistration failed", extra={"service": service, "error": str(exc)})
        self._registered = False

    async def close(self) -> None:
        """Deregister and release the HTTP client."""
        await self.deregister()
        await self._client.aclose()
