"""``GET /debug/config``: what the Gateway API config became, and what was refused."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sds.sources.config_dir import ConfigDirSource
from sds.translate.translator import Translator


def config_router(translator: Translator, source: ConfigDirSource | None) -> APIRouter:
    """The config debug page (like ``kubectl get gateways,httproutes -o yaml`` for status)."""
    router = APIRouter(tags=["operations"])

    @router.get(
        "/debug/config",
        summary="Every Gateway and route with its status conditions, and refused documents",
        description="`problems` lists each file or document of the config directory that is "
        "not served (the file name, the path of the field, the reason); what such a file said "
        "before stays served. Gateways show their listeners' conditions and clusters; routes "
        "show, per parent, the Accepted and ResolvedRefs conditions with the Gateway API's "
        "reasons, and per rule the clusters it sends to with their weights (a null cluster is "
        "an invalid backend, answered with 500).",
    )
    async def debug_config() -> dict[str, Any]:
        shown = translator.debug()
        shown["config_dir"] = str(source.directory) if source is not None else None
        shown["problems"] = [p.as_json() for p in source.problems] if source is not None else []
        return shown

    return router
