"""Fresh VRAM readings for the Actor's verification (`actions.Probe`).

Policy: the narrowest reading that works. For a ComfyUI: the NVML memory of its
container's processes (when NVML lists them with a figure: not on WSL2 or under WDDM),
else from its /system_stats (CUDA only): torch's reserved bytes in classic mode; under
Dynamic VRAM, whose weights torch does not see, the device bound (used memory less what
Ollama's /api/ps holds and the contexts, plus ComfyUI's own context; `is_device_wide`, as
other GPU users count in it), or the device's used bytes (`is_device_wide`) when Ollama
cannot be read; else the GPU's used bytes from NVML
(`is_device_wide`, other processes included). Free VRAM: NVML, the best of the GPUs asked
about (of any GPU when none is known), else ComfyUI's vram_free less torch's cache.
A failed reading is logged at DEBUG and the next source is tried; None when none works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loguru import logger

from supervisor.errors import NvmlUnavailable, ServiceError
from supervisor.model import ComfyMode, ComfyStats, OllamaModel
from supervisor.policy import CUDA_CONTEXT_BYTES
from supervisor.ports import Reading
from supervisor.reads import contract_break
from supervisor.vram.api import (
    comfy_dynamic_bound,
    comfy_mode,
    comfy_vram_bytes,
)

if TYPE_CHECKING:
    from supervisor.observe import Observer


class LiveProbe:
    """Reads through the Observer's adapters: its GPU reader, its container PIDs, and the
    ComfyUI clients of its last observation."""

    def __init__(self, observer: Observer) -> None:
        self._observer = observer

    def comfy_reading(self, key: str, *, fresh_pids: bool = False) -> Reading | None:
        if fresh_pids:
            self._observer.refresh_pids(key)
        gpu, pids = self._observer.gpu, self._observer.pids(key)
        if gpu is not None and pids:
            try:
                wanted = set(pids)
                known = [
                    p.used_bytes
                    for p in gpu.processes()
                    if p.pid in wanted and p.used_bytes is not None
                ]
                if known:
                    return Reading(sum(known))
                # No process listed (WSL2, Docker Desktop) or none with a memory figure
                # (WDDM): that is no reading, not 0 bytes. Ask ComfyUI instead.
            except NvmlUnavailable as exc:
                logger.debug(f"NVML process reading failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - a reader bug: said once, next source
                contract_break("The NVML reader", exc, self._observer.broken_seen)
        target = self._observer.targets.comfyuis.get(key)
        if target is not None:
            try:
                stats = target[1].system_stats()
                if comfy_mode(stats) is ComfyMode.DYNAMIC:
                    return self._dynamic_reading(stats)
                if stats.device_type == "cuda":
                    return Reading(comfy_vram_bytes(stats))
            except ServiceError as exc:
                logger.debug(f"ComfyUI stats reading failed: {exc}")
        if gpu is not None:
            try:
                return Reading(sum(g.used_bytes for g in gpu.gpus()), is_device_wide=True)
            except NvmlUnavailable as exc:
                logger.debug(f"NVML device reading failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - a reader bug: said once, next source
                contract_break("The NVML reader", exc, self._observer.broken_seen)
        return None

    def _dynamic_reading(self, stats: ComfyStats) -> Reading:
        """A Dynamic-VRAM ComfyUI without NVML: the device bound (with its own context, as
        an NVML reading would have it), else the device's used bytes."""
        models: list[OllamaModel] = []
        try:
            for _, ollama in self._observer.targets.ollamas.values():
                models.extend(ollama.ps())
        except ServiceError as exc:
            logger.debug(f"Ollama ps failed; reading the whole device: {exc}")
            total = stats.vram_total_bytes
            free = max(0, stats.vram_free_bytes - stats.torch_cached_bytes)
            return Reading(max(0, total - free), is_device_wide=True)
        # A bound, not ComfyUI's own figure: other GPU users count in it, so it must never
        # say "holds nothing" (it is compared only with readings of its own kind).
        return Reading(comfy_dynamic_bound(stats, models) + CUDA_CONTEXT_BYTES, is_device_wide=True)

    def free_bytes(self, gpu_uuids: tuple[str, ...] = ()) -> int | None:
        gpu = self._observer.gpu
        if gpu is not None:
            try:
                gpus = gpu.gpus()
                # Unknown (or unseen) GPUs: any GPU, as Ollama places a model where it fits.
                chosen = [g for g in gpus if g.uuid in gpu_uuids] or list(gpus)
                if chosen:
                    # Of several, the model lands on the one with the most free memory.
                    return max(g.free_bytes for g in chosen)
            except NvmlUnavailable as exc:
                logger.debug(f"NVML device reading failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - a reader bug: said once, next source
                contract_break("The NVML reader", exc, self._observer.broken_seen)
        for _, comfy in self._observer.targets.comfyuis.values():
            try:
                stats = comfy.system_stats()
            except ServiceError:
                continue
            if stats.device_type == "cuda":
                # Driver free = ComfyUI's vram_free minus torch's cache (api-facts 2.2).
                return max(0, stats.vram_free_bytes - stats.torch_cached_bytes)
        return None
