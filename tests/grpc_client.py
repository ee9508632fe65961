"""A proxyless gRPC client process: calls ``xds:///TARGET`` in a loop, one JSON line per call.

Run as ``python tests/grpc_client.py TARGET METHOD [METHOD...] [--header NAME=VALUE]`` with
the xDS bootstrap in ``GRPC_XDS_BOOTSTRAP_CONFIG``; grpcio holds one xDS client per
process, so each client is its own process. Every call answers with the name of the backend
(raw bytes), or fails; the line says which, and the call's status code. It calls until its
standard input closes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import grpc


def main() -> None:
    """Call the methods in turn until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--tls", action="store_true", help="xds_channel_credentials")
    args = parser.parse_args()
    metadata = tuple(tuple(h.split("=", 1)) for h in args.header)
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    target = f"xds:///{args.target}"
    channel = (
        grpc.secure_channel(target, grpc.xds_channel_credentials(grpc.local_channel_credentials()))
        if args.tls
        else grpc.insecure_channel(target)
    )
    with channel:
        calls: dict[str, Any] = {m: channel.unary_unary(m) for m in args.methods}
        while not stop.is_set():
            for method, call in calls.items():
                line: dict[str, object] = {"method": method, "t": time.monotonic()}
                try:
                    line["who"] = call(b"", timeout=2, metadata=metadata).decode()
                    line["code"] = "OK"
                except grpc.RpcError as exc:
                    line["code"] = exc.code().name
                    line["error"] = (exc.details() or "")[:300]
                    stop.wait(0.02)  # a failing target is retried, not spun on
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
