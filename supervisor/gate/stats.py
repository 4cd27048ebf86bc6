"""The gate's counters (exported by /metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateStats:
    """Counters since start, for /metrics."""

    requests_total: int = 0  # every request the gate read
    gated_total: int = 0  # load requests for a model not resident
    waits_total: int = 0  # make_room calls
    wait_seconds_total: float = 0.0  # time spent in make_room
    forwarded_anyway_total: int = 0  # make_room did not get the room in time
    upstream_errors_total: int = 0  # answered 502


@dataclass
class Counters:
    """The live, mutable counters (loop thread only); `GateStats` is their snapshot."""

    requests_total: int = 0
    gated_total: int = 0
    waits_total: int = 0
    wait_seconds_total: float = 0.0
    forwarded_anyway_total: int = 0
    upstream_errors_total: int = 0
