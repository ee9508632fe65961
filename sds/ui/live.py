"""The page's live feed: one hub turns change notifications into deltas for every client.

The hub runs only while a page is open: it waits for the registry's change notification, the
proxy tracker's (which records nothing while nobody watches) or a new push-path sample, lets
changes gather for :data:`COALESCE` seconds, and serialises one delta for every client. A
delta carries what changed (services by name, proxies by id) with their new views; when more
changed than :data:`MAX_DELTA_SERVICES` / :data:`MAX_DELTA_PROXIES`, it says "reload" for that
panel instead, so no event grows with the mesh. Routes always say "reload" (with new totals)
when the config, a Gateway's binding, a Service-attached route's status or the refused files
moved: a route's view depends on Services and other routes, so the page asks for its page
again. Proxy totals are kept as counters updated from the changed proxies, not recounted
over every proxy for each delta.

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
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from sds import metrics
from sds.registry import Registry
from sds.sources.config_dir import ConfigDirSource, ConfigProblem
from sds.translate.translator import Translator
from sds.ui import views
from sds.ui.routes import RoutesWatch, route_totals
from sds.xds.proxies import ProxyStatus, ProxyTracker

COALESCE = 0.25
HEARTBEAT = 15.0
MAX_DELTA_SERVICES = 20
MAX_DELTA_PROXIES = 200
QUEUE_FRAMES = 64
SAMPLE_INTERVAL = 1.0
HISTORY = 300  # samples kept: five minutes
# Seconds between full recounts of the proxy totals: REST pollers evicted past their cap
# leave without a touch, so the counters are checked against the tracker now and then.
RECOUNT_INTERVAL = 60.0
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


class ProxyCounts:
    """Proxies per state and per transport, kept current from the proxies that changed."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[str, str]] = {}
        self._states: Counter[str] = Counter()
        self._transports: Counter[str] = Counter()
        self.counted_at = 0.0

    def recount(self, statuses: Iterable[ProxyStatus]) -> None:
        """Start again from every proxy there is (one pass)."""
        self._known = {s.id: (s.state, s.transport) for s in statuses}
        self._states = Counter(state for state, _ in self._known.values())
        self._transports = Counter(transport for _, transport in self._known.values())
        self.counted_at = time.monotonic()

    def update(self, status_id: int, status: ProxyStatus | None) -> None:
        """One proxy changed (None: it is gone)."""
        old = self._known.pop(status_id, None)
        if old is not None:
            self._states[old[0]] -= 1
            self._transports[old[1]] -= 1
        if status is not None:
            self._known[status_id] = (status.state, status.transport)
            self._states[status.state] += 1
            self._transports[status.transport] += 1

    def totals(self) -> views.ProxyTotals:
        """The counts, as the pages show them."""
        return views.ProxyTotals(
            proxies=len(self._known),
            by_state={s: self._states.get(s, 0) for s in views.PROXY_STATES},
            by_transport={t: n for t, n in sorted(self._transports.items()) if n > 0},
        )


class LiveHub:
    """Every open stream, and the job that feeds them."""

    def __init__(
        self,
        registry: Registry,
        tracker: ProxyTracker,
        max_clients: int,
        *,
        translator: Translator,
        config_source: ConfigDirSource | None = None,
    ) -> None:
        self.registry = registry
        self.tracker = tracker
        self.translator = translator
        self.config_source = config_source
        self.proxy_counts = ProxyCounts()
        self._routes = RoutesWatch(translator)
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

    def problems(self) -> list[ConfigProblem]:
        """The refused files of the config directory (none without one)."""
        return self.config_source.problems if self.config_source is not None else []

    def subscribe(self) -> tuple[Subscriber, bytes] | None:
        """A new stream and its snapshot frame; None when at the cap or stopping."""
        if self._closing or len(self._subscribers) >= self.max_clients:
            return None
        if not self._subscribers:
            self.tracker.watch(True)
            self._revision = self.registry.revision
            # Nothing was recorded while nobody watched: count from scratch, once.
            self.proxy_counts.recount(self.tracker.all())
            self._routes.changed(self.problems())
        subscriber = Subscriber()
        self._subscribers.add(subscriber)
        self._wake.set()
        snapshot = {
            "seq": self.seq,
            "services": views.service_totals(self.registry).model_dump(),
            "proxies": self.proxy_counts.totals().model_dump(),
            "routes": route_totals(self.translator, self.problems()).model_dump(),
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
        counts = self.proxy_counts
        if len(touched) > MAX_DELTA_PROXIES:
            data["proxies"] = {"reload": True}
            counts.recount(self.tracker.all())
        elif touched:
            found = {i: self.tracker.get(i) for i in sorted(touched)}
            for status_id, status in found.items():
                counts.update(status_id, status)
            data["proxies"] = {
                "changed": [views.proxy_view(s).model_dump() for s in found.values() if s],
                "removed": [i for i, s in found.items() if s is None],
            }
        if time.monotonic() - counts.counted_at > RECOUNT_INTERVAL:
            before = counts.totals()
            counts.recount(self.tracker.all())
            if "proxies" not in data and counts.totals() != before:
                data["proxies"] = {"changed": [], "removed": []}
        if "proxies" in data:
            data["proxies"]["totals"] = counts.totals().model_dump()
        problems = self.problems()
        if self._routes.changed(problems):
            data["routes"] = {
                "reload": True,
                "totals": route_totals(self.translator, problems).model_dump(),
            }
        if self._pending_samples:
            data["push"] = [s.model_dump() for s in self._pending_samples]
            self._pending_samples = []
        if not data:
            return None
        self.seq += 1
        data["seq"] = self.seq
        return data
