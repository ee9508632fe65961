"""The page's live feed: one hub turns change notifications into deltas for every client.

The hub runs only while a page is open: it waits for the registry's change notification, the
proxy tracker's (which records nothing while nobody watches) or a new push-path sample, lets
changes gather for :data:`COALESCE` seconds, and serialises one delta for every client. A
delta carries what changed (services by name, proxies by id) with their new views; when more
changed than :data:`MAX_DELTA_SERVICES` / :data:`MAX_DELTA_PROXIES`, it says "reload" for that
panel instead, so no event grows with the mesh.

Stream format (``text/event-stream``): ``event: snapshot`` first (totals, the push history,
the current ``seq``), then ``event: delta`` frames numbered by ``seq``, and a ``: ping``
comment every :data:`HEARTBEAT` seconds so a dead connection is noticed. A client that falls
:data:`QUEUE_FRAMES` frames behind is dropped; its ``EventSource`` reconnects and resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from sds import metrics
from sds.registry import Registry
from sds.ui import views
from sds.xds.proxies import ProxyTracker

COALESCE = 0.25
HEARTBEAT = 15.0
MAX_DELTA_SERVICES = 20
MAX_DELTA_PROXIES = 200
QUEUE_FRAMES = 64
SAMPLE_INTERVAL = 1.0
HISTORY = 300  # samples kept: five minutes
PING = b": ping\n\n"


class PushSample(BaseModel):
    """The push path over one sample interval."""

    time: float = Field(description="Unix time at the end of the interval")
    pushes_per_second: float
    nacks_per_second: float
    acks: int = Field(description="pushes ACKed in the interval (convergence measured)")
    p50: float | None = Field(description="median convergence, seconds (None: no ACK)")
    p99: float | None = Field(description="99th percentile convergence, seconds")


class PushHistory(BaseModel):
    """The last minutes of the push path, oldest first."""

    interval: float = Field(description="seconds per sample")
    samples: list[PushSample]


def quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """``histogram_quantile``: linear within the bucket holding rank ``q``; None if empty."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bucket: its bound, as Prometheus says
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _total(counter: Any) -> float:
    return float(
        sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))
    )


def _buckets() -> tuple[list[float], list[float]]:
    """Convergence buckets summed over transports: (upper bounds, cumulative counts)."""
    by_bound: dict[float, float] = {}
    for family in metrics.XDS_CONVERGENCE.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                bound = float(s.labels["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + s.value
    bounds = sorted(by_bound)
    return bounds, [by_bound[b] for b in bounds]


@dataclass(slots=True)
class _Reading:
    pushes: float
    nacks: float
    bounds: list[float]
    cumulative: list[float]

    @classmethod
    def now(cls) -> _Reading:
        bounds, cumulative = _buckets()
        return cls(_total(metrics.XDS_PUSHES), _total(metrics.XDS_NACKS), bounds, cumulative)


class PushSampler:
    """Samples the push counters and convergence histogram into a five-minute ring."""

    def __init__(self) -> None:
        self.samples: deque[PushSample] = deque(maxlen=HISTORY)
        self._last = _Reading.now()
        self._last_at = time.monotonic()

    def sample(self) -> PushSample:
        """Record the interval since the previous sample (rates and bucket deltas)."""
        reading, at = _Reading.now(), time.monotonic()
        seconds = max(at - self._last_at, 1e-6)
        last = self._last
        delta = [a - b for a, b in zip(reading.cumulative, last.cumulative, strict=False)]
        if reading.bounds != last.bounds:
            delta = reading.cumulative  # the first observation created the buckets
        sample = PushSample(
            time=time.time(),
            pushes_per_second=round((reading.pushes - last.pushes) / seconds, 3),
            nacks_per_second=round((reading.nacks - last.nacks) / seconds, 3),
            acks=int(delta[-1]) if delta else 0,
            p50=quantile(0.5, reading.bounds, delta),
            p99=quantile(0.99, reading.bounds, delta),
        )
        self._last, self._last_at = reading, at
        self.samples.append(sample)
        return sample

    def history(self) -> PushHistory:
        """Every sample kept."""
        return PushHistory(interval=SAMPLE_INTERVAL, samples=list(self.samples))


def frame(event: str, seq: int, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event (JSON data on one line: JSON never holds a raw newline)."""
    body = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\nid: {seq}\ndata: {body}\n\n".encode()


class Subscriber:
    """One open stream: the frames waiting for it, and whether it should end."""

    def __init__(self) -> None:
        self.frames: deque[bytes] = deque()
        self.ready = asyncio.Event()
        self.ended = False

    def offer(self, data: bytes) -> None:
        """Queue a frame; a client this far behind is ended (it will reconnect and resync)."""
        if len(self.frames) >= QUEUE_FRAMES:
            self.end()
            return
        self.frames.append(data)
        self.ready.set()

    def end(self) -> None:
        """Make the stream finish (client gone, too slow, or sds stopping)."""
        self.ended = True
        self.ready.set()

    def take(self) -> bytes:
        """Everything queued, as one write."""
        self.ready.clear()
        data = b"".join(self.frames)
        self.frames.clear()
        return data


class LiveHub:
    """Every open stream, and the job that feeds them."""

    def __init__(self, registry: Registry, tracker: ProxyTracker, max_clients: int) -> None:
        self.registry = registry
        self.tracker = tracker
        self.sampler = PushSampler()
        self.max_clients = max_clients
        self.seq = 0
        self._subscribers: set[Subscriber] = set()
        self._wake = asyncio.Event()
        self._closing = False
        self._revision = registry.revision
        self._pending_samples: list[PushSample] = []

    @property
    def clients(self) -> int:
        """Open streams."""
        return len(self._subscribers)

    def subscribe(self) -> tuple[Subscriber, bytes] | None:
        """A new stream and its snapshot frame; None when at the cap or stopping."""
        if self._closing or len(self._subscribers) >= self.max_clients:
            return None
        if not self._subscribers:
            self.tracker.watch(True)
            self._revision = self.registry.revision
        subscriber = Subscriber()
        self._subscribers.add(subscriber)
        self._wake.set()
        snapshot = {
            "seq": self.seq,
            "services": views.service_totals(self.registry).model_dump(),
            "proxies": views.proxy_totals(self.tracker.all()).model_dump(),
            "push": self.sampler.history().model_dump(),
        }
        return subscriber, b"retry: 1000\n" + frame("snapshot", self.seq, snapshot)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Forget a stream that ended; with none left, the tracker stops recording."""
        self._subscribers.discard(subscriber)
        if not self._subscribers:
            self.tracker.watch(False)

    def close(self) -> None:
        """End every stream and refuse new ones (sds is stopping: uvicorn waits for them)."""
        self._closing = True
        for subscriber in self._subscribers:
            subscriber.end()

    async def run(self) -> None:
        """Sample the push path every second and feed open streams, until cancelled."""
        async with asyncio.TaskGroup() as jobs:
            jobs.create_task(self._sample())
            jobs.create_task(self._feed())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            sample = self.sampler.sample()
            if self._subscribers:
                self._pending_samples.append(sample)
                self._wake.set()

    async def _feed(self) -> None:
        while True:
            if not self._subscribers:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT):
                        await self._wake.wait()
                self._wake.clear()
                continue
            await self._next_change()
            await asyncio.sleep(COALESCE)
            self._wake.clear()
            delta = self.delta()
            if delta is not None:
                data = frame("delta", self.seq, delta)
                for subscriber in list(self._subscribers):
                    subscriber.offer(data)

    async def _next_change(self) -> None:
        """Return once the registry or a proxy changed or a sample came (or a while passed)."""
        waits = [
            asyncio.create_task(self.registry.wait_for_change(self._revision, HEARTBEAT)),
            asyncio.create_task(self.tracker.touched.wait()),
            asyncio.create_task(self._wake.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def delta(self) -> dict[str, Any] | None:
        """What changed since the last delta (None: nothing), numbered with the next seq."""
        data: dict[str, Any] = {}
        names = self.registry.changes_since(self._revision)
        self._revision = self.registry.revision
        if names is None or len(names) > MAX_DELTA_SERVICES:
            data["services"] = {"reload": True}
        elif names:
            present = sorted(n for n in names if self.registry.has(n))
            data["services"] = {
                "changed": [
                    views.service_view(self.registry.snapshot(n)).model_dump() for n in present
                ],
                "removed": sorted(names.difference(present)),
            }
        if "services" in data:
            data["services"]["totals"] = views.service_totals(self.registry).model_dump()
        touched = self.tracker.take_touched()
        if len(touched) > MAX_DELTA_PROXIES:
            data["proxies"] = {"reload": True}
        elif touched:
            found = {i: self.tracker.get(i) for i in sorted(touched)}
            data["proxies"] = {
                "changed": [views.proxy_view(s).model_dump() for s in found.values() if s],
                "removed": [i for i, s in found.items() if s is None],
            }
        if "proxies" in data:
            data["proxies"]["totals"] = views.proxy_totals(self.tracker.all()).model_dump()
        if self._pending_samples:
            data["push"] = [s.model_dump() for s in self._pending_samples]
            self._pending_samples = []
        if not data:
            return None
        self.seq += 1
        data["seq"] = self.seq
        return data
