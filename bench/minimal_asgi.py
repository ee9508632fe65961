"""The baseline for bench/sds_v1.py: a bare ASGI app answering fixed bytes, served exactly as
sds serves its API (uvicorn.Server on the same event loop, httptools, no access log).

Run: ``python bench/minimal_asgi.py PORT BODY_FILE``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoymesh.loop import event_loop_factory


def main() -> None:
    port = int(sys.argv[1])
    body = Path(sys.argv[2]).read_bytes()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"etag", b'W/"baseline"'),
    ]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
