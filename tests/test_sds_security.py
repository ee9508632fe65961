"""sds refuses strangers: who may write, which addresses may be registered."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SDS_AUTH, RunningSds, SdsProcess

HOST = {"ip": "10.0.0.1", "port": 80}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def registered(client: httpx.AsyncClient, service: str) -> list[str]:
    hosts = (await client.get(f"/v1/registration/{service}")).json()["hosts"]
    return [f"{h['ip_address']}:{h['port']}" for h in hosts]


# ----- writes -------------------------------------------------------------------------------


async def test_without_a_token_writes_are_refused_with_the_fix_named(
    sds_process: Callable[..., Any],
) -> None:
    sds: SdsProcess = await sds_process()
    async with httpx.AsyncClient(base_url=sds.url) as client:
        writes = [
            client.post("/v1/registration/usersvc", json=HOST),
            client.post("/v1/registration/usersvc", json=HOST, headers=bearer("guess")),
            client.delete("/v1/registration/usersvc/10.0.0.1"),
            client.delete("/v1/registration/usersvc/10.0.0.1/80"),
            client.post("/v1/loadbalancing/usersvc", json={"load_balancing_weight": 5}),
            client.post("/v1/loadbalancing/usersvc/10.0.0.1", json={"load_balancing_weight": 5}),
        ]
        for response in await asyncio.gather(*writes):
            assert response.status_code == 403
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert "SDS_WRITE_TOKEN" in error
            assert "--allow-anonymous-writes" in error
        assert await registered(client, "usersvc") == []
    assert "registration writes are refused" in sds.log()


async def test_reads_stay_open_without_a_token(sds_process: Callable[..., Any]) -> None:
    sds: SdsProcess = await sds_process()
    async with httpx.AsyncClient(base_url=sds.url) as client:
        assert (await client.get("/v1/registration/usersvc")).status_code == 200
        assert (await client.post("/v3/discovery:endpoints", json={})).status_code == 200
        assert (await client.get("/debug/proxies")).status_code == 200


async def test_anonymous_writes_need_the_opt_out_and_log_a_warning(
    sds_process: Callable[..., Any],
) -> None:
    sds: SdsProcess = await sds_process(env={"SDS_ALLOW_ANONYMOUS_WRITES": "1"})
    async with httpx.AsyncClient(base_url=sds.url) as client:
        assert (await client.post("/v1/registration/usersvc", json=HOST)).status_code == 200
        assert await registered(client, "usersvc") == ["10.0.0.1:80"]
    assert '"level":"warning"' in sds.log()
    assert "--allow-anonymous-writes" in sds.log()


async def test_a_token_presented_with_the_opt_out_must_still_be_valid(
    start_sds: Callable[..., Any],
) -> None:
    sds: RunningSds = await start_sds(allow_anonymous_writes=True)
    async with httpx.AsyncClient(base_url=sds.url) as client:
        wrong = await client.post("/v1/registration/usersvc", json=HOST, headers=bearer("nope"))
        assert wrong.status_code == 401
        assert (await client.post("/v1/registration/usersvc", json=HOST)).status_code == 200
        ok = await client.post("/v1/registration/usersvc", json=HOST, headers=SDS_AUTH)
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Basic dXNlcjpwYXNz", "Bearer wrong", "bearer almost-the-token"],
)
async def test_a_missing_or_wrong_token_is_401(sds: RunningSds, authorization: str) -> None:
    headers = {"authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(base_url=sds.url, headers=headers) as client:
        response = await client.post("/v1/registration/usersvc", json=HOST)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]
        assert await registered(client, "usersvc") == []


TOKENS = """\
# team tokens
orders-token-0123456789 orders-*
search-token-0123456789 search,search-canary
admin-token-0123456789  *
"""


async def test_scoped_tokens_write_only_their_services(
    start_sds: Callable[..., Any], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    sds: RunningSds = await start_sds(write_token=None, write_tokens_file=str(tokens))
    async with httpx.AsyncClient(base_url=sds.url) as client:

        async def post(service: str, token: str) -> int:
            response = await client.post(
                f"/v1/registration/{service}", json=HOST, headers=bearer(token)
            )
            return response.status_code

        assert await post("orders-api", "orders-token-0123456789") == 200
        assert await post("search-canary", "search-token-0123456789") == 200
        assert await post("usersvc", "admin-token-0123456789") == 200
        refused = await client.post(
            "/v1/registration/search", json=HOST, headers=bearer("orders-token-0123456789")
        )
        assert refused.status_code == 403
        assert "may not write service 'search'" in refused.json()["error"]
        assert await post("search-api", "search-token-0123456789") == 403
        deleted = await client.delete(
            "/v1/registration/orders-api/10.0.0.1", headers=bearer("search-token-0123456789")
        )
        assert deleted.status_code == 403
        assert await registered(client, "orders-api") == ["10.0.0.1:80"]
        assert await registered(client, "search") == []


async def test_tokens_file_is_reread_on_sighup_and_tokens_never_logged(
    sds_process: Callable[..., Any], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("first-token-0123456789 usersvc\n")
    sds: SdsProcess = await sds_process("--write-tokens-file", str(tokens))
    async with httpx.AsyncClient(base_url=sds.url) as client:
        first = await client.post(
            "/v1/registration/usersvc", json=HOST, headers=bearer("first-token-0123456789")
        )
        assert first.status_code == 200
        tokens.write_text("second-token-0123456789 usersvc\n")
        sds.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while "write tokens reloaded" not in sds.log():
                await asyncio.sleep(0.05)
        old = await client.post(
            "/v1/registration/usersvc", json=HOST, headers=bearer("first-token-0123456789")
        )
        new = await client.post(
            "/v1/registration/usersvc", json=HOST, headers=bearer("second-token-0123456789")
        )
        assert (old.status_code, new.status_code) == (401, 200)
        elsewhere = await client.post(
            "/v1/registration/orders", json=HOST, headers=bearer("second-token-0123456789")
        )
        assert elsewhere.status_code == 403

        tokens.write_text("third-token-0123456789\n")  # no glob: refused, the old ones stay
        sds.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while "write tokens not reloaded" not in sds.log():
                await asyncio.sleep(0.05)
        still = await client.post(
            "/v1/registration/usersvc", json=HOST, headers=bearer("second-token-0123456789")
        )
        assert still.status_code == 200
    log = sds.log()
    assert f"{tokens}:1" in log
    for token in ("first-token", "second-token", "third-token"):
        assert token not in log


async def test_a_bad_tokens_file_stops_the_start_with_its_line(
    sds_process: Callable[..., Any], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nsecret-token-0123456789 orders/../*\n")
    with pytest.raises(RuntimeError):
        await sds_process("--write-tokens-file", str(tokens))
    log = (tmp_path / "run" / "sds-0.log").read_text()
    assert f"{tokens}:2" in log
    assert "secret-token" not in log


# ----- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
async def test_unreachable_addresses_are_refused(
    start_sds: Callable[..., Any], ip: str, kind: str
) -> None:
    sds: RunningSds = await start_sds(allow_loopback=False)
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post("/v1/registration/usersvc", json={"ip": ip, "port": 80})
        assert response.status_code == 400
        assert f"{kind} address" in response.json()["error"]
        assert await registered(client, "usersvc") == []


async def test_loopback_refusal_names_the_flag(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(allow_loopback=False)
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post("/v1/registration/usersvc", json={"ip": "::1", "port": 80})
        assert "--allow-loopback" in response.json()["error"]


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
async def test_allow_loopback_admits_loopback_only(sds: RunningSds, ip: str) -> None:
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        assert (
            await client.post("/v1/registration/usersvc", json={"ip": ip, "port": 80})
        ).is_success
        for other in ("0.0.0.0", "169.254.169.254", "224.0.0.1"):
            refused = await client.post("/v1/registration/usersvc", json={"ip": other, "port": 80})
            assert refused.status_code == 400
        assert len(await registered(client, "usersvc")) == 1


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.168.0.7", "8.8.8.8", "fd00::7", "2001:db8::1"])
async def test_routable_addresses_are_accepted(start_sds: Callable[..., Any], ip: str) -> None:
    sds: RunningSds = await start_sds(allow_loopback=False)
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post("/v1/registration/usersvc", json={"ip": ip, "port": 80})
        assert response.status_code == 200


async def test_zone_indexes_are_refused(sds: RunningSds) -> None:
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post(
            "/v1/registration/usersvc", json={"ip": "fd00::1%eth0", "port": 80}
        )
        assert response.status_code == 400
        assert "zone" in response.json()["error"]


# ----- bounds -------------------------------------------------------------------------------


async def host_of(client: httpx.AsyncClient, service: str) -> dict[str, Any]:
    [host] = (await client.get(f"/v1/registration/{service}")).json()["hosts"]
    result: dict[str, Any] = host
    return result


def many_tags(count: int, prefix: str = "t") -> dict[str, str]:
    return {f"{prefix}{i}": "v" for i in range(count)}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tags": many_tags(33)}, "33 tags, over the 32 allowed (--max-tags)"),
        ({"tags": {"k" * 65: "v"}}, "65 bytes, over the 64 allowed (--max-tag-key-bytes)"),
        ({"tags": {"é" * 33: "v"}}, "66 bytes, over the 64 allowed"),
        ({"tags": {"k": "v" * 257}}, "257 bytes, over the 256 allowed (--max-tag-value-bytes)"),
        ({"tags": {"k": "€" * 86}}, "258 bytes, over the 256 allowed"),
        ({"tags": {"k": {"nested": 1}}}, "must be a string"),
        (
            {"revision": "r" * 257},
            "revision is 257 bytes, over the 256 allowed (--max-field-bytes)",
        ),
        ({"service_repo_name": "x" * 300}, "service_repo_name is 300 bytes"),
    ],
)
async def test_oversized_fields_are_400_naming_the_flag(
    sds: RunningSds, fields: dict[str, Any], message: str
) -> None:
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post("/v1/registration/usersvc", json={**HOST, **fields})
        assert response.status_code == 400
        assert message in response.json()["error"]
        assert await registered(client, "usersvc") == []


async def test_fields_at_their_bounds_are_accepted(sds: RunningSds) -> None:
    fields = {
        "tags": {**many_tags(31), "k" * 64: "v" * 256},
        "revision": "r" * 256,
        "service_repo_name": "é" * 128,
    }
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post("/v1/registration/usersvc", json={**HOST, **fields})
        assert response.status_code == 200
        host = await host_of(client, "usersvc")
        assert host["revision"] == "r" * 256
        assert host["tags"]["k" * 64] == "v" * 256


async def test_a_refused_write_leaves_the_host_as_it_was(sds: RunningSds) -> None:
    first = {**HOST, "revision": "r1", "service_repo_name": "repo", "tags": many_tags(30)}
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        assert (await client.post("/v1/registration/usersvc", json=first)).status_code == 200
        before = await client.get("/v1/registration/usersvc")
        refused = [
            {**HOST, "revision": "r2", "tags": many_tags(3, prefix="new")},
            {**HOST, "revision": "r2", "tags": {"t0": "changed", "bad": "x" * 300}},
            {**HOST, "revision": "r2", "service_repo_name": "y" * 257},
            {**HOST, "revision": "r" * 257, "tags": {"t0": "changed"}},
        ]
        for body in refused:
            response = await client.post("/v1/registration/usersvc", json=body)
            assert response.status_code == 400, body
        after = await client.get(
            "/v1/registration/usersvc", headers={"if-none-match": before.headers["etag"]}
        )
        assert after.status_code == 304
        host = await host_of(client, "usersvc")
        assert (host["revision"], host["service_repo_name"]) == ("r1", "repo")
        assert host["tags"]["t0"] == "v"
        assert "new0" not in host["tags"]


async def test_hosts_per_service_are_bounded(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(max_hosts_per_service=3)
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:

        async def post(ip: str) -> httpx.Response:
            return await client.post("/v1/registration/usersvc", json={"ip": ip, "port": 80})

        for i in range(1, 4):
            assert (await post(f"10.0.0.{i}")).status_code == 200
        full = await post("10.0.0.4")
        assert full.status_code == 409
        assert "--max-hosts-per-service" in full.json()["error"]
        assert (await post("10.0.0.1")).status_code == 200  # a heartbeat still works
        assert (await client.post("/v1/registration/other", json=HOST)).status_code == 200
        await client.delete("/v1/registration/usersvc/10.0.0.2")
        assert (await post("10.0.0.4")).status_code == 200
        assert await registered(client, "usersvc") == ["10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80"]


async def test_registered_services_are_bounded(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(max_services=2)
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        for name in ("one", "two"):
            assert (await client.post(f"/v1/registration/{name}", json=HOST)).status_code == 200
        full = await client.post("/v1/registration/three", json=HOST)
        assert full.status_code == 409
        assert "--max-services" in full.json()["error"]
        more = await client.post("/v1/registration/two", json={"ip": "10.0.0.2", "port": 80})
        assert more.status_code == 200
        await client.delete("/v1/registration/one/10.0.0.1")
        assert (await client.post("/v1/registration/three", json=HOST)).status_code == 200
        assert await registered(client, "three") == ["10.0.0.1:80"]


async def test_bounds_are_set_by_flags(sds_process: Callable[..., Any]) -> None:
    sds: SdsProcess = await sds_process(
        "--max-tags", "1", "--max-field-bytes", "4", env={"SDS_WRITE_TOKEN": "flag-token"}
    )
    async with httpx.AsyncClient(base_url=sds.url, headers=bearer("flag-token")) as client:
        two = await client.post("/v1/registration/usersvc", json={**HOST, "tags": many_tags(2)})
        assert two.status_code == 400
        long = await client.post("/v1/registration/usersvc", json={**HOST, "revision": "12345"})
        assert long.status_code == 400
        ok = await client.post(
            "/v1/registration/usersvc", json={**HOST, "tags": many_tags(1), "revision": "1234"}
        )
        assert ok.status_code == 200


# ----- auto_ip ------------------------------------------------------------------------------


async def register_auto(sds: RunningSds, xff: str | None = None, **fields: Any) -> httpx.Response:
    headers = {**SDS_AUTH, **({"x-forwarded-for": xff} if xff is not None else {})}
    async with httpx.AsyncClient(base_url=sds.url, headers=headers) as client:
        return await client.post(
            "/v1/registration/usersvc", json={"auto_ip": True, "port": 80, **fields}
        )


async def test_auto_ip_registers_the_callers_address(sds: RunningSds) -> None:
    response = await register_auto(sds)
    assert response.status_code == 200
    assert response.json()["ip_address"] == "127.0.0.1"
    async with httpx.AsyncClient(base_url=sds.url) as client:
        assert await registered(client, "usersvc") == ["127.0.0.1:80"]


async def test_auto_ip_as_a_lyft_form_field(sds: RunningSds) -> None:
    async with httpx.AsyncClient(base_url=sds.url, headers=SDS_AUTH) as client:
        response = await client.post(
            "/v1/registration/usersvc", data={"auto_ip": "true", "port": "80"}
        )
        assert response.json()["ip_address"] == "127.0.0.1"


async def test_auto_ip_follows_the_address_policy(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(allow_loopback=False)
    response = await register_auto(sds)
    assert response.status_code == 400
    assert "loopback address" in response.json()["error"]


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(sds: RunningSds) -> None:
    response = await register_auto(sds, xff="10.1.2.3")
    assert response.json()["ip_address"] == "127.0.0.1"


async def test_a_trusted_proxy_gives_the_last_hop(start_sds: Callable[..., Any]) -> None:
    sds: RunningSds = await start_sds(trusted_proxies=["127.0.0.0/8"])
    response = await register_auto(sds, xff="203.0.113.9, 10.1.2.3")
    assert response.status_code == 200
    assert response.json()["ip_address"] == "10.1.2.3"


@pytest.mark.parametrize(
    ("xff", "message"),
    [
        ("10.1.2.3, 169.254.169.254", "link-local address"),
        ("10.1.2.3, nope", "is not an IP address"),
        ("10.1.2.3:8080", "is not an IP address"),
    ],
)
async def test_a_bad_last_hop_is_400(start_sds: Callable[..., Any], xff: str, message: str) -> None:
    sds: RunningSds = await start_sds(trusted_proxies=["127.0.0.1/32"])
    response = await register_auto(sds, xff=xff)
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ip": "10.0.0.1"}, "either ip or auto_ip"),
        ({"auto_ip": "maybe"}, "auto_ip must be true or false"),
        ({"auto_ip": False}, "ip and port are required"),
    ],
)
async def test_auto_ip_misuse_is_400(sds: RunningSds, fields: dict[str, Any], message: str) -> None:
    response = await register_auto(sds, **fields)
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_trusted_proxies_must_be_networks(sds_process: Callable[..., Any]) -> None:
    with pytest.raises(RuntimeError, match="not an IP address or CIDR block"):
        await sds_process("--trusted-proxies", "10.0.0.0/8,proxy.example")


async def test_an_sds_process_refuses_unreachable_addresses_until_told(
    sds_process: Callable[..., Any],
) -> None:
    strict: SdsProcess = await sds_process(env={"SDS_WRITE_TOKEN": "address-token"})
    loose: SdsProcess = await sds_process(
        "--allow-loopback", env={"SDS_WRITE_TOKEN": "address-token"}
    )
    headers = bearer("address-token")
    async with httpx.AsyncClient(headers=headers) as client:
        for sds, expected in ((strict, 400), (loose, 200)):
            loopback = await client.post(
                f"{sds.url}/v1/registration/usersvc", json={"ip": "127.0.0.1", "port": 80}
            )
            assert loopback.status_code == expected
            metadata = await client.post(
                f"{sds.url}/v1/registration/usersvc", json={"ip": "169.254.169.254", "port": 80}
            )
            assert metadata.status_code == 400


async def test_an_sds_process_takes_auto_ip_from_its_trusted_proxy(
    sds_process: Callable[..., Any],
) -> None:
    sds: SdsProcess = await sds_process(
        "--trusted-proxies", "127.0.0.0/8", env={"SDS_WRITE_TOKEN": "auto-token"}
    )
    headers = {**bearer("auto-token"), "x-forwarded-for": "198.51.100.7, 10.4.5.6"}
    async with httpx.AsyncClient(base_url=sds.url, headers=headers) as client:
        response = await client.post(
            "/v1/registration/usersvc", data={"auto_ip": "true", "port": "80"}
        )
        assert response.json()["ip_address"] == "10.4.5.6"
        assert await registered(client, "usersvc") == ["10.4.5.6:80"]
