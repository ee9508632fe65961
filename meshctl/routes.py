"""``meshctl routes``: every Gateway API route sds serves, and whether it works.

Like ``kubectl get httproutes`` with the status read back: for each route and parent, the
Accepted and ResolvedRefs conditions with their reasons, and where each rule sends traffic.
Files sds refused are listed first, with the field that is wrong.
"""

from __future__ import annotations

from typing import Any

import httpx

from meshctl.table import render_table


async def fetch_config(sds_url: str) -> dict[str, Any]:
    """sds's ``/debug/config``."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{sds_url.rstrip('/')}/debug/config")
            response.raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(f"meshctl: cannot read {sds_url}/debug/config: {exc}") from None
    config: dict[str, Any] = response.json()
    return config


def _condition(conditions: list[dict[str, Any]], kind: str) -> str:
    for condition in conditions:
        if condition["type"] == kind:
            mark = "" if condition["status"] == "True" else "!"
            return f"{mark}{condition['reason']}"
    return "-"


def _backends(route: dict[str, Any]) -> str:
    shown = []
    for rule in route["rules"]:
        targets = [
            f"{b['cluster'] or 'INVALID'}*{b['weight']}"
            if len(rule["backends"]) > 1
            else (b["cluster"] or "INVALID")
            for b in rule["backends"]
        ]
        shown.append("+".join(targets) or "-")
    return " | ".join(shown) or "-"


def format_routes(config: dict[str, Any]) -> str:
    """Refused files, then one row per route and parent: conditions and backends."""
    lines = [
        f"refused: {p['file']}: {p['path']}: {p['message']}" for p in config.get("problems", [])
    ]
    rows = []
    for route in config.get("routes", []):
        parents = route["parents"] or [{"parentRef": {}, "conditions": []}]
        for parent in parents:
            ref = parent["parentRef"]
            rows.append(
                (
                    route["kind"],
                    f"{route['namespace']}/{route['name']}",
                    f"{ref.get('namespace', '')}/{ref.get('name', '')}".strip("/") or "-",
                    _condition(parent["conditions"], "Accepted"),
                    _condition(parent["conditions"], "ResolvedRefs"),
                    _backends(route),
                )
            )
    if rows:
        headers = ("KIND", "ROUTE", "PARENT", "ACCEPTED", "RESOLVED", "BACKENDS")
        lines.append(render_table(headers, rows))
    elif not lines:
        lines.append("no routes")
    return "\n".join(lines)
