"""One proxyless gRPC client of bench/proxyless_grpc.py: calls ``xds:///TARGET`` at a pace.

Run as ``python bench/proxyless_grpc_client.py TARGET --interval SECONDS`` with the bootstrap
of ``sds bootstrap --grpc`` in ``GRPC_XDS_BOOTSTRAP_CONFIG``; grpcio holds one xDS client per
process, so each client is its own process. Every call is answered with the name of the
backend (raw bytes, as the test backends of tests/conftest.py answer). The client keeps the
start time and answer of every call since its last ``pace`` command, and answers commands
on standard input with one JSON line each on standard output:

- ``ready DEADLINE``: once a call has succeeded: ``{"who": NAME}``.
- ``pace SECONDS``: call at this interval from now on: ``{"at": MONOTONIC}``.
- ``added NAME SINCE DEADLINE``: once a call started at or after ``SINCE`` is answered by
  ``NAME``: ``{"t": its start, "gap": seconds since the call before it}``.
- ``removed NAME SINCE SETTLE DEADLINE``: once ``SETTLE`` seconds of calls have gone by with
  none answered by ``NAME``: ``{"t": ...}``, the start of the first call (at or after
  ``SINCE``) after the last one ``NAME`` answered.
- ``stats``: ``{"calls": N, "failed": {CODE: N}}`` since the process started.

Times are ``time.monotonic()``, which every process on the machine shares. It exits when its
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

METHOD = "/envoymesh.bench.Echo/Who"
CALL_TIMEOUT = 5.0


class Calls:
    """Every call since the last pace change: (start, answer or "" for a failure)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.log: list[tuple[float, str]] = []
        self.total = 0
        self.failed: dict[str, int] = {}
        self.changed = threading.Condition()
        # Set by a new pace and at the end, so neither waits out a long interval.
        self.wake = threading.Event()

    def record(self, started: float, who: str, failure: str = "") -> None:
        """Add one call (``failure``: its status code, if it failed); wake a waiting command."""
        with self.changed:
            self.log.append((started, who))
            self.total += 1
            if failure:
                self.failed[failure] = self.failed.get(failure, 0) + 1
            self.changed.notify_all()

    def wait(self, done: Any, deadline: float) -> Any:
        """The first non-None ``done(log)`` (checked after each call), or None at the deadline."""
        until = time.monotonic() + deadline
        with self.changed:
            while (result := done(self.log)) is None:
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
            return result


def added(name: str, since: float) -> Any:
    """The check for ``added``: the first call since ``since`` that ``name`` answered."""

    def check(log: list[tuple[float, str]]) -> dict[str, float] | None:
        for i, (started, who) in enumerate(log):
            if started >= since and who == name:
                return {"t": started, "gap": started - log[i - 1][0] if i else 0.0}
        return None

    return check


def removed(name: str, since: float, settle: float) -> Any:
    """The check for ``removed``: the first call after the last one ``name`` answered."""

    def check(log: list[tuple[float, str]]) -> dict[str, float] | None:
        after = [(started, who) for started, who in log if started >= since]
        last = max((i for i, (_, who) in enumerate(after) if who == name), default=-1)
        rest = after[last + 1 :]
        if not rest or rest[-1][0] - rest[0][0] < settle:
            return None
        return {"t": rest[0][0]}

    return check


def serve_commands(calls: Calls, stop: threading.Event) -> None:
    """Answer the commands on stdin until it closes."""
    out = sys.stdout
    for line in sys.stdin:
        word, *args = line.split()
        answer: Any
        if word == "ready":
            answer = calls.wait(
                lambda log: next(({"who": w} for _, w in log if w), None), float(args[0])
            )
        elif word == "pace":
            with calls.changed:
                calls.interval = float(args[0])
                calls.log = []
            calls.wake.set()
            answer = {"at": time.monotonic()}
        elif word == "added":
            answer = calls.wait(added(args[0], float(args[1])), float(args[2]))
        elif word == "removed":
            check = removed(args[0], float(args[1]), float(args[2]))
            answer = calls.wait(check, float(args[3]))
        else:
            answer = {"calls": calls.total, "failed": calls.failed}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    stop.set()
    calls.wake.set()


def main() -> None:
    """Call the target at the pace asked until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    calls = Calls(args.interval)
    stop = threading.Event()
    threading.Thread(target=serve_commands, args=(calls, stop), daemon=True).start()
    with grpc.insecure_channel(f"xds:///{args.target}") as channel:
        call: Any = channel.unary_unary(METHOD)
        while not stop.is_set():
            started = time.monotonic()
            try:
                calls.record(started, call(b"", timeout=CALL_TIMEOUT).decode())
            except grpc.RpcError as exc:
                calls.record(started, "", exc.code().name)
            calls.wake.wait(max(0.0, started + calls.interval - time.monotonic()))
            calls.wake.clear()


if __name__ == "__main__":
    main()
