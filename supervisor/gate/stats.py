"""The gate's counters (exported by /metrics)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclass(frozen=True)
class GateStats:
    """Counters since start, for /metrics."""

    requests_total: int = 0  # every request the gate read
    express_total: int = 0  # of those, served by the express lane (express.py)
    gated_total: int = 0  # load requests for a model not resident
    waits_total: int = 0  # make_room calls
    wait_seconds_total: float = 0.0  # time spent in make_room
    forwarded_anyway_total: int = 0  # make_room did not get the room in time
    upstream_errors_total: int = 0  # answered 502


@dataclass
class Counters:
    """The live, mutable counters (loop thread only); `GateStats` is their snapshot."""

    requests_total: int = 0
    express_total: int = 0
    gated_total: int = 0
    waits_total: int = 0
    wait_seconds_total: float = 0.0
    forwarded_anyway_total: int = 0
    upstream_errors_total: int = 0


class InFlight(Generic[K]):
    """Requests in flight through a gate, counted per key (a model): those models serve a
    request. `with in_flight.holding(key):` around a request; `keys()` from any thread."""

    def __init__(self) -> None:
        self._counts: dict[K, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, key: K) -> Iterator[None]:
        self.add(key)
        try:
            yield
        finally:
            self.discard(key)

    def add(self, key: K) -> None:
        """One more request for `key`; `discard(key)` when it is done."""
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def discard(self, key: K) -> None:
        with self._lock:
            left = self._counts[key] - 1
            if left:
                self._counts[key] = left
            else:
                del self._counts[key]

    def keys(self) -> frozenset[K]:
        with self._lock:
            return frozenset(self._counts)
