"""Wires sources → registry → surfaces together and runs them on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import APIRouter

from sds import metrics
from sds.api.app import create_app
from sds.api.config import config_router
from sds.api.registration import registration_router
from sds.api.v1 import V1Api, V1FastPath
from sds.api.write_access import TokenFileError, WriteAccess
from sds.config import Settings
from sds.model import Source
from sds.registry import Registry
from sds.sources.config_dir import ConfigDirSource
from sds.sources.registration import RegistrationLimits, RegistrationSource
from sds.tls import ServerTls, TlsError
from sds.translate.clusters import UpstreamTls
from sds.ui.live import LiveHub
from sds.ui.router import MAX_CLIENTS, ui_router
from sds.validation import TagLimits
from sds.xds.cache import XdsCache
from sds.xds.grpc_server import start_grpc_server
from sds.xds.proxies import ProxyTracker
from sds.xds.rest import xds_rest_router
from sds.xds.stream import stream_factory

if TYPE_CHECKING:
    from sds.status_writer import StatusWriter

log = logging.getLogger("sds")

# (generation 0, 1, 2) thresholds of the cyclic garbage collector; Python's are 700, 10, 10.
GC_THRESHOLDS = (100_000, 50, 100)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the sds process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def identifier(settings: Settings) -> str:
    """This replica's ``control_plane.identifier``: from the pod name on Kubernetes."""
    if settings.identifier:
        return settings.identifier
    return f"envoymesh-sds/{os.environ.get('POD_NAME') or socket.gethostname()}"


def upstream_tls(settings: Settings) -> UpstreamTls | None:
    """What ``--proxyless-tls`` asks of proxyless clients' calls to backends; None: nothing."""
    if settings.proxyless_tls == "off":
        return None
    return UpstreamTls(
        client_certificate=settings.proxyless_tls == "mtls",
        subject_alt_names=tuple(settings.proxyless_tls_san),
    )


class SdsServer:
    """The discovery server: its registry, sources and HTTP surface."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self._jobs: dict[str, Coroutine[Any, Any, None]] = {}
        self.proxies = ProxyTracker()
        self.xds = XdsCache(
            self.registry,
            debounce=settings.xds_debounce,
            identifier=identifier(settings),
            registration_namespace=settings.registration_namespace,
            proxyless_tls=upstream_tls(settings),
        )
        self.config_source: ConfigDirSource | None = None
        self.status_writer: StatusWriter | None = None
        if settings.config_dir:
            self.config_source = ConfigDirSource(
                self.registry,
                Path(settings.config_dir),
                default_namespace=settings.registration_namespace,
            )
            self._jobs["config-dir"] = self.config_source.run()
        self._make_stream = stream_factory(self.xds, self.proxies, settings.max_subscriptions)
        self._jobs["xds-cache"] = self.xds.run()
        self._jobs["event-loop-lag"] = metrics.measure_event_loop_lag()
        v1 = V1Api(self.registry, settings.env)
        routers: list[APIRouter] = [
            v1.router(),
            xds_rest_router(self.xds, self.proxies, settings.max_subscriptions),
            config_router(self.xds.translator, self.config_source),
        ]
        self.write_access = WriteAccess(
            settings.write_token,
            settings.write_tokens_file,
            allow_anonymous=settings.allow_anonymous_writes,
        )
        self._reload = asyncio.Event()
        self.ui: LiveHub | None = None
        if settings.ui == "on":
            self.ui = LiveHub(
                self.registry,
                self.proxies,
                MAX_CLIENTS,
                translator=self.xds.translator,
                config_source=self.config_source,
            )
            routers.append(ui_router(self.ui))
            self._jobs["ui"] = self.ui.run()
        if Source.REGISTRATION.value in settings.source:
            registration = RegistrationSource(
                self.registry,
                host_ttl=settings.effective_host_ttl,
                warmup=settings.effective_registration_warmup,
                heartbeat_interval=settings.heartbeat_interval,
                limits=RegistrationLimits(
                    allow_loopback=settings.allow_loopback,
                    tags=TagLimits(
                        max_tags=settings.max_tags,
                        max_key_bytes=settings.max_tag_key_bytes,
                        max_value_bytes=settings.max_tag_value_bytes,
                    ),
                    max_field_bytes=settings.max_field_bytes,
                    max_hosts_per_service=settings.max_hosts_per_service,
                    max_services=settings.max_services,
                ),
            )
            proxies = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]
            routers.append(registration_router(registration, self.write_access, proxies))
            self._jobs["registration"] = registration.run()
            if settings.write_tokens_file:
                self._jobs["reload"] = self._reload_on_sighup()
        if Source.KUBERNETES.value in settings.source:
            from sds.sources.kubernetes import (  # noqa: PLC0415 - optional
                KubernetesSource,
                WatchSettings,
            )

            kubernetes = KubernetesSource(
                self.registry,
                namespaces=settings.namespace,
                port_name=settings.port_name,
                ip_family=settings.ip_family,
                kube_api_url=settings.kube_api_url,
                kubeconfig=settings.kubeconfig,
                watch=WatchSettings(read_timeout=settings.kube_read_timeout),
            )
            self._jobs["kubernetes"] = kubernetes.run()
            from sds.sources.gateway_api import GatewayApiSource  # noqa: PLC0415 - optional

            gateway_api = GatewayApiSource(
                self.registry,
                namespaces=settings.namespace,
                kube_api_url=settings.kube_api_url,
                kubeconfig=settings.kubeconfig,
                watch=WatchSettings(read_timeout=settings.kube_read_timeout),
            )
            self._jobs["gateway-api"] = gateway_api.run()
            from sds.leader_election import (  # noqa: PLC0415 - optional
                LeaderElectionSettings,
                LeaderElector,
            )
            from sds.status_writer import StatusWriter  # noqa: PLC0415 - optional

            # Every replica serves the same xDS; only the Lease holder writes status.
            elector = LeaderElector(
                kube_api_url=settings.kube_api_url,
                kubeconfig=settings.kubeconfig,
                holder=settings.lease_holder,
                settings=LeaderElectionSettings(
                    name=settings.lease_name,
                    namespace=settings.lease_namespace,
                    lease_duration=settings.lease_duration,
                    renew_deadline=settings.lease_renew_deadline,
                    retry_period=settings.lease_retry_period,
                ),
            )
            self._jobs["leader-election"] = elector.run()
            self.status_writer = StatusWriter(
                self.registry,
                self.xds.translator,
                gateway_api,
                kube_api_url=settings.kube_api_url,
                kubeconfig=settings.kubeconfig,
                may_write=lambda: elector.leading,
                gateway_addresses=settings.gateway_address,
            )
            self._jobs["status-writer"] = self.status_writer.run()
        self.tls = (
            ServerTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.tls_cert_file
            else None
        )
        tls_options: dict[str, Any] = {}
        if self.tls is not None:
            self._jobs["tls"] = self.tls.watch(settings.tls_check_interval)
            context = self.tls.http_context
            tls_options["ssl_context_factory"] = lambda _config, _default: context
        self.app = create_app(self.registry, routers)
        # Outside the framework entirely: its own middleware stack would cost more than
        # answering from the v1 cache does.
        self.asgi = V1FastPath(self.app, v1)
        self._http = _HttpServer(
            uvicorn.Config(
                self.asgi,
                host=settings.http_host,
                port=settings.http_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                server_header=False,
                # Client addresses are the peers': X-Forwarded-For counts only where sds
                # itself decides to trust it.
                proxy_headers=False,
                **tls_options,
            )
        )

    def reload(self) -> None:
        """Re-read what may change while running (the write tokens file); for SIGHUP."""
        self._reload.set()

    async def _reload_on_sighup(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            try:
                count = await asyncio.to_thread(self.write_access.reload)
            except (TokenFileError, TlsError) as exc:
                log.error(
                    "write tokens not reloaded, the previous ones stay", extra={"error": str(exc)}
                )
            else:
                log.info("write tokens reloaded", extra={"tokens": count})

    def _log_write_policy(self) -> None:
        if Source.REGISTRATION.value not in self.settings.source:
            return
        access = self.write_access
        if access.allow_anonymous:
            log.warning(
                "registration writes need no token (--allow-anonymous-writes): anyone who"
                " reaches the HTTP port can redirect traffic",
                extra={"tokens": access.token_count},
            )
        elif not access.token_count:
            log.warning(
                "registration writes are refused: no write token is configured"
                " (SDS_WRITE_TOKEN or --write-tokens-file)"
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set or a component fails; then shut everything down."""
        grpc_server = await start_grpc_server(
            self._make_stream,
            self.xds,
            self.settings.grpc_host,
            self.settings.grpc_port,
            max_streams_per_peer=self.settings.max_streams_per_peer,
            max_connection_age=self.settings.max_connection_age,
            max_connection_age_grace=self.settings.max_connection_age_grace,
            credentials=self.tls.grpc_credentials() if self.tls is not None else None,
            max_names=self.settings.max_subscriptions,
        )
        tasks = {asyncio.create_task(job, name=name) for name, job in self._jobs.items()}
        http = asyncio.create_task(self._http.serve(), name="http")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        log.info(
            "sds started",
            extra={
                "sources": self.settings.source,
                "http": f"{self.settings.http_host}:{self.settings.http_port}",
                "grpc": f"{self.settings.grpc_host}:{self.settings.grpc_port}",
                "tls": self.tls is not None,
                "grpc_client_certificates": self.tls is not None and self.tls.mutual,
                "proxyless_tls": self.settings.proxyless_tls,
                "write_tokens": self.write_access.token_count,
                "anonymous_writes": self.write_access.allow_anonymous,
            },
        )
        self._log_write_policy()
        try:
            done, _ = await asyncio.wait(
                {*tasks, http, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done - {stopper}:
                if not task.cancelled() and task.exception() is not None:
                    log.error(
                        "component failed",
                        extra={"component": task.get_name()},
                        exc_info=task.exception(),
                    )
                    raise SystemExit(1)
        finally:
            stopper.cancel()
            if self.ui is not None:
                self.ui.close()  # open event streams would hold uvicorn's shutdown
            self._http.should_exit = True
            await grpc_server.stop(grace=1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(http), 10)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, http, stopper, return_exceptions=True)
            log.info("sds stopped")


async def serve(settings: Settings) -> None:
    """Run sds until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = SdsServer(settings)
    except (TokenFileError, TlsError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        raise SystemExit(2) from None
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    # Everything built so far lives as long as the process: keep the cyclic garbage
    # collector from scanning it again and again under load.
    gc.freeze()
    # Thousands of streams keep many long-lived objects; with the default thresholds the
    # collector rescans them during every fan-out (a third of its CPU in bench/xds_fleet.py).
    gc.set_threshold(*GC_THRESHOLDS)
    await server.run(stop)
