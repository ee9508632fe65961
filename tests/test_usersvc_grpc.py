"""The usersvc gRPC API, over a real grpcio channel to usersvc on a real PostgreSQL.

The same process, store and rules serve HTTP: what one API writes, the other reads.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from envoymesh.ports import free_port
from meshctl.mesh import Mesh
from meshctl.postgres import LocalPostgres
from tests.conftest import ADMIN_TOKEN, RunningSds
from usersvc.proto import users_pb2, users_pb2_grpc

UUID = re.compile(r"^[0-9A-F]{32}$")
SERVICE = "envoymesh.users.v1.Users"
Metadata = tuple[tuple[str, str], ...]


def basic(username: str, password: str) -> Metadata:
    """Call metadata with Basic credentials, as the HTTP header carries them."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return (("authorization", f"Basic {token}"),)


ADMIN: Metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
ALICE = users_pb2.PutUserRequest(username="alice", fullname="Alice Liddell", password="wonderland")
ALICE_AUTH = basic("alice", "wonderland")
NEW = {"fullname": "Mallory", "password": "taken-over"}


@dataclass
class GrpcUsersvc:
    """A usersvc serving both APIs: its HTTP client, gRPC channel and Users stub."""

    http: httpx.AsyncClient
    channel: grpc.aio.Channel
    users: users_pb2_grpc.UsersAsyncStub


@pytest.fixture
async def start_grpc_usersvc(
    start_usersvc: Callable[..., Any],
) -> AsyncIterator[Callable[..., Any]]:
    """Start usersvcs with their gRPC API on a free loopback port (admin ``ADMIN_TOKEN``)."""
    channels: list[grpc.aio.Channel] = []

    async def start(**overrides: Any) -> GrpcUsersvc:
        port = free_port()
        settings = {"admin_token": ADMIN_TOKEN, "grpc_host": "127.0.0.1", "grpc_port": port}
        http: httpx.AsyncClient = await start_usersvc(**{**settings, **overrides})
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return GrpcUsersvc(http, channel, users_pb2_grpc.UsersStub(channel))

    yield start
    for channel in channels:
        await channel.close()


@pytest.fixture
async def svc(start_grpc_usersvc: Callable[..., Any]) -> GrpcUsersvc:
    """A usersvc with its gRPC API, on a clean database."""
    started: GrpcUsersvc = await start_grpc_usersvc()
    return started


async def status_of(call: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def stored_row(db_conn: asyncpg.Connection, name: str) -> tuple[Any, ...] | None:
    row = await db_conn.fetchrow(
        "SELECT uuid, fullname, password_hash, updated_at FROM users WHERE username = $1", name
    )
    return None if row is None else tuple(row)


def raw_call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    """A call that sends bytes as they are: what a client of any language could put on the
    wire."""
    return channel.unary_unary(f"/{SERVICE}/{method}")


def string_field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (one-byte tag and length)."""
    return bytes([number << 3 | 2, len(value)]) + value


# ----- the contract ------------------------------------------------------------------------


async def test_put_of_a_new_name_creates_the_user(svc: GrpcUsersvc) -> None:
    reply = await svc.users.PutUser(ALICE)
    assert reply.created is True
    assert UUID.match(reply.user.uuid)
    assert (reply.user.username, reply.user.fullname) == ("alice", "Alice Liddell")
    assert reply.replica.hostname == socket.gethostname()
    assert reply.replica.resolvedname


async def test_get_reads_the_user_without_credentials(svc: GrpcUsersvc) -> None:
    created = await svc.users.PutUser(ALICE)
    reply = await svc.users.GetUser(users_pb2.GetUserRequest(username="alice"))
    assert reply.user == created.user
    assert reply.replica.hostname == socket.gethostname()


async def test_put_by_the_owner_updates_the_user(svc: GrpcUsersvc) -> None:
    created = await svc.users.PutUser(ALICE)
    change = users_pb2.PutUserRequest(username="alice", fullname="Alice L.", password="glass")
    reply = await svc.users.PutUser(change, metadata=ALICE_AUTH)
    assert reply.created is False
    assert (reply.user.uuid, reply.user.fullname) == (created.user.uuid, "Alice L.")
    login = await svc.http.post("/user/alice/login", json={"password": "glass"})
    assert login.status_code == 200


async def test_delete_by_the_owner_removes_the_user(svc: GrpcUsersvc) -> None:
    await svc.users.PutUser(ALICE)
    await svc.users.DeleteUser(users_pb2.DeleteUserRequest(username="alice"), metadata=ALICE_AUTH)
    gone = svc.users.GetUser(users_pb2.GetUserRequest(username="alice"))
    assert await status_of(gone) == grpc.StatusCode.NOT_FOUND


async def test_get_of_an_unknown_user_is_not_found(svc: GrpcUsersvc) -> None:
    call = svc.users.GetUser(users_pb2.GetUserRequest(username="nobody"))
    assert await status_of(call) == grpc.StatusCode.NOT_FOUND


async def test_delete_of_an_unknown_user_is_not_found(svc: GrpcUsersvc) -> None:
    call = svc.users.DeleteUser(
        users_pb2.DeleteUserRequest(username="nobody"), metadata=basic("nobody", "x")
    )
    assert await status_of(call) == grpc.StatusCode.NOT_FOUND


async def test_the_admin_token_may_change_and_delete_any_user(svc: GrpcUsersvc) -> None:
    await svc.users.PutUser(ALICE)
    change = users_pb2.PutUserRequest(username="alice", **NEW)
    assert (await svc.users.PutUser(change, metadata=ADMIN)).user.fullname == "Mallory"
    await svc.users.DeleteUser(users_pb2.DeleteUserRequest(username="alice"), metadata=ADMIN)
    assert (await svc.http.get("/user/alice")).status_code == 404


# ----- one store behind both APIs ----------------------------------------------------------


async def test_a_user_created_over_grpc_is_visible_over_http(svc: GrpcUsersvc) -> None:
    created = await svc.users.PutUser(ALICE)
    response = await svc.http.get("/user/alice")
    assert response.status_code == 200
    assert (response.json()["uuid"], response.json()["fullname"]) == (
        created.user.uuid,
        "Alice Liddell",
    )
    login = await svc.http.post("/user/alice/login", json={"password": "wonderland"})
    assert login.status_code == 200


async def test_a_user_created_over_http_is_visible_over_grpc(svc: GrpcUsersvc) -> None:
    put = await svc.http.put("/user/bob", json={"fullname": "Bob", "password": "builder"})
    reply = await svc.users.GetUser(users_pb2.GetUserRequest(username="bob"))
    assert (reply.user.uuid, reply.user.fullname) == (put.json()["uuid"], "Bob")


async def test_http_credentials_prove_ownership_over_grpc(svc: GrpcUsersvc) -> None:
    await svc.http.put("/user/bob", json={"fullname": "Bob", "password": "builder"})
    await svc.users.DeleteUser(
        users_pb2.DeleteUserRequest(username="bob"), metadata=basic("bob", "builder")
    )
    assert (await svc.http.get("/user/bob")).status_code == 404


# ----- ownership ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (basic("alice", "not her password"), grpc.StatusCode.UNAUTHENTICATED),
        (basic("alice", ""), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-the-admin-token"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic !!!not-base64!!!"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Digest username=alice"),), grpc.StatusCode.UNAUTHENTICATED),
        (basic("bob", "bobs password"), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=[
        "none",
        "wrong-password",
        "empty-password",
        "wrong-bearer",
        "malformed-basic",
        "other-scheme",
        "another-users-credentials",
    ],
)
async def test_changing_or_deleting_without_proof_is_refused_and_changes_nothing(
    svc: GrpcUsersvc,
    db_conn: asyncpg.Connection,
    metadata: Metadata,
    code: grpc.StatusCode,
) -> None:
    await svc.users.PutUser(ALICE)
    await svc.users.PutUser(
        users_pb2.PutUserRequest(username="bob", fullname="Bob", password="bobs password")
    )
    before = await stored_row(db_conn, "alice")
    change = users_pb2.PutUserRequest(username="alice", **NEW)
    assert await status_of(svc.users.PutUser(change, metadata=metadata)) == code
    delete = users_pb2.DeleteUserRequest(username="alice")
    assert await status_of(svc.users.DeleteUser(delete, metadata=metadata)) == code
    assert await stored_row(db_conn, "alice") == before


async def test_another_users_right_password_is_still_permission_denied(
    svc: GrpcUsersvc,
) -> None:
    # Bob's password happens to be alice's too: the name must match all the same.
    await svc.users.PutUser(ALICE)
    await svc.users.PutUser(
        users_pb2.PutUserRequest(username="bob", fullname="Bob", password="wonderland")
    )
    change = users_pb2.PutUserRequest(username="alice", **NEW)
    call = svc.users.PutUser(change, metadata=basic("bob", "wonderland"))
    assert await status_of(call) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_refusal_asks_for_credentials_in_its_message(svc: GrpcUsersvc) -> None:
    await svc.users.PutUser(ALICE)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await svc.users.DeleteUser(users_pb2.DeleteUserRequest(username="alice"))
    assert refused.value.details() == "credentials required to change an existing user"


async def test_repeated_failures_are_resource_exhausted_with_retry_after(
    start_grpc_usersvc: Callable[..., Any],
) -> None:
    svc: GrpcUsersvc = await start_grpc_usersvc(login_failures=2)
    await svc.users.PutUser(ALICE)
    delete = users_pb2.DeleteUserRequest(username="alice")
    wrong = basic("alice", "guess")
    for _ in range(2):
        assert await status_of(svc.users.DeleteUser(delete, metadata=wrong)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await svc.users.DeleteUser(delete, metadata=ALICE_AUTH)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(limited.value.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1


# ----- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        users_pb2.PutUserRequest(username="al\x00ice", fullname="A", password="p"),
        users_pb2.PutUserRequest(username="alice", fullname="Al\x00ice", password="p"),
        users_pb2.PutUserRequest(username="alice", fullname="Alice", password="p\x00"),
    ],
    ids=["username", "fullname", "password"],
)
async def test_nul_in_a_field_is_invalid_argument(
    svc: GrpcUsersvc, db_conn: asyncpg.Connection, request_: users_pb2.PutUserRequest
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await svc.users.PutUser(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NUL" in (refused.value.details() or "")
    assert await db_conn.fetchval("SELECT count(*) FROM users") == 0


async def test_nul_in_a_name_to_read_is_invalid_argument(svc: GrpcUsersvc) -> None:
    call = svc.users.GetUser(users_pb2.GetUserRequest(username="al\x00ice"))
    assert await status_of(call) == grpc.StatusCode.INVALID_ARGUMENT


# A lone surrogate (U+D800) as it would be encoded: not UTF-8, so no valid protobuf string.
LONE_SURROGATE = b"\xed\xa0\x80"


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("GetUser", string_field(1, b"al" + LONE_SURROGATE)),
        ("DeleteUser", string_field(1, b"al" + LONE_SURROGATE)),
        (
            "PutUser",
            string_field(1, b"alice") + string_field(2, LONE_SURROGATE) + string_field(3, b"p"),
        ),
        (
            "PutUser",
            string_field(1, b"alice") + string_field(2, b"A") + string_field(3, LONE_SURROGATE),
        ),
    ],
    ids=["get-username", "delete-username", "put-fullname", "put-password"],
)
async def test_a_lone_surrogate_on_the_wire_is_invalid_argument(
    svc: GrpcUsersvc, db_conn: asyncpg.Connection, method: str, raw: bytes
) -> None:
    assert await status_of(raw_call(svc.channel, method)(raw)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await db_conn.fetchval("SELECT count(*) FROM users") == 0


async def test_bytes_that_are_no_message_are_invalid_argument(svc: GrpcUsersvc) -> None:
    call = raw_call(svc.channel, "GetUser")(b"\xff\xff\xff")
    assert await status_of(call) == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_message_over_the_body_limit_is_resource_exhausted(
    start_grpc_usersvc: Callable[..., Any], db_conn: asyncpg.Connection
) -> None:
    svc: GrpcUsersvc = await start_grpc_usersvc(max_body_bytes=4096)
    big = users_pb2.PutUserRequest(username="alice", fullname="A" * 5000, password="p")
    assert await status_of(svc.users.PutUser(big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await db_conn.fetchval("SELECT count(*) FROM users") == 0


@pytest.mark.parametrize(
    "username",
    ["", ".alice", "-alice", "al ice", "alice\n", "a" * 65, "al/ice", "älice"],
)
async def test_a_name_the_http_api_refuses_is_invalid_argument(
    svc: GrpcUsersvc, username: str
) -> None:
    put = users_pb2.PutUserRequest(username=username, fullname="A", password="p")
    assert await status_of(svc.users.PutUser(put)) == grpc.StatusCode.INVALID_ARGUMENT
    get = users_pb2.GetUserRequest(username=username)
    assert await status_of(svc.users.GetUser(get)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("fullname", "password"),
    [("A" * 2049, "p"), ("A", ""), ("A", "p" * 1025)],
    ids=["long-fullname", "empty-password", "long-password"],
)
async def test_fields_out_of_bounds_are_invalid_argument(
    svc: GrpcUsersvc, fullname: str, password: str
) -> None:
    put = users_pb2.PutUserRequest(username="alice", fullname=fullname, password=password)
    assert await status_of(svc.users.PutUser(put)) == grpc.StatusCode.INVALID_ARGUMENT


async def test_fields_at_their_bounds_are_accepted(svc: GrpcUsersvc) -> None:
    put = users_pb2.PutUserRequest(username="a" * 64, fullname="Ä" * 2048, password="p" * 1024)
    assert (await svc.users.PutUser(put)).created is True


# ----- health and reflection ---------------------------------------------------------------


async def next_status(
    stream: Any, want: health_pb2.HealthCheckResponse.ServingStatus.ValueType
) -> None:
    """Read a health Watch stream until it reports ``want``."""
    async with asyncio.timeout(20):
        async for reply in stream:
            if reply.status == want:
                return
    raise AssertionError("the health stream ended")


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_is_serving_while_the_database_answers(svc: GrpcUsersvc, service: str) -> None:
    health = health_pb2_grpc.HealthStub(svc.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service))
    await next_status(watch, health_pb2.HealthCheckResponse.SERVING)
    watch.cancel()
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_is_not_serving_while_the_database_is_down(
    start_grpc_usersvc: Callable[..., Any], private_postgres: LocalPostgres
) -> None:
    svc: GrpcUsersvc = await start_grpc_usersvc(database_url=private_postgres.url)
    health = health_pb2_grpc.HealthStub(svc.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    await next_status(watch, health_pb2.HealthCheckResponse.SERVING)
    await private_postgres.stop()
    await next_status(watch, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert (await svc.http.get("/user/health")).status_code == 503
    await private_postgres.start()
    await next_status(watch, health_pb2.HealthCheckResponse.SERVING)
    watch.cancel()


async def test_health_of_an_unknown_service_is_not_found(svc: GrpcUsersvc) -> None:
    health = health_pb2_grpc.HealthStub(svc.channel)
    call = health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert await status_of(call) == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(svc: GrpcUsersvc) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(svc.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async with asyncio.timeout(10):
        replies = [reply async for reply in stub.ServerReflectionInfo(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_reflection_describes_the_users_service(svc: GrpcUsersvc) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(svc.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)

    async with asyncio.timeout(10):
        replies = [reply async for reply in stub.ServerReflectionInfo(ask())]
    assert replies[0].file_descriptor_response.file_descriptor_proto


# ----- the process: registration and shutdown ----------------------------------------------


async def wait_endpoints(sds: RunningSds, service: str, expected: list[tuple[str, int]]) -> None:
    """Wait until sds has exactly ``expected`` (address, port) for ``service``."""
    async with asyncio.timeout(15):
        while [e.key for e in sds.registry.snapshot(service).endpoints] != expected:
            await sds.registry.wait_for_change(sds.registry.revision, timeout=1.0)


async def test_a_replica_registers_its_grpc_port_as_usersvc_grpc_until_sigterm(
    postgres_url: str, usersvc_process: Callable[..., Any], start_sds: Callable[..., Any]
) -> None:
    sds: RunningSds = await start_sds()
    grpc_port = free_port()
    proc, _ = await usersvc_process(
        postgres_url,
        env={
            "USERSVC_SDS_URL": sds.url,
            "USERSVC_REGISTER_PORT": "10001",
            "USERSVC_GRPC_HOST": "127.0.0.1",
            "USERSVC_GRPC_PORT": str(grpc_port),
            "POD_IP": "127.0.0.1",
        },
    )
    await wait_endpoints(sds, "usersvc-grpc", [("127.0.0.1", grpc_port)])
    await wait_endpoints(sds, "usersvc", [("127.0.0.1", 10001)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = users_pb2_grpc.UsersStub(channel).GetUser(
            users_pb2.GetUserRequest(username="nobody")
        )
        assert await status_of(call) == grpc.StatusCode.NOT_FOUND
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait(timeout=20) == 0
    assert sds.registry.snapshot("usersvc-grpc").endpoints == ()
    assert sds.registry.snapshot("usersvc").endpoints == ()


async def test_grpc_port_zero_serves_no_grpc_and_registers_none(
    postgres_url: str, usersvc_process: Callable[..., Any], start_sds: Callable[..., Any]
) -> None:
    sds: RunningSds = await start_sds()
    _, base = await usersvc_process(
        postgres_url, env={"USERSVC_SDS_URL": sds.url, "POD_IP": "127.0.0.1"}
    )
    await wait_endpoints(sds, "usersvc", [("127.0.0.1", int(base.rsplit(":", 1)[1]))])
    assert sds.registry.snapshot("usersvc-grpc").endpoints == ()


async def test_each_mesh_replica_serves_and_registers_a_grpc_port_of_its_own(
    start_mesh: Callable[..., Any],
) -> None:
    mesh: Mesh = await start_mesh(2)
    async with httpx.AsyncClient(base_url=mesh.sds_url, timeout=10) as sds:
        async with asyncio.timeout(15):
            while (
                len(hosts := (await sds.get("/v1/registration/usersvc-grpc")).json()["hosts"]) < 2
            ):
                await asyncio.sleep(0.1)
    targets = {(h["ip_address"], h["port"]) for h in hosts}
    assert len(targets) == 2
    for address, port in targets:
        async with grpc.aio.insecure_channel(f"{address}:{port}") as channel:
            reply = await users_pb2_grpc.UsersStub(channel).PutUser(
                users_pb2.PutUserRequest(
                    username=f"mesh-{secrets.token_hex(8)}", fullname="M", password="pw"
                )
            )
            assert reply.replica.resolvedname == address
