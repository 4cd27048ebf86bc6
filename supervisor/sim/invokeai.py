"""A fake InvokeAI (v6.x) on the shared `SimGpu` (tenants.md §5).

What it serves (everything under `/api`, FastAPI's `{"detail": ...}` errors: 404 for an
unknown path, 405 for a known path with another method, 422 for a body it cannot read):

- `GET /api/v1/queue/{queue_id}/status`: `{"queue": {queue_id, item_id, batch_id,
  session_id, pending, in_progress, waiting, completed, failed, canceled, total,
  user_pending, user_in_progress}, "processor": {is_started, is_processing}}`.
- `POST /api/v1/queue/{queue_id}/enqueue_batch`: a batch whose graph names its models as
  identifier objects (`{"key", "name", "base", "type"}`) anywhere in its nodes' fields.
  The simulator reads two extra fields on an identifier, `sim_gib` (its size, default
  `--model-gib`) and, on the batch, `sim_seconds` (how long a run takes, default 2 s);
  `runs` repeats the graph. Answers `{queue_id, enqueued, requested, batch, priority,
  item_ids}`.
- `PUT /api/v1/queue/{queue_id}/processor/pause` and `/resume`: `{is_started,
  is_processing}`; a paused processor finishes its running item and starts no other.
- `POST /api/v2/models/empty_model_cache`: `make_room(1000 GiB)` on the cache: it waits
  for the cache lock (held while a model loads), drops every UNLOCKED entry (RAM copy and
  VRAM) and keeps the locked ones (the model of the running node), then answers 200 `null`.
- `GET /api/v2/models/stats`: `null` until a model was loaded, then the RAM cache's
  `CacheStats` (`hits`, `misses`, `high_watermark`, `in_cache`, `cleared`, `cache_size`,
  `loaded_model_sizes`); no VRAM figure, like the real one.
- `GET /api/v1/app/version`: `{"version": ..., "highlights": [...]}`.

The process holds a CUDA context from its first model load to its exit; a model in the
cache holds its weights in VRAM (and a RAM copy, `keep_ram_copy_of_weights`). A run locks
its model for the run's duration. `/sim/state` (also `/sim/stats`, the simulator's own)
shows the cache, the empty calls and whether an item runs, in one snapshot.
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from supervisor.sim.gpu import GIB, MIB, SimGpu
from supervisor.sim.httpbase import BadJson, Exchange, Route, SimServer

VERSION = "6.14.0"
CONTEXT_BYTES = 400 * MIB
OWNER = "invokeai"


@dataclass
class InvokeConfig:
    time_scale: float = 1.0
    model_gib: float = 6.5  # a model identifier without `sim_gib`
    load_seconds: float = 1.0  # reading a model into the cache (holds the cache lock)
    pid: int | None = None


@dataclass
class _Item:
    item_id: int
    batch_id: str
    session_id: str
    models: tuple[tuple[str, int], ...]  # (key, bytes)
    seconds: float
    status: str = "pending"  # pending, in_progress, completed, failed, canceled


@dataclass
class _Entry:
    key: str
    size: int
    locks: int = 0


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    high_watermark: int = 0
    cleared: int = 0


class FakeInvokeAI:
    def __init__(self, gpu: SimGpu, config: InvokeConfig | None = None) -> None:
        self.gpu = gpu
        self.config = config or InvokeConfig()
        self.pid = self.config.pid if self.config.pid is not None else os.getpid()
        self._lock = threading.Lock()  # queue and processor state
        self._wake = threading.Condition(self._lock)
        self._cache_lock = threading.RLock()  # the model cache's @synchronized lock
        self._cache: dict[str, _Entry] = {}
        self._stats: _Stats | None = None
        self._items: dict[int, _Item] = {}
        self._pending: deque[int] = deque()
        self._ids = itertools.count(1)
        self._current: _Item | None = None
        self._started = True  # the processor runs unless paused
        self._closed = False
        self._stop = threading.Event()
        self._context = False
        self.empty_calls = 0
        self._worker = threading.Thread(target=self._run, daemon=True, name="sim-invokeai")
        self._worker.start()

    # ------------------------------------------------------------------ serving

    def route(self, method: str, path: str) -> Route | None:
        parts = path.strip("/").split("/")
        if path in ("/sim/state", "/sim/stats"):
            return self._only(method, "GET", self.sim_state)
        if parts[:1] != ["api"]:
            return None
        rest = parts[1:]
        if rest == ["v2", "models", "empty_model_cache"]:
            return self._only(method, "POST", self.empty_model_cache)
        if rest == ["v2", "models", "stats"]:
            return self._only(method, "GET", self.stats)
        if rest == ["v1", "app", "version"]:
            return self._only(method, "GET", self.version)
        if len(rest) >= 4 and rest[:2] == ["v1", "queue"]:
            queue_id, tail = rest[2], rest[3:]
            if tail == ["status"]:
                return self._only(method, "GET", lambda ex: self.status(ex, queue_id))
            if tail == ["enqueue_batch"]:
                return self._only(method, "POST", lambda ex: self.enqueue(ex, queue_id))
            if tail == ["processor", "pause"]:
                return self._only(method, "PUT", lambda ex: self.processor(ex, started=False))
            if tail == ["processor", "resume"]:
                return self._only(method, "PUT", lambda ex: self.processor(ex, started=True))
        return None

    @staticmethod
    def _only(method: str, wanted: str, route: Route) -> Route:
        if method == wanted or (method == "HEAD" and wanted == "GET"):
            return route
        return lambda ex: ex.send_json(405, {"detail": "Method Not Allowed"})

    def serve(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> SimServer:
        server = SimServer(
            host, port, self.route, server_name="invokeai", not_found=_not_found, verbose=verbose
        )
        server.start()
        return server

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._worker.join(timeout=5)
        self.gpu.release_prefix(f"{OWNER}:")

    # ------------------------------------------------------------------ routes

    def status(self, ex: Exchange, queue_id: str) -> None:
        ex.send_json(200, self.queue_status(queue_id))

    def queue_status(self, queue_id: str = "default") -> dict[str, Any]:
        with self._lock:
            counts = {s: 0 for s in ("pending", "in_progress", "completed", "failed", "canceled")}
            for item in self._items.values():
                counts[item.status] += 1
            cur = self._current
            return {
                "queue": {
                    "queue_id": queue_id,
                    "item_id": cur.item_id if cur else None,
                    "batch_id": cur.batch_id if cur else None,
                    "session_id": cur.session_id if cur else None,
                    "pending": counts["pending"],
                    "in_progress": counts["in_progress"],
                    "waiting": 0,
                    "completed": counts["completed"],
                    "failed": counts["failed"],
                    "canceled": counts["canceled"],
                    "total": len(self._items),
                    "user_pending": None,
                    "user_in_progress": None,
                },
                "processor": {"is_started": self._started, "is_processing": cur is not None},
            }

    def enqueue(self, ex: Exchange, queue_id: str) -> None:
        try:
            body = ex.json()
        except BadJson:
            ex.send_json(422, {"detail": [{"type": "json_invalid", "msg": "JSON decode error"}]})
            return
        batch = body.get("batch") if isinstance(body, dict) else None
        graph = batch.get("graph") if isinstance(batch, dict) else None
        if not isinstance(graph, dict):
            where = ["body", "batch", "graph"]
            missing = {"type": "missing", "loc": where, "msg": "Field required"}
            ex.send_json(422, {"detail": [missing]})
            return
        assert isinstance(batch, dict)
        models = tuple(
            (key, int(float(gib if gib is not None else self.config.model_gib) * GIB))
            for key, gib in _identifiers(graph.get("nodes", {}))
        )
        seconds = float(batch.get("sim_seconds", 2.0))
        runs = max(1, int(batch.get("runs", 1)))
        batch_id = str(batch.get("batch_id") or uuid.uuid4())
        ids = []
        with self._lock:
            for _ in range(runs):
                item = _Item(next(self._ids), batch_id, str(uuid.uuid4()), models, seconds)
                self._items[item.item_id] = item
                self._pending.append(item.item_id)
                ids.append(item.item_id)
            self._wake.notify_all()
        ex.send_json(
            200,
            {
                "queue_id": queue_id,
                "enqueued": runs,
                "requested": runs,
                "batch": {"batch_id": batch_id, "graph": graph, "runs": runs},
                "priority": 0,
                "item_ids": ids,
            },
        )

    def processor(self, ex: Exchange, *, started: bool) -> None:
        with self._lock:
            self._started = started
            self._wake.notify_all()
            ex.send_json(200, {"is_started": started, "is_processing": self._current is not None})

    def empty_model_cache(self, ex: Exchange) -> None:
        self.empty()
        ex.send_json(200, None)

    def empty(self) -> None:
        """`make_room(1000 GiB)`: waits for the cache lock, drops the unlocked entries."""
        with self._cache_lock:
            self.empty_calls += 1
            for key, entry in list(self._cache.items()):
                if entry.locks > 0:
                    continue  # the model of the running node stays
                del self._cache[key]
                self.gpu.release(f"{OWNER}:model:{key}")
                if self._stats is not None:
                    self._stats.cleared += 1

    def stats(self, ex: Exchange) -> None:
        with self._cache_lock:
            if self._stats is None:
                ex.send_json(200, None)
                return
            sizes = {k: e.size for k, e in self._cache.items()}
            ex.send_json(
                200,
                {
                    "hits": self._stats.hits,
                    "misses": self._stats.misses,
                    "high_watermark": self._stats.high_watermark,
                    "in_cache": len(sizes),
                    "cleared": self._stats.cleared,
                    "cache_size": 0,
                    "loaded_model_sizes": sizes,
                },
            )

    def version(self, ex: Exchange) -> None:
        ex.send_json(200, {"version": VERSION, "highlights": []})

    def sim_state(self, ex: Exchange) -> None:
        with self._cache_lock, self._lock:
            cache = {k: {"bytes": e.size, "locked": e.locks > 0} for k, e in self._cache.items()}
            state = {"cache": cache, "empty_calls": self.empty_calls}
            state["processing"] = self._current is not None
        ex.send_json(200, state)

    # ------------------------------------------------------------------ the processor

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self._started and self._pending):
                    self._wake.wait()
                if self._closed:
                    return
                item = self._items[self._pending.popleft()]
                item.status = "in_progress"
                self._current = item
            ok = self._execute(item)
            with self._lock:
                item.status = "completed" if ok else "failed"
                self._current = None

    def _execute(self, item: _Item) -> bool:
        locked: list[_Entry] = []
        try:
            for key, size in item.models:
                entry = self._load(key, size)
                if entry is None:
                    return False
                locked.append(entry)
                with self._cache_lock:
                    entry.locks += 1
            self._sleep(item.seconds)
            return True
        finally:
            with self._cache_lock:
                for entry in locked:
                    entry.locks -= 1

    def _load(self, key: str, size: int) -> _Entry | None:
        with self._cache_lock:
            if self._stats is None:
                self._stats = _Stats()
            if not self._context:
                self.gpu.allocate_partial(f"{OWNER}:context", self.pid, CONTEXT_BYTES)
                self._context = True
            entry = self._cache.get(key)
            if entry is not None:
                self._stats.hits += 1
                return entry
            self._stats.misses += 1
            # Reading the weights holds the cache lock: an empty_model_cache waits for it.
            self._sleep(self.config.load_seconds)
            if not self.gpu.allocate(f"{OWNER}:model:{key}", self.pid, size):
                # make_room: drop unlocked entries to fit, then try once more
                for other, e in list(self._cache.items()):
                    if e.locks == 0:
                        del self._cache[other]
                        self.gpu.release(f"{OWNER}:model:{other}")
                if not self.gpu.allocate(f"{OWNER}:model:{key}", self.pid, size):
                    return None  # torch.OutOfMemoryError: the item fails
            entry = _Entry(key, size)
            self._cache[key] = entry
            total = sum(e.size for e in self._cache.values())
            self._stats.high_watermark = max(self._stats.high_watermark, total)
            return entry

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(max(0.0, seconds * self.config.time_scale))


def _identifiers(value: Any) -> list[tuple[str, Any]]:
    """Every model identifier object (`key` plus `base` or `type`) in a graph's nodes."""
    found: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        if isinstance(value.get("key"), str) and ("base" in value or "type" in value):
            found.append((value["key"], value.get("sim_gib")))
            return found
        for v in value.values():
            found += _identifiers(v)
    elif isinstance(value, list):
        for v in value:
            found += _identifiers(v)
    return list(dict.fromkeys(found))


def _not_found(ex: Exchange) -> None:
    ex.send_json(404, {"detail": "Not Found"})


__all__ = ["FakeInvokeAI", "InvokeConfig"]
