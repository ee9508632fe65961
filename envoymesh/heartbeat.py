"""The one declared registration interval, shared by both sides of self-registration.

usersvc heartbeats every ``HEARTBEAT_INTERVAL`` seconds by default (``--register-interval``),
and sds derives its timing from the same number (``--heartbeat-interval``): a host expires
after ``TTL_HEARTBEATS`` missed beats, and after a restart sds waits ``WARMUP_HEARTBEATS``
intervals for hosts to check in again before it answers a service as empty. Deployments set
the interval once and pass it to both.
"""

from __future__ import annotations

HEARTBEAT_INTERVAL = 10.0
"""Seconds between a registered host's heartbeats, unless configured."""

WARMUP_HEARTBEATS = 2.5
"""Registration warm-up, in heartbeat intervals: every live host has beaten at least twice."""

TTL_HEARTBEATS = 3.0
"""Host TTL, in heartbeat intervals: three missed beats, so one lost request is no outage."""
