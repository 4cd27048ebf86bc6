"""Client for Stable Diffusion web UIs with the `/sdapi/v1` API: AUTOMATIC1111, Forge and
SD.Next (tenants.md §4, §6). Implements `ports.ReloadingJobServerApi`.

Policy:
- Which one (`JobState.mode`), found on the first read and kept for the client's life
  (a recreated container gets a new client): `GET /sdapi/v1/status` answering
  `{"status": "running"|"idle", ...}` is SD.Next (A1111 and Forge have no such route);
  otherwise `GET /sdapi/v1/options` with Forge's own `forge_*` settings is Forge, and
  anything else A1111. The options test is this project's choice (the sheet names no
  marker; Forge declares `forge_preset` and friends): mistaking a Forge for an A1111 only
  sends a reload-checkpoint that Forge ignores, the other way round would leave A1111's
  weights parked, so A1111 is the default. A 404 there means the API is off: the error
  says to start it with `--api`.
- `jobs()`: A1111 and Forge: `GET /sdapi/v1/progress?skip_current_image=true`, busy while
  `state.job_count` > 0 (only the running job shows there); Forge also
  `GET /internal/pending-tasks` (`size`: tasks waiting for the queue lock; a 404 or a
  failure leaves it out). SD.Next: `GET /sdapi/v1/status`, busy while `status` is
  "running" or `queued` > 0. `vram_bytes` is the process's own torch figure,
  `cuda.reserved.current` of `GET /sdapi/v1/memory` (allocator-reserved, no CUDA context;
  None when it has no `cuda` figures or the read fails). The checkpoint is not read (the
  options are every setting of the UI: too much for every pass).
- `free()`: `POST /sdapi/v1/unload-checkpoint` (200 `{}`; SD.Next 204), sent once. It
  does not wait for a running job, so it is only called while idle (the actor reads
  `jobs()` again first). A1111 moves the weights to CPU RAM and its next job does not move
  them back (tenants.md: call reload-checkpoint first): the client then reports them in
  `parked_bytes` (their torch figure before the free) until `reload()`; Forge and SD.Next
  load on demand and report nothing parked.
- `reload()`: `POST /sdapi/v1/reload-checkpoint` (A1111: `send_model_to_device`).
  Parked weights are also forgotten when the torch figure shows them back (a job or
  the user reloaded them).
- Every failure raises `ServiceError("sd-webui at <url>", ...)`.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from supervisor.clients._http import Retry, ServiceClient, ShapeError, field, integer, obj
from supervisor.errors import ServiceError
from supervisor.model import JobState

A1111, FORGE, SDNEXT = "a1111", "forge", "sdnext"
# Moving a checkpoint between CPU RAM and the GPU takes seconds (more for big ones).
MOVE_TIMEOUT_S = 120.0


class SdWebUiClient(ServiceClient):
    """One A1111 / Forge / SD.Next at `base_url`. Thread-safe (the observer reads it, the
    actor frees it)."""

    SERVICE = "sd-webui"

    def __init__(self, base_url: str, timeout_s: float = 5.0, **options: Any) -> None:
        super().__init__(base_url, timeout_s, **options)
        self._lock = threading.Lock()
        self._mode: str | None = None
        self._parked: int | None = None  # A1111: the bytes its last free moved to CPU RAM

    # ------------------------------------------------------------------ reads

    def mode(self) -> str:
        with self._lock:
            if self._mode is not None:
                return self._mode
        mode = self._detect()
        with self._lock:
            self._mode = mode
        return mode

    def _detect(self) -> str:
        try:
            status = self._http.json(
                "GET", "/sdapi/v1/status", _sdnext_status, retry=Retry.TRANSIENT
            )
        except ServiceError as exc:
            if not any(m in str(exc) for m in ("HTTP 404", "unexpected shape", "not JSON")):
                raise
        else:
            if status is not None:
                return SDNEXT
        options = self._http.json(
            "GET",
            "/sdapi/v1/options",
            lambda data: obj(data, "options"),
            retry=Retry.TRANSIENT,
            on_status=self._api_off,
        )
        return FORGE if any(str(k).startswith("forge_") for k in options) else A1111

    def jobs(self) -> JobState:
        mode = self.mode()
        if mode == SDNEXT:
            busy, queued = self._http.json(
                "GET", "/sdapi/v1/status", parse_sdnext_status, retry=Retry.TRANSIENT
            )
        else:
            running = self._http.json(
                "GET",
                "/sdapi/v1/progress?skip_current_image=true",
                parse_progress,
                retry=Retry.TRANSIENT,
                on_status=self._api_off,
            )
            waiting = self._pending() if mode == FORGE else 0
            busy, queued = running > 0 or waiting > 0, running + waiting
        vram = self._torch_bytes()
        with self._lock:
            if self._parked is not None and vram is not None and vram >= _back(self._parked):
                self._parked = None  # its weights are back on the GPU
            parked = self._parked if mode == A1111 else None
        return JobState(
            busy=busy, can_free=True, queued=queued, mode=mode, vram_bytes=vram, parked_bytes=parked
        )

    def _pending(self) -> int:
        try:
            return self._http.json(
                "GET", "/internal/pending-tasks", parse_pending, retry=Retry.NEVER
            )
        except ServiceError:
            return 0  # not there (or not answering): the running job still shows in /progress

    def _torch_bytes(self) -> int | None:
        try:
            return self._http.json("GET", "/sdapi/v1/memory", parse_memory, retry=Retry.NEVER)
        except ServiceError:
            return None

    # ------------------------------------------------------------------ actions

    def free(self) -> None:
        mode = self.mode()
        before = self._torch_bytes() if mode == A1111 else None
        self._http.request(
            "POST",
            "/sdapi/v1/unload-checkpoint",
            retry=Retry.CONNECT,
            timeout=httpx.Timeout(self._http.timeout_s, read=MOVE_TIMEOUT_S),
            on_status=self._api_off,
        )
        if mode == A1111:
            with self._lock:
                if self._parked is None:
                    self._parked = before or 0

    def reload(self) -> None:
        self._http.request(
            "POST",
            "/sdapi/v1/reload-checkpoint",
            retry=Retry.CONNECT,
            timeout=httpx.Timeout(self._http.timeout_s, read=MOVE_TIMEOUT_S),
            on_status=self._api_off,
        )
        with self._lock:
            self._parked = None

    def _api_off(self, response: httpx.Response) -> ServiceError | None:
        if response.status_code == 404:
            path = response.request.url.path
            return self._http.error(
                f"{response.request.method} {path} returned HTTP 404: the web UI serves no "
                "API (start it with --api, or --nowebui for the API only)"
            )
        return None


def _back(parked: int) -> int:
    """The torch figure that says parked weights are on the GPU again: half of them, or
    1 GiB when their size was not known."""
    return parked // 2 if parked > 0 else 1024**3


def parse_progress(data: Any) -> int:
    """`state.job_count` of `/sdapi/v1/progress`: jobs of the running task (0: idle)."""
    state = obj(field(obj(data, "progress"), "state", "progress"), "progress.state")
    count = integer(field(state, "job_count", "progress.state"), "progress.state.job_count")
    return max(0, count)  # A1111 uses -1 for "not counted yet" during a task's start


def parse_pending(data: Any) -> int:
    return max(0, integer(field(obj(data, "pending-tasks"), "size", "pending-tasks"), "size"))


def _sdnext_status(data: Any) -> tuple[bool, int] | None:
    """SD.Next's status, or None for a body that is not one (another UI's answer)."""
    try:
        return parse_sdnext_status(data)
    except ShapeError:
        return None


def parse_sdnext_status(data: Any) -> tuple[bool, int]:
    """(busy, queued) of SD.Next's `/sdapi/v1/status`."""
    body = obj(data, "status")
    status = field(body, "status", "status")
    if status not in ("running", "idle"):
        raise ShapeError(f"status.status is {status!r}, expected 'running' or 'idle'")
    queued = body.get("queued")
    waiting = queued if isinstance(queued, int) and not isinstance(queued, bool) else 0
    running = status == "running"
    return running or waiting > 0, int(running) + max(0, waiting)


def parse_memory(data: Any) -> int | None:
    """`cuda.reserved.current` of `/sdapi/v1/memory` (None without CUDA figures: a CPU
    install answers `cuda: {"error": ...}`)."""
    cuda = obj(data, "memory").get("cuda")
    if not isinstance(cuda, dict) or not isinstance(cuda.get("reserved"), dict):
        return None
    return integer(field(cuda["reserved"], "current", "cuda.reserved"), "cuda.reserved.current")
