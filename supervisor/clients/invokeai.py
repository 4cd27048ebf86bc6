"""Client for InvokeAI v6.x (tenants.md §5). Implements `ports.JobServerApi`.

Policy:
- `jobs()`: `GET /api/v1/queue/default/status`. Busy while the processor is processing or
  an item is in progress, and while items are pending (they start as soon as the
  processor takes them; a paused processor's pending items are work that waits too).
  `queued` = pending + in progress. The loaded models come from `GET /api/v2/models/stats`
  (`loaded_model_sizes`: the RAM cache, `null` before the first load); a failure of that
  read only leaves them out. InvokeAI reports no VRAM figure: `vram_bytes` is None.
- `free()`: `POST /api/v2/models/empty_model_cache` (200 `null`). It waits for the cache
  lock (a model being read into the cache), so its read timeout is long; it keeps the
  models that a running node holds locked, which is why it is only called while idle.
  Sent once (retried only when it never reached the server). 403: InvokeAI in multi-user
  mode, where only an admin may empty the cache (said so in the error).
- Every failure raises `ServiceError("invokeai at <url>", ...)`.
"""

from __future__ import annotations

from typing import Any

import httpx

from supervisor.clients._http import Retry, ServiceClient, ShapeError, field, integer, obj
from supervisor.errors import ServiceError
from supervisor.model import JobState

QUEUE_ID = "default"
# empty_model_cache waits for the cache lock: a model being read from disk holds it.
FREE_TIMEOUT_S = 120.0


class InvokeAIClient(ServiceClient):
    """One InvokeAI at `base_url` (implements `ports.JobServerApi`). Thread-safe."""

    SERVICE = "invokeai"

    def jobs(self) -> JobState:
        busy, queued = self._http.json(
            "GET", f"/api/v1/queue/{QUEUE_ID}/status", parse_queue_status, retry=Retry.TRANSIENT
        )
        try:
            models = self._http.json("GET", "/api/v2/models/stats", parse_stats, retry=Retry.NEVER)
        except ServiceError:
            models = ()
        return JobState(busy=busy, can_free=True, queued=queued, models=models)

    def free(self) -> None:
        self._http.request(
            "POST",
            "/api/v2/models/empty_model_cache",
            retry=Retry.CONNECT,
            timeout=httpx.Timeout(self._http.timeout_s, read=FREE_TIMEOUT_S),
            on_status=self._forbidden,
        )

    def _forbidden(self, response: httpx.Response) -> ServiceError | None:
        if response.status_code == 403:
            return self._http.error(
                "POST /api/v2/models/empty_model_cache returned HTTP 403: InvokeAI runs in "
                "multi-user mode, where only an admin may empty the model cache"
            )
        return None


def parse_queue_status(data: Any) -> tuple[bool, int]:
    """(busy, queued) from a queue status: `{"queue": {...}, "processor": {...}}`."""
    body = obj(data, "status")
    queue = obj(field(body, "queue", "status"), "status.queue")
    processor = obj(field(body, "processor", "status"), "status.processor")
    pending = integer(field(queue, "pending", "status.queue"), "status.queue.pending")
    running = integer(field(queue, "in_progress", "status.queue"), "status.queue.in_progress")
    processing = field(processor, "is_processing", "status.processor")
    if not isinstance(processing, bool):
        raise ShapeError("status.processor.is_processing is not a boolean")
    return processing or running > 0 or pending > 0, pending + running


def parse_stats(data: Any) -> tuple[str, ...]:
    """The models in the RAM cache from `CacheStats` (`null` before the first load)."""
    if data is None:
        return ()
    sizes = obj(field(obj(data, "stats"), "loaded_model_sizes", "stats"), "loaded_model_sizes")
    return tuple(sorted(sizes))
