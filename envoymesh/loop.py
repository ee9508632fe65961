"""The event loop our servers run on: uvloop where installed (Linux, macOS), else asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when available; None means asyncio's default loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional: uvicorn[standard] brings it where it builds
    except ImportError:
        return None
    return uvloop.new_event_loop
