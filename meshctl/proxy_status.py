"""``meshctl proxy-status``: every proxy connected to sds and whether it is in sync."""

from __future__ import annotations

import time
from typing import Any

import httpx

from meshctl.table import render_table


async def fetch_proxies(sds_url: str) -> list[dict[str, Any]]:
    """The proxies sds knows, from its ``/debug/proxies``."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{sds_url.rstrip('/')}/debug/proxies")
            response.raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(f"meshctl: cannot read {sds_url}/debug/proxies: {exc}") from None
    proxies: list[dict[str, Any]] = response.json()["proxies"]
    return proxies


def _ago(timestamp: float) -> str:
    seconds = max(0, int(time.time() - timestamp))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_proxies(proxies: list[dict[str, Any]]) -> str:
    """A table like ``istioctl proxy-status``: SYNCED, STALE or NACKED per proxy."""
    if not proxies:
        return "no proxies connected"
    rows = [
        (
            p["node_id"] or "-",
            p["cluster"] or "-",
            p["transport"],
            ",".join(p["subscribed"]) or "-",
            p["state"],
            p["last_version_sent"][:12] or "-",
            p["last_version_acked"][:12] or "-",
            (p["last_nack"][:40] or "-"),
            _ago(p["connected_since"]),
        )
        for p in proxies
    ]
    headers = (
        "NAME",
        "CLUSTER",
        "TRANSPORT",
        "RESOURCES",
        "STATE",
        "SENT",
        "ACKED",
        "LAST NACK",
        "AGE",
    )
    return render_table(headers, rows)
