"""VRAM figures from the services' own APIs, for hosts where NVML cannot be used.

Pure. Used when `NvmlReader` raises `NvmlUnavailable` (no libnvidia-ml in the supervisor's
container, for example). What the APIs can and cannot tell (api-facts 2.2, gotcha 10):

- ComfyUI's /system_stats device entry comes from `torch.cuda.mem_get_info`: device-wide
  figures for the one GPU ComfyUI uses, including every other process on it (Ollama too).
  Its `vram_free` counts memory held in PyTorch's caching allocator as free. For our
  decisions that memory is held by ComfyUI (another process cannot use it until ComfyUI
  empties its cache, which is what /free does), so the driver's free memory is
  `vram_free - torch_vram_free` and `used = total - driver free`.
- The result is one pseudo GPU with uuid `API_GPU_UUID` ("api-0"), index 0: the API does
  not say which physical GPU it is (its `index` is a process-local CUDA ordinal).
- Without a CUDA ComfyUI reading there is no device-wide figure at all: the result is
  empty, meaning "unknown" (Ollama's /api/ps says what Ollama holds, not what is free).
- Ollama's `size_vram` is part of the device-wide reading already. It is used only as a
  floor for `used`: the two readings are taken at different moments, and a model loaded in
  between must not make the GPU look freer than it is. (This assumes both services share
  the GPU, which is the deployment this fallback exists for.)

ComfyUI's mode (api-facts-2026 section 3), from /system_stats alone: a CPU device -> CPU;
version >= 0.15, `comfy-aimdo` among its packages, none of the flags that turn it off in
its argv and a CUDA device -> Dynamic VRAM; else classic. Under Dynamic VRAM the weights
are outside torch's figures, so what it holds is bounded from the device instead: used
memory minus Ollama's `size_vram` minus the CUDA contexts (`comfy_dynamic_bound`).
"""

from __future__ import annotations

from collections.abc import Sequence

from supervisor.model import ComfyMode, ComfyStats, GpuMemory, OllamaModel
from supervisor.policy.guards import CUDA_CONTEXT_BYTES

API_GPU_UUID = "api-0"


def comfy_mode(stats: ComfyStats | None) -> ComfyMode:
    """Classic, Dynamic VRAM or CPU, as its /system_stats tells (UNKNOWN without it)."""
    return ComfyMode.UNKNOWN if stats is None else stats.mode


def describe_comfy(stats: ComfyStats) -> str:
    """One line for logs, `status` and `doctor`: version, mode and device."""
    words = {
        ComfyMode.DYNAMIC: "Dynamic VRAM (weights outside torch's figures)",
        ComfyMode.CLASSIC: "classic VRAM (weights in torch's allocator)",
        ComfyMode.CPU: "on the CPU, holds no VRAM",
        ComfyMode.UNKNOWN: "mode unknown",
    }
    version = stats.version or "version unknown"
    device = stats.device_name or "unnamed device"
    return f"ComfyUI {version}, {words[comfy_mode(stats)]}, device {device} ({stats.device_type})"


def comfy_dynamic_bound(stats: ComfyStats, ollama_models: Sequence[OllamaModel]) -> int:
    """What a Dynamic-VRAM ComfyUI can hold at most, without NVML: the device's used
    memory minus what Ollama's models hold minus the CUDA contexts (ComfyUI's and one per
    Ollama runner). Other processes on the GPU count against ComfyUI: it is a bound."""
    if stats.device_type != "cuda":
        return 0
    total = stats.vram_total_bytes
    used = total - _clamp(stats.vram_free_bytes - stats.torch_cached_bytes, 0, total)
    contexts = CUDA_CONTEXT_BYTES * (1 + len(ollama_models))
    return max(0, used - ollama_vram_bytes(ollama_models) - contexts)


def gpus_from_api(
    stats: Sequence[ComfyStats], ollama_models: Sequence[OllamaModel]
) -> tuple[GpuMemory, ...]:
    """One pseudo GPU from the first CUDA ComfyUI reading; () when there is none."""
    first = next((s for s in stats if s.device_type == "cuda"), None)
    if first is None or first.vram_total_bytes <= 0:
        return ()
    total = first.vram_total_bytes
    driver_free = _clamp(first.vram_free_bytes - first.torch_cached_bytes, 0, total)
    used = total - driver_free
    floor = _clamp(ollama_vram_bytes(ollama_models) + comfy_vram_bytes(first), 0, total)
    used = max(used, floor)
    return (
        GpuMemory(
            uuid=API_GPU_UUID,
            index=0,
            name=first.device_name,
            total_bytes=total,
            used_bytes=used,
            free_bytes=total - used,
        ),
    )


def comfy_vram_bytes(stats: ComfyStats) -> int:
    """What ComfyUI holds on its GPU and a free can give back: torch's reserved bytes.

    0 for a non-CUDA device: under `--cpu` the "vram" fields report system RAM.
    """
    if stats.device_type != "cuda":
        return 0
    return max(0, stats.torch_reserved_bytes)


def ollama_vram_bytes(models: Sequence[OllamaModel]) -> int:
    """What Ollama's loaded models hold on GPUs: the sum of `size_vram`."""
    return sum(max(0, m.size_vram_bytes) for m in models)


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))
