"""Write routes of the v1 API; they feed the registration source, never the registry.

Bodies may be lyft/discovery's form fields or the same fields as a JSON object. Every write
needs a bearer token that may write the service (see :mod:`sds.api.write_access`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from sds import validation
from sds.api.errors import ApiError
from sds.api.openapi import WRITE_SECURITY, errors
from sds.api.write_access import WriteAccess
from sds.errors import InvalidInput
from sds.sources.registration import Host, RegistrationSource


async def read_fields(request: Request) -> dict[str, Any]:
    """The request's fields, from a JSON object or an urlencoded/multipart form."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return validation.json_object(await request.body() or b"null")
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data", ""):
        form = await request.form(max_files=0, max_fields=64)
        return {k: v for k, v in form.items() if isinstance(v, str)}
    raise ApiError(415, f"unsupported content type {content_type!r}: send JSON or a form")


def _host_json(host: Host) -> dict[str, Any]:
    return {
        "service": host.service,
        "ip_address": host.ip,
        "port": host.port,
        "revision": host.revision,
        "service_repo_name": host.service_repo_name,
        "tags": host.tags,
    }


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def caller_address(request: Request, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The address a request came from, for ``auto_ip``.

    The peer's address; when the peer is one of ``trusted_proxies``, the last hop it added to
    ``X-Forwarded-For`` (earlier hops were written by whoever sent the request, so they prove
    nothing).
    """
    if request.client is None:
        raise InvalidInput("auto_ip: the caller's address is unknown; send ip instead")
    peer = ipaddress.ip_address(request.client.host)
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
    if not forwarded or not any(peer in network for network in trusted_proxies):
        return str(peer)
    last_hop = forwarded.rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last_hop))
    except ValueError:
        raise InvalidInput(
            f"auto_ip: the last hop of X-Forwarded-For, {last_hop[:80]!r}, is not an IP address"
        ) from None


def _auto_ip(fields: dict[str, Any]) -> bool:
    value = fields.get("auto_ip", False)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", ""):
        return value.lower() in ("true", "1")
    if isinstance(value, bool):
        return value
    raise InvalidInput("auto_ip must be true or false")


def registration_router(
    source: RegistrationSource,
    access: WriteAccess,
    trusted_proxies: Sequence[IPNetwork] = (),
) -> APIRouter:
    """POST/DELETE registration and load-balancing routes, each write checked by ``access``."""

    async def authorize(request: Request) -> None:
        access.check(request.headers.get("authorization"), request.path_params.get("service", ""))

    router = APIRouter(tags=["v1 registration"], dependencies=[Depends(authorize)])

    @router.post(
        "/v1/registration/{service}",
        summary="Register a host, or heartbeat it",
        responses=errors(401, 403, 409, 415),
        openapi_extra=WRITE_SECURITY,
    )
    async def register(service: str, request: Request) -> JSONResponse:
        fields = await read_fields(request)
        if _auto_ip(fields):
            if fields.get("ip"):
                raise InvalidInput("send either ip or auto_ip=true, not both")
            fields["ip"] = caller_address(request, trusted_proxies)
        host = source.register(service, fields)
        return JSONResponse(_host_json(host))

    @router.delete(
        "/v1/registration/{service}/{ip}",
        summary="Remove every port of an IP",
        responses=errors(401, 403, 404),
        openapi_extra=WRITE_SECURITY,
    )
    async def deregister_ip(service: str, ip: str) -> JSONResponse:
        return JSONResponse({"removed": source.deregister(service, ip)})

    @router.delete(
        "/v1/registration/{service}/{ip}/{port}",
        summary="Remove one instance",
        responses=errors(401, 403, 404),
        openapi_extra=WRITE_SECURITY,
    )
    async def deregister_instance(service: str, ip: str, port: str) -> JSONResponse:
        return JSONResponse({"removed": source.deregister(service, ip, validation.port(port))})

    async def _weight(service: str, ip: str | None, request: Request) -> Response:
        fields = await read_fields(request)
        if "load_balancing_weight" not in fields:
            raise InvalidInput("load_balancing_weight is required")
        source.set_weight(service, ip, fields["load_balancing_weight"])
        return Response(status_code=204)

    @router.post(
        "/v1/loadbalancing/{service}",
        status_code=204,
        summary="Weight of all hosts",
        responses=errors(401, 403, 404, 415),
        openapi_extra=WRITE_SECURITY,
    )
    async def weight_service(service: str, request: Request) -> Response:
        return await _weight(service, None, request)

    @router.post(
        "/v1/loadbalancing/{service}/{ip}",
        status_code=204,
        summary="Weight of one IP",
        responses=errors(401, 403, 404, 415),
        openapi_extra=WRITE_SECURITY,
    )
    async def weight_host(service: str, ip: str, request: Request) -> Response:
        return await _weight(service, ip, request)

    return router
