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


TYPES = ("cds", "lds", "eds", "rds")


def format_proxies(proxies: list[dict[str, Any]]) -> str:
    """A table like ``istioctl proxy-status``: SYNCED, STALE or NACKED per proxy and type.

    A type the proxy never asked for shows ``-``; the last NACK's text comes last.
    """
    if not proxies:
        return "no proxies connected"
    rows = []
    for p in proxies:
        states = p.get("type_states") or {}
        rows.append(
            (
                p["node_id"] or "-",
                p["cluster"] or "-",
                p["transport"],
                ",".join(p["subscribed"]) or "-",
                p["state"],
                *(states[t]["state"] if t in states else "-" for t in TYPES),
                (p["last_nack"][:40] or "-"),
                _ago(p["connected_since"]),
            )
        )
    headers = (
        "NAME",
        "CLUSTER",
        "TRANSPORT",
        "RESOURCES",
        "STATE",
        *(t.upper() for t in TYPES),
        "LAST NACK",
        "AGE",
    )
    return render_table(headers, rows)
