"""One writer among replicas: a ``coordination.k8s.io/v1`` Lease, held as client-go holds it.

Every replica tries to acquire or renew the Lease every ``retry_period``. A Lease held by
another identity is taken only once its holder has not renewed it for ``lease_duration``, as
measured on our own clock from when we last saw the record change (client-go's observed time:
no trust in other machines' clocks). Every write carries the resourceVersion read, so of two
replicas racing for an expired Lease one gets 409 Conflict and stays a follower. The leader
renews every ``retry_period``; if no renewal succeeded for ``renew_deadline`` it stops being
the leader at once, before the Lease can expire and another replica take over
(``renew_deadline`` < ``lease_duration``). On shutdown the leader releases the Lease so another
replica takes over without waiting (``release_on_cancel``, as client-go's ReleaseOnCancel).

:attr:`LeaderElector.leading` is what the status writer checks before each write; it is
false the moment the renew deadline passes, without waiting for the elector's next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from sds.sources.reflector import Backoff, connect_retrying

log = logging.getLogger("sds.leader")


@dataclass(frozen=True, slots=True)
class LeaderElectionSettings:
    """The Lease and its timings, as client-go's LeaderElectionConfig names them."""

    name: str = "envoymesh-sds"
    namespace: str = "default"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    request_timeout: float = 5.0
    release_on_cancel: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry_period < renew_deadline < lease_duration")


def identity() -> str:
    """This replica's identity: ``$POD_NAME``, else the hostname and the process id."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


class LeaderElector:
    """Holds the Lease while it can; :attr:`leading` says whether this replica may write."""

    def __init__(
        self,
        *,
        kube_api_url: str = "",
        kubeconfig: str = "",
        settings: LeaderElectionSettings | None = None,
        holder: str = "",
    ) -> None:
        self._kube_api_url = kube_api_url
        self._kubeconfig = kubeconfig
        self.settings = settings or LeaderElectionSettings()
        self.identity = holder or identity()
        self._renewed_at: float | None = None  # when our last renewal succeeded
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self.transitions = 0
        """How many times this replica became the leader."""

    @property
    def leading(self) -> bool:
        """Whether this replica holds the Lease: a successful renewal within the deadline."""
        if self._renewed_at is None:
            return False
        loop = asyncio.get_running_loop()
        return loop.time() - self._renewed_at < self.settings.renew_deadline

    async def run(self) -> None:
        """Acquire and renew until cancelled; then release the Lease if we hold it."""
        api_client = await connect_retrying(self._kube_api_url, self._kubeconfig, Backoff(), log)
        api = client.CoordinationV1Api(api_client)
        try:
            while True:
                was = self.leading
                try:
                    async with asyncio.timeout(self.settings.request_timeout):
                        await self._try(api)
                except (ApiException, TimeoutError, OSError) as exc:
                    log.debug("lease not acquired or renewed", extra={"error": str(exc)})
                if was and not self.leading:
                    log.warning(
                        "lost the lease: no longer writing status",
                        extra={"identity": self.identity, "lease": self.settings.name},
                    )
                    self._renewed_at = None
                await asyncio.sleep(self.settings.retry_period)
        finally:
            try:
                if self.leading and self.settings.release_on_cancel:
                    self._renewed_at = None
                    with contextlib.suppress(ApiException, TimeoutError, OSError):
                        async with asyncio.timeout(self.settings.request_timeout):
                            await self._release(api)
            finally:
                await api_client.close()

    async def _try(self, api: client.CoordinationV1Api) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        try:
            lease = await api.read_namespaced_lease(settings.name, settings.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=settings.name, namespace=settings.namespace),
                spec=self._spec(now, acquired=now, transitions=0),
            )
            await api.create_namespaced_lease(settings.namespace, body)
            self._became_leader(loop.time())
            return
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        record = (holder, str(spec.renew_time))
        if record != self._observed:
            self._observed, self._observed_at = record, loop.time()
        ours = holder == self.identity
        duration = spec.lease_duration_seconds or settings.lease_duration
        expired = loop.time() - self._observed_at >= duration
        if holder and not ours and not expired:
            return  # someone else leads
        transitions = int(spec.lease_transitions or 0) + (0 if ours else 1)
        acquired = spec.acquire_time if ours and spec.acquire_time else now
        lease.spec = self._spec(now, acquired=acquired, transitions=transitions)
        # The resourceVersion read goes with the write: a racing replica gets 409.
        await api.replace_namespaced_lease(settings.name, settings.namespace, lease)
        if ours and self._renewed_at is not None:
            self._renewed_at = loop.time()
        else:
            self._became_leader(loop.time())

    def _became_leader(self, at: float) -> None:
        self._renewed_at = at
        self.transitions += 1
        log.info(
            "acquired the lease: writing status",
            extra={"identity": self.identity, "lease": self.settings.name},
        )

    def _spec(self, now: datetime, *, acquired: datetime, transitions: int) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, round(self.settings.lease_duration)),
            acquire_time=acquired,
            renew_time=now,
            lease_transitions=transitions,
        )

    async def _release(self, api: client.CoordinationV1Api) -> None:
        settings = self.settings
        lease = await api.read_namespaced_lease(settings.name, settings.namespace)
        if lease.spec is None or lease.spec.holder_identity != self.identity:
            return
        lease.spec.holder_identity = ""
        lease.spec.renew_time = datetime.now(UTC)
        lease.spec.lease_duration_seconds = 1
        await api.replace_namespaced_lease(settings.name, settings.namespace, lease)
        log.info("released the lease", extra={"identity": self.identity})
