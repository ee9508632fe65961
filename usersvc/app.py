"""The usersvc HTTP API: the tutorial's wire contract, without its defects.

Every JSON body carries ``ok``, ``hostname`` and ``resolvedname``; every error is
``{"ok": false, "error": ...}`` with a real status code.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from envoymesh.limits import BodySizeLimit
from usersvc import auth, grpc_api, passwords, ratelimit, users
from usersvc.admission import BUSY_MESSAGE, HashingGate, RefusalPacing
from usersvc.config import Settings
from usersvc.db import Database, DatabaseUnavailable
from usersvc.identity import Identity, discover
from usersvc.registration import Registration
from usersvc.store import User, UserStore
from usersvc.users import USERNAME_PATTERN, Credentials, Users

log = logging.getLogger("usersvc")

Username = Annotated[
    str, Path(pattern=USERNAME_PATTERN, description="1-64 of A-Z a-z 0-9 . _ -, not first . _ -")
]


class TextBody(BaseModel):
    """A JSON body whose every string, keys too, is text PostgreSQL can store (no NUL, valid
    Unicode); anything else is a 422 before any field is looked at."""

    @model_validator(mode="before")
    @classmethod
    def _only_clean_text(cls, data: Any) -> Any:
        pending: list[tuple[str, Any]] = [("", data)]
        while pending:  # not recursive: nesting depth is the client's choice
            where, value = pending.pop()
            if isinstance(value, dict):
                for key, item in value.items():
                    pending.append((f"{where}{key!s}", key))
                    pending.append((f"{where}{key!s}.", item))
            elif isinstance(value, list):
                pending.extend((f"{where}{i}.", item) for i, item in enumerate(value))
            elif isinstance(value, str) and (problem := users.bad_text(value)):
                field = where.rstrip(".").encode("ascii", "backslashreplace").decode()[:64]
                raise PydanticCustomError("bad_text", f"{field or 'body'}: {problem}")
        return data


class UserIn(TextBody):
    """Body of ``PUT /user/{username}``."""

    model_config = ConfigDict(extra="ignore")
    fullname: StrictStr = Field(max_length=users.MAX_FULLNAME)
    password: StrictStr = Field(min_length=1, max_length=users.MAX_PASSWORD)


class LoginIn(TextBody):
    """Body of ``POST /user/{username}/login``."""

    password: StrictStr = Field(max_length=1024)


class Reply(BaseModel):
    """Fields every answer has."""

    ok: bool
    hostname: str
    resolvedname: str


class PoolNumbers(BaseModel):
    """The request pool's connections."""

    size: int
    idle: int
    in_use: int
    max: int


class HealthReply(Reply):
    msg: str
    busy: bool = Field(description="every pooled connection is in use (load, not an outage)")
    pool: PoolNumbers


class LiveReply(Reply):
    msg: str


class UserReply(Reply):
    uuid: str = Field(description="32 upper-case hex characters")
    fullname: str


class ErrorReply(Reply):
    error: str


Responses = dict[int | str, dict[str, Any]]


def _error_answer(description: str, **headers: str) -> dict[str, Any]:
    """An error response for the OpenAPI document, with the headers it always carries."""
    answer: dict[str, Any] = {"model": ErrorReply, "description": description}
    if headers:
        answer["headers"] = {
            name.replace("_", "-"): {
                "description": text,
                "required": True,
                "schema": {"type": "string"},
            }
            for name, text in headers.items()
        }
    return answer


ERRORS: Responses = {
    400: _error_answer("Malformed JSON, or a body that is not UTF-8"),
    404: _error_answer("No such user, or no such path"),
    405: _error_answer("Method not allowed"),
    408: _error_answer("The request body did not arrive in time (30 s by default)"),
    413: _error_answer("Body larger than the limit (64 KiB by default)"),
    422: _error_answer("Wrong, missing or unstorable fields (NUL, lone surrogates)"),
}
UNAVAILABLE: Responses = {
    503: _error_answer(
        "Too many password checks at once, or the database is unavailable",
        Retry_After="Seconds to wait before trying again",
    )
}
UNAUTHORIZED: Responses = {
    401: _error_answer(
        "No credentials, or wrong ones", WWW_Authenticate='Always `Basic realm="usersvc"`'
    )
}
TOO_MANY: Responses = {
    429: _error_answer(
        "Too many failed attempts for this user from this client lately",
        Retry_After="Seconds until the next attempt is allowed",
    )
}
CONFLICT: Responses = {409: _error_answer("The user kept changing meanwhile; try again")}
# Requests that may wait for a hashing slot per slot, whatever the wait budget allows: waiting
# costs no argon2 memory, but each waiting request holds its body (64 KiB at most).
HASH_QUEUE_PER_SLOT = 64
# Seconds a client should wait after a 503 for an unavailable database.
DB_RETRY_AFTER = 2

basic_scheme = auth.Basic()
bearer_scheme = auth.Bearer()
BasicCredentials = Annotated[HTTPBasicCredentials | None, Security(basic_scheme)]
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def create_app(settings: Settings) -> FastAPI:
    """Build the ASGI app; the database pool lives for the app's lifespan."""
    db = Database(
        settings.database_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.db_timeout,
    )
    store = UserStore(db)
    # One core is left to the event loop, so refusals and reads stay quick under a flood.
    hash_slots = settings.hash_concurrency or max(1, passwords.available_cpus() - 1)
    failures = ratelimit.FailureLimiter(
        settings.login_failures, settings.login_window, settings.login_tracked
    )
    hashing = passwords.Hashing(
        hash_slots,
        HASH_QUEUE_PER_SLOT * hash_slots if settings.hash_queue is None else settings.hash_queue,
        settings.hash_wait,
    )
    rules = Users(store, hashing, failures, settings.admin_token)
    identity = Identity(hostname="", resolvedname="")

    def stamp() -> dict[str, Any]:
        return {"hostname": identity.hostname, "resolvedname": identity.resolvedname}

    def reply(status: int, **fields: Any) -> JSONResponse:
        return JSONResponse({**fields, **stamp()}, status_code=status)

    def error(status: int, message: str) -> JSONResponse:
        return reply(status, ok=False, error=message)

    def user_reply(status: int, user: User) -> JSONResponse:
        return reply(status, ok=True, uuid=user.uuid, fullname=user.fullname)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal identity
        identity = await discover()
        grpc_server = None
        if settings.grpc_port:
            grpc_server = grpc_api.GrpcServer(settings, rules, db, stamp)
            await grpc_server.start()
        db.start()
        registration = None
        if settings.sds_url:
            ports = {settings.register_service: settings.register_port or settings.port}
            if grpc_server is not None and settings.register_grpc_service:
                # Proxyless gRPC clients dial the replica itself: no sidecar in between.
                ports[settings.register_grpc_service] = settings.grpc_port
            registration = Registration(
                settings.sds_url,
                ports=ports,
                address=settings.register_address or identity.resolvedname,
                interval=settings.register_interval,
                token=settings.sds_token,
                healthy=db.reachable,
            )
            registration.start()
            app.state.drain = registration.deregister
        await db.wait_connected(timeout=settings.db_timeout)
        await hashing.calibrate()
        log.info(
            "usersvc started",
            extra={
                **stamp(),
                "database": db.connected,
                "hash_concurrency": hashing.concurrency,
                "hash_queue": hashing.queue,
                "hash_wait": hashing.wait_budget,
                "hash_refusal_delay": settings.hash_refusal_delay,
                "hash_seconds": round(hashing.hash_seconds, 4),
            },
        )
        try:
            yield
        finally:
            if registration is not None:
                await registration.close()
            if grpc_server is not None:
                await grpc_server.stop()
            await db.close()
            hashing.close()
            log.info("usersvc stopped")

    async def no_drain() -> None:
        return None

    app = FastAPI(
        title="usersvc",
        summary="The envoymesh user service",
        version="0.1.0",
        lifespan=lifespan,
        responses=ERRORS,
    )
    # Called on SIGTERM before the server stops accepting: leave the load balancer first.
    app.state.drain = no_drain
    # What tests look at to see which requests reached the hasher and the database.
    app.state.hashing = hashing
    app.state.db = db

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error(400, "request body is not valid JSON")
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "string_pattern_mismatch":
            message = "must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
        return error(422, f"{where}: {message}" if where else message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {
            400: "request body is not valid JSON (UTF-8)",
            404: "not found",
            405: "method not allowed",
        }
        response = error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(users.UserError)
    async def on_refused(_: Request, exc: users.UserError) -> JSONResponse:
        if isinstance(exc, users.Unauthenticated):  # another user's credentials too
            response = error(401, exc.message)
            response.headers.update(auth.CHALLENGE)
            return response
        statuses = {users.NotFound: 404, users.Conflict: 409, users.InvalidInput: 422}
        return error(statuses[type(exc)], exc.message)

    @app.exception_handler(passwords.HashingBusy)
    async def on_hashing_busy(_: Request, exc: passwords.HashingBusy) -> JSONResponse:
        response = error(503, BUSY_MESSAGE)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ratelimit.TooManyFailures)
    async def on_too_many_failures(_: Request, exc: ratelimit.TooManyFailures) -> JSONResponse:
        response = error(429, "too many failed attempts for this user from here; retry later")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(DatabaseUnavailable)
    async def on_db_down(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        log.warning("database unavailable", extra={"detail": str(exc)})
        response = error(503, "database unavailable")
        response.headers["Retry-After"] = str(DB_RETRY_AFTER)
        return response

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error(500, "internal error")

    @app.get(
        "/user/health",
        response_model=HealthReply,
        summary="Health, including the database",
        responses={503: _error_answer("The database does not answer")},
    )
    async def health() -> JSONResponse:
        try:
            await db.ping()
        except DatabaseUnavailable as exc:
            return error(503, f"user health check failed: {exc}")
        pool = db.pool_numbers()
        busy = pool["idle"] == 0 and pool["size"] >= pool["max"]
        msg = "user health check OK" + (" (busy: every pooled connection in use)" if busy else "")
        return reply(200, ok=True, msg=msg, busy=busy, pool=pool)

    @app.get(
        "/user/live",
        response_model=LiveReply,
        summary="Liveness: the process serves HTTP (needs no database)",
    )
    async def live() -> JSONResponse:
        return reply(200, ok=True, msg="alive")

    def failure_key(request: Request, username: str) -> tuple[str, str]:
        # The client as the trusted proxies name it (ProxyHeadersMiddleware), else the peer.
        return username, request.client.host if request.client else ""

    @app.put(
        "/user/{username}",
        response_model=UserReply,
        status_code=201,
        summary="Create a user (201, open to anyone) or update one (200, owner or admin)",
        responses={
            200: {"model": UserReply},
            **UNAUTHORIZED,
            **TOO_MANY,
            **CONFLICT,
            **UNAVAILABLE,
        },
        # Creating a user needs no credentials; the empty requirement says so.
        openapi_extra={"security": [{}]},
    )
    async def put_user(
        request: Request,
        username: Username,
        body: UserIn,
        basic: BasicCredentials,
        bearer: BearerCredentials,
    ) -> JSONResponse:
        _, client = failure_key(request, username)
        user, created = await rules.put(
            username, body.fullname, body.password, Credentials(basic, bearer), client
        )
        return user_reply(201 if created else 200, user)

    @app.get(
        "/user/{username}",
        response_model=UserReply,
        summary="Read a user (public)",
        responses=UNAVAILABLE,
    )
    async def get_user(username: Username) -> JSONResponse:
        return user_reply(200, await rules.get(username))

    @app.delete(
        "/user/{username}",
        response_model=Reply,
        summary="Delete a user (owner or admin)",
        responses={**UNAUTHORIZED, **TOO_MANY, **CONFLICT, **UNAVAILABLE},
    )
    async def delete_user(
        request: Request, username: Username, basic: BasicCredentials, bearer: BearerCredentials
    ) -> JSONResponse:
        _, client = failure_key(request, username)
        await rules.delete(username, Credentials(basic, bearer), client)
        return reply(200, ok=True)

    @app.post(
        "/user/{username}/login",
        response_model=Reply,
        summary="Check a password",
        responses={
            401: _error_answer("Wrong password, or no such user"),
            **TOO_MANY,
            **UNAVAILABLE,
        },
    )
    async def login(request: Request, username: Username, body: LoginIn) -> JSONResponse:
        key = failure_key(request, username)
        failures.check(key)
        stored = await store.password_hash(username)
        if not await hashing.verify(stored, body.password):
            failures.failed(key)
            return error(401, "invalid username or password")
        assert stored is not None
        failures.succeeded(key)
        if passwords.needs_rehash(stored):
            upgraded = await hashing.hash(body.password)
            # Only if the password is still the one just checked: never undo a concurrent PUT.
            await store.replace_password_hash(username, stored, upgraded)
        return reply(200, ok=True)

    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        extra_fields=stamp,
        read_timeout=settings.body_timeout,
    )
    if settings.trusted_proxies:
        # X-Forwarded-For, read from the right, names the client only past these proxies.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    # Outermost, so that a refusal costs no body read and no framework work.
    pacing = RefusalPacing(settings.hash_refusal_delay)
    app.state.pacing = pacing
    app.add_middleware(HashingGate, hashing=hashing, extra_fields=stamp, pacing=pacing)
    return app
