"""TLS for both sds ports, with certificates re-read when they change on disk.

cert-manager and Kubernetes Secret volumes replace certificate files in place (an atomic
symlink swap), so sds watches the files and starts using new ones without a restart:

- gRPC: grpc's dynamic server credentials ask :meth:`ServerTls.grpc_fetcher` before each new
  connection whether the certificates changed.
- HTTP: the listening socket keeps one ``SSLContext``; its SNI callback, which OpenSSL runs on
  every handshake (with or without a server name), hands the connection the newest context.

A new set of files is loaded and checked (certificate and key match, the client CA parses) off
the event loop before it is used; a broken or half-written set is logged and the certificates
in use stay until the files are right. Connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from sds import metrics

log = logging.getLogger("sds.tls")


class TlsError(ValueError):
    """The certificate files cannot be used."""


@dataclass(frozen=True, slots=True)
class _Material:
    """One consistent set of files, read and checked."""

    stamp: tuple[tuple[int, int, int], ...]
    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


class ServerTls:
    """The server certificate (and, for mutual TLS on gRPC, the client CA) of sds."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        self._material = self._load()
        self._lock = threading.Lock()
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        self._failed_stamp: tuple[tuple[int, int, int], ...] | None = None
        # The context the HTTP listener is created with; new ones are handed out from it.
        self.http_context = self._material.context
        self.http_context.sni_callback = self._pick_http_context

    @property
    def mutual(self) -> bool:
        """Whether gRPC clients must present a certificate signed by the client CA."""
        return self.client_ca_file is not None

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in [self.cert_file, self.key_file, self.client_ca_file]:
            if path is None:
                continue
            info = path.stat()  # follows symlinks: a Secret volume's swap shows here
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)

    def _load(self) -> _Material:
        """Read and check the files (blocking)."""
        try:
            stamp = self._stamp()
            cert = self.cert_file.read_bytes()
            key = self.key_file.read_bytes()
            client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])
            context.load_cert_chain(self.cert_file, self.key_file)
            if client_ca is not None:
                ssl.create_default_context(cadata=client_ca.decode("ascii"))
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TlsError(f"cannot use the TLS files {self._names()}: {exc}") from None
        if self._stamp() != stamp:
            raise TlsError(f"the TLS files {self._names()} changed while being read")
        return _Material(stamp, cert, key, client_ca, context)

    def _names(self) -> str:
        return ", ".join(str(p) for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def _pick_http_context(
        self, connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        current = self._material.context
        if connection.context is not current:
            connection.context = current

    def _grpc_configuration(self, material: _Material) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.client_ca
        )

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the gRPC port that follow the files."""
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_configuration(self._material),
            # The stub omits the None grpc documents as "unchanged".
            self.grpc_fetcher,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def grpc_fetcher(self) -> grpc.ServerCertificateConfiguration | None:
        """New certificates for gRPC's next handshake, once per change; None when unchanged.

        gRPC calls this from its own threads.
        """
        with self._lock:
            pending, self._grpc_pending = self._grpc_pending, None
        return pending

    def reload_if_changed(self) -> bool:
        """Load the files again when they changed on disk (blocking); True when in use now."""
        stamp = None
        try:
            stamp = self._stamp()
            if stamp in (self._material.stamp, self._failed_stamp):
                return False  # nothing new since the last attempt
            material = self._load()
        except (OSError, TlsError) as exc:
            self._failed_stamp = stamp
            metrics.TLS_RELOADS.labels("failed").inc()
            log.error(
                "tls certificates not reloaded, the previous ones stay", extra={"error": str(exc)}
            )
            return False
        with self._lock:
            self._grpc_pending = self._grpc_configuration(material)
        self._material = material
        metrics.TLS_RELOADS.labels("ok").inc()
        log.info("tls certificates reloaded", extra={"files": self._names()})
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.reload_if_changed)
