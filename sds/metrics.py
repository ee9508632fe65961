"""Prometheus metrics of the discovery server, in one place so names stay consistent.

Histograms of xDS push and convergence time use Istio's bucket boundaries
(``pilot_xds_push_time``, ``pilot_proxy_convergence_time``) so dashboards compare.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Gauge, Histogram

REGISTRY_SERVICES = Gauge("sds_registry_services", "Services with at least one endpoint")
REGISTRY_ENDPOINTS = Gauge("sds_registry_endpoints", "Endpoints across all services")
REGISTRY_REVISION = Gauge("sds_registry_revision", "Registry revision (real changes so far)")

WATCH_RESTARTS = Counter(
    "sds_kubernetes_watch_restarts_total", "Kubernetes watch streams re-established", ["reason"]
)
RELISTS = Counter("sds_kubernetes_relists_total", "Full lists of Kubernetes objects", ["reason"])
WATCH_EVENTS = Counter(
    "sds_kubernetes_watch_events_total", "Kubernetes watch events received", ["type"]
)
AMBIGUOUS_PORT_SERVICES = Gauge(
    "sds_kubernetes_ambiguous_port_services",
    "Services not served: several ports and no --port-name to choose one",
)
API_ERRORS = Counter("sds_kubernetes_api_errors_total", "Failed Kubernetes API calls", ["status"])
FORBIDDEN = Counter(
    "sds_kubernetes_forbidden_total",
    "Kubernetes list/watch calls refused by RBAC (403), by kind",
    ["kind"],
)

REGISTRATIONS = Counter(
    "sds_registrations_total", "v1 registrations accepted", ["kind"]
)  # kind: new, heartbeat, change
DEREGISTRATIONS = Counter("sds_deregistrations_total", "Hosts removed through the v1 API")
EXPIRIES = Counter("sds_expired_hosts_total", "Registered hosts expired after --host-ttl")
STALLS = Counter(
    "sds_stalls_total", "Times sds found it had not run for a while and extended host TTLs"
)

HTTP_REQUESTS = Counter(
    "sds_http_requests_total", "HTTP requests served", ["method", "route", "status"]
)

XDS_STREAMS = Gauge("sds_xds_connected_streams", "Connected xDS clients", ["transport"])
XDS_WAKEUPS = Counter(
    "sds_xds_stream_wakeups_total",
    "Streams woken by registry changes (only streams watching a changed name are woken)",
)
XDS_WITHHELD = Counter(
    "sds_xds_withheld_resources_total",
    "Empty resources held back from a push until every source has synced (warm-up)",
    ["transport"],
)
XDS_REFUSED = Counter(
    "sds_xds_refused_total",
    "xDS streams or requests refused: over a cap (RESOURCE_EXHAUSTED) or invalid",
    ["reason"],
)
XDS_AMBIGUOUS_NAMES = Gauge(
    "sds_xds_ambiguous_names", "Plain service names that more than one namespace has"
)
XDS_AMBIGUOUS_KEPT = Counter(
    "sds_xds_ambiguous_kept_total",
    "Times a subscriber kept the service it had resolved because its plain name became ambiguous",
)
STATUS_WRITES = Counter(
    "sds_gateway_status_writes_total",
    "Gateway API status writes, by result (written, conflict, an HTTP status, error)",
    ["result"],
)
XDS_PUSHES = Counter("sds_xds_pushes_total", "xDS responses sent", ["transport"])
XDS_NACKS = Counter("sds_xds_nacks_total", "xDS responses rejected by a proxy", ["transport"])
XDS_PUSH_TIME = Histogram(
    "sds_xds_push_time_seconds",
    "Time to build and send one xDS response",
    ["transport"],
    buckets=(0.01, 0.1, 1, 3, 5, 10, 20, 30),
)
XDS_CONVERGENCE = Histogram(
    "sds_proxy_convergence_time_seconds",
    "Delay between a registry change and the proxy's ACK of it",
    ["transport"],
    buckets=(0.1, 0.5, 1, 3, 5, 10, 20, 30),
)

EVENT_LOOP_LAG = Histogram(
    "sds_event_loop_lag_seconds",
    "How late the event loop ran a timer (everything sds does waits this long)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
EVENT_LOOP_LAG_MAX = Gauge(
    "sds_event_loop_lag_max_seconds", "Largest event-loop lag over the last ten seconds"
)

# How often the lag is sampled; a sleep this long is asked for and the overshoot measured.
LAG_INTERVAL = 0.25


async def measure_event_loop_lag() -> None:
    """Sample the event loop's lag until cancelled (a background job of sds)."""
    worst, window_start = 0.0, time.monotonic()
    while True:
        asked = time.monotonic()
        await asyncio.sleep(LAG_INTERVAL)
        now = time.monotonic()
        lag = max(0.0, now - asked - LAG_INTERVAL)
        EVENT_LOOP_LAG.observe(lag)
        worst = max(worst, lag)
        if now - window_start >= 10:
            EVENT_LOOP_LAG_MAX.set(worst)
            worst, window_start = 0.0, now


TLS_RELOADS = Counter(
    "sds_tls_reloads_total",
    "Certificate files re-read after a change on disk, by outcome (ok, failed)",
    ["outcome"],
)
