"""Client for one ComfyUI server: memory stats, queue state, /free and /interrupt.

Follows api-facts §2. Policy:
- Every failure (connect error, timeout, HTTP 4xx/5xx, a body that is not JSON, JSON of
  the wrong shape) raises `ServiceError("comfyui at <url>", ...)` from its cause.
- Reads (GET /system_stats, GET /queue) are retried on connect errors and timeouts
  (`attempts` in all, tenacity wait injectable). `free` only sets flags, so sending it
  twice has the same effect as once: retried the same way. `interrupt` is retried only
  when the connection was never made, so a delivered interrupt is never repeated.
- `free` returns when ComfyUI has stored the flags (HTTP 200, empty body). ComfyUI acts on
  them between prompts, never during one (gotcha 8): callers verify by reading VRAM.
- This client never interrupts on its own; `free` and `interrupt` are separate calls.
"""

from __future__ import annotations

from typing import Any

from supervisor.clients._http import (
    Retry,
    ServiceClient,
    ShapeError,
    field,
    integer,
    items,
    obj,
    text,
)
from supervisor.model import ComfyQueue, ComfyStats


class ComfyClient(ServiceClient):
    """One ComfyUI server at `base_url` (implements `ports.ComfyApi`). Thread-safe."""

    SERVICE = "comfyui"

    def system_stats(self) -> ComfyStats:
        """GET /system_stats: ComfyUI's primary torch device (bytes), its version, argv and
        packages (which tell its memory mode, api-facts-2026 section 3)."""
        return self._http.json("GET", "/system_stats", _parse_stats, retry=Retry.TRANSIENT)

    def queue(self) -> ComfyQueue:
        """GET /queue: how many prompts run and wait (the reliable busy signal, 2.6)."""
        return self._http.json("GET", "/queue", _parse_queue, retry=Retry.TRANSIENT)

    def free(self, *, unload_models: bool, free_memory: bool) -> None:
        """POST /free with exactly these flags. Success is HTTP 200 (the body is empty)."""
        self._http.request(
            "POST",
            "/free",
            body={"unload_models": unload_models, "free_memory": free_memory},
            retry=Retry.TRANSIENT,
        )

    def interrupt(self) -> None:
        """POST /interrupt (global): stops the running prompt at its next check."""
        # The handler reads a JSON body when there is one; `{}` means "whatever runs".
        self._http.request("POST", "/interrupt", body={}, retry=Retry.CONNECT)


def _parse_stats(data: Any) -> ComfyStats:
    body = obj(data, "the body")
    devices = items(field(body, "devices", "the body"), "devices")
    if not devices:
        raise ShapeError("devices is an empty list")
    # 0.3.x lists the one device torch uses (api-facts 2.2); 0.15+ lists every torch
    # device, the primary (the one ComfyUI runs on) first (api-facts-2026 section 2).
    device = obj(devices[0], "devices[0]")
    # `system` says which ComfyUI this is; a server without it (a fork) is still usable.
    system = body.get("system")
    system = system if isinstance(system, dict) else {}
    version = system.get("comfyui_version")
    argv = system.get("argv")
    packages = system.get("comfy_package_versions")

    def number(key: str) -> int:
        value = field(device, key, "devices[0]")
        # torch and psutil report ints; a float from a fork or a non-CUDA backend is
        # still a byte count, so accept it rather than lose the whole reading.
        if isinstance(value, float) and value == value and value >= 0:
            return int(value)
        return integer(value, f"devices[0].{key}")

    name = device.get("name")
    return ComfyStats(
        device_name=name if isinstance(name, str) else "",
        device_type=text(field(device, "type", "devices[0]"), "devices[0].type"),
        vram_total_bytes=number("vram_total"),
        vram_free_bytes=number("vram_free"),
        torch_reserved_bytes=number("torch_vram_total"),
        torch_cached_bytes=number("torch_vram_free"),
        version=version if isinstance(version, str) else "",
        argv=tuple(a for a in argv if isinstance(a, str)) if isinstance(argv, list) else (),
        packages=tuple(str(k) for k in packages) if isinstance(packages, dict) else (),
    )


def _parse_queue(data: Any) -> ComfyQueue:
    body = obj(data, "the body")
    running = items(field(body, "queue_running", "the body"), "queue_running")
    pending = items(field(body, "queue_pending", "the body"), "queue_pending")
    return ComfyQueue(running=len(running), pending=len(pending))
