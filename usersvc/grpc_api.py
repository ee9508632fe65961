"""The usersvc gRPC API: ``envoymesh.users.v1.Users``, ``grpc.health.v1`` and reflection.

It runs in the same process and on the same event loop as the HTTP API, over the same store,
hashing pool and failed-attempt limiter, and applies the same rules (:mod:`usersvc.users`).
Credentials come from the call metadata ``authorization``, read exactly as the HTTP header is.

Requests arrive as bytes and are parsed here, so a request that is not a valid message (say a
string field that is not UTF-8, such as an encoded lone surrogate) is INVALID_ARGUMENT rather
than grpcio's INTERNAL. Messages over ``--max-body-bytes`` are RESOURCE_EXHAUSTED (grpcio's own
limit). Errors map to status codes once, in :func:`_status`.

With ``--grpc-tls-cert-file`` the port serves TLS only, and with ``--grpc-tls-client-ca-file``
it requires a client certificate that CA signed (:class:`ServerCertificates`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usersvc import passwords, ratelimit, users
from usersvc.config import Settings
from usersvc.db import Database, DatabaseUnavailable
from usersvc.proto import users_pb2
from usersvc.store import User

log = logging.getLogger("usersvc.grpc")

SERVICE = users_pb2.DESCRIPTOR.services_by_name["Users"].full_name
# Seconds calls in flight may take to finish when the server stops.
GRACE = 5.0
# Seconds between database checks behind the health service.
HEALTH_INTERVAL = 1.0

Req = TypeVar("Req", bound=Message)
Context = grpc.aio.ServicerContext[bytes, bytes]


def client_address(peer: str) -> str:
    """The address in a gRPC peer string: ``ipv4:10.0.0.1:5000`` or ``ipv6:[::1]:5000``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return rest


def _authorization(context: Context) -> str | None:
    """The first ``authorization`` metadata value, as HTTP reads the first such header."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


def _status(exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, message and trailing metadata that answer ``exc``."""
    match exc:
        case users.InvalidInput():
            return grpc.StatusCode.INVALID_ARGUMENT, exc.message, ()
        case users.NotFound():
            return grpc.StatusCode.NOT_FOUND, exc.message, ()
        case users.WrongUser():
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                "only the user itself or the admin may change it",
                (),
            )
        case users.Unauthenticated():
            return grpc.StatusCode.UNAUTHENTICATED, exc.message, ()
        case users.Conflict():
            return grpc.StatusCode.ABORTED, exc.message, ()
        case ratelimit.TooManyFailures():
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many failed attempts for this user from here; retry later",
                (("retry-after", str(exc.retry_after)),),
            )
        case passwords.HashingBusy():
            return (
                grpc.StatusCode.UNAVAILABLE,
                "busy: too many password checks at once; retry shortly",
                (),
            )
        case DatabaseUnavailable():
            log.warning("database unavailable", extra={"detail": str(exc)})
            return grpc.StatusCode.UNAVAILABLE, "database unavailable", ()
    log.error("unhandled error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error", ()


def _unary(
    request_type: type[Req], call: Callable[[Req, Context], Awaitable[Message]]
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A method handler that parses the request itself and maps every error to a status."""

    async def handle(raw: bytes, context: Context) -> bytes:
        try:
            request = request_type.FromString(raw)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"not a valid {request_type.DESCRIPTOR.name} (strings must be valid UTF-8)",
            )
        try:
            response = await call(request, context)
        except Exception as exc:  # every error becomes a status; _status logs the bugs
            code, message, trailers = _status(exc)
            await context.abort(code, message, trailers)
        return response.SerializeToString()

    # No (de)serializers: bytes in and out, parsed above.
    return grpc.unary_unary_rpc_method_handler(handle)


class UsersService:
    """The ``Users`` methods over :class:`usersvc.users.Users`."""

    def __init__(self, rules: users.Users, stamp: Callable[[], dict[str, Any]]) -> None:
        self._rules = rules
        self._stamp = stamp

    def _replica(self) -> users_pb2.Replica:
        return users_pb2.Replica(**self._stamp())

    @staticmethod
    def _user(user: User) -> users_pb2.User:
        return users_pb2.User(uuid=user.uuid, username=user.username, fullname=user.fullname)

    async def get_user(
        self, request: users_pb2.GetUserRequest, _: Context
    ) -> users_pb2.GetUserResponse:
        """Read a user (public)."""
        users.check_fields(request.username)
        user = await self._rules.get(request.username)
        return users_pb2.GetUserResponse(user=self._user(user), replica=self._replica())

    async def put_user(
        self, request: users_pb2.PutUserRequest, context: Context
    ) -> users_pb2.PutUserResponse:
        """Create a user (anyone) or update one (owner or admin)."""
        users.check_fields(request.username, request.fullname, request.password)
        creds = users.Credentials.from_authorization(_authorization(context))
        user, created = await self._rules.put(
            request.username,
            request.fullname,
            request.password,
            creds,
            client_address(context.peer()),
        )
        return users_pb2.PutUserResponse(
            user=self._user(user), created=created, replica=self._replica()
        )

    async def delete_user(
        self, request: users_pb2.DeleteUserRequest, context: Context
    ) -> users_pb2.DeleteUserResponse:
        """Delete a user (owner or admin)."""
        users.check_fields(request.username)
        creds = users.Credentials.from_authorization(_authorization(context))
        await self._rules.delete(request.username, creds, client_address(context.peer()))
        return users_pb2.DeleteUserResponse(replica=self._replica())

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, for :meth:`grpc.aio.Server.add_generic_rpc_handlers`."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetUser": _unary(users_pb2.GetUserRequest, self.get_user),
                "PutUser": _unary(users_pb2.PutUserRequest, self.put_user),
                "DeleteUser": _unary(users_pb2.DeleteUserRequest, self.delete_user),
            },
        )


class CertificateError(ValueError):
    """The gRPC port's certificate files cannot be used."""


class ServerCertificates:
    """The gRPC port's certificate (and client CA), re-read when the files change on disk.

    grpc asks :meth:`fetch` before each new connection; it answers None (no change) unless the
    files changed and the new set loads, so a half-written set keeps the previous one in use
    (cert-manager and Secret volumes replace the files in place).
    """

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._paths = [Path(cert_file), Path(key_file)]
        if client_ca_file:
            self._paths.append(Path(client_ca_file))
        self.mutual = bool(client_ca_file)
        self._lock = threading.Lock()
        self._stamp, self._configuration = self._load()
        self._failed: tuple[tuple[int, int, int], ...] | None = None

    def _stamp_now(self) -> tuple[tuple[int, int, int], ...]:
        stats = [os.stat(path) for path in self._paths]  # follows a Secret volume's symlinks
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _load(
        self,
    ) -> tuple[tuple[tuple[int, int, int], ...], grpc.ServerCertificateConfiguration]:
        names = ", ".join(map(str, self._paths))
        try:
            stamp = self._stamp_now()
            cert, key, *client_ca = (path.read_bytes() for path in self._paths)
            # grpc says only "bad certificate" later: check the pair and the CA here.
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._paths[0], self._paths[1])
            if client_ca:
                ssl.create_default_context(cadata=client_ca[0].decode("ascii"))
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise CertificateError(f"cannot use the gRPC TLS files {names}: {exc}") from None
        if self._stamp_now() != stamp:
            raise CertificateError(f"the gRPC TLS files {names} changed while being read")
        configuration = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=client_ca[0] if client_ca else None
        )
        return stamp, configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration,
            # The stub omits the None grpc documents as "unchanged".
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """New certificates for the next handshake when the files changed; None otherwise."""
        with self._lock:
            try:
                stamp = self._stamp_now()
            except OSError:
                return None  # mid-swap: the files in use stay
            if stamp in (self._stamp, self._failed):
                return None
            try:
                self._stamp, self._configuration = self._load()
            except CertificateError as exc:
                self._failed = stamp
                log.error(
                    "gRPC TLS files not reloaded, the previous ones stay",
                    extra={"error": str(exc)},
                )
                return None
            log.info("gRPC TLS files reloaded", extra={"files": [str(p) for p in self._paths]})
            return self._configuration


class GrpcServer:
    """The gRPC server, its health service following the database, and reflection."""

    def __init__(
        self,
        settings: Settings,
        rules: users.Users,
        db: Database,
        stamp: Callable[[], dict[str, Any]],
    ) -> None:
        self._db = db
        self._address = f"{settings.grpc_host or settings.host}:{settings.grpc_port}"
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self._server.add_generic_rpc_handlers((UsersService(rules, stamp).handler(),))
        self._health = grpc_health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        self._certificates = (
            ServerCertificates(
                settings.grpc_tls_cert_file,
                settings.grpc_tls_key_file,
                settings.grpc_tls_client_ca_file,
            )
            if settings.grpc_tls_cert_file
            else None
        )
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (raising when the port cannot be had) and start following the database."""
        if self._certificates is None:
            self._server.add_insecure_port(self._address)
        else:
            self._server.add_secure_port(self._address, self._certificates.credentials())
        for service in ("", SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self._watcher = asyncio.create_task(self._follow_database(), name="grpc-health")
        log.info(
            "gRPC API started",
            extra={
                "address": self._address,
                "tls": self._certificates is not None,
                "client_certificates": bool(self._certificates and self._certificates.mutual),
            },
        )

    async def _follow_database(self) -> None:
        # SERVING exactly when /user/health would answer 200: the same check of the database.
        while not self._stop.is_set():
            healthy = await self._db.reachable()
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE):
                await self._health.set(service, status)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), HEALTH_INTERVAL)

    async def stop(self) -> None:
        """Report NOT_SERVING, then stop, letting calls in flight finish for up to GRACE s."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._health.enter_graceful_shutdown()
        await self._server.stop(GRACE)
        log.info("gRPC API stopped")
