"""GPU memory readings: NVML (`nvml`), the API fallback (`api`), and per-service
attribution of NVML processes (`attribution`)."""

from supervisor.vram.api import API_GPU_UUID, comfy_vram_bytes, gpus_from_api, ollama_vram_bytes
from supervisor.vram.attribution import OTHER, Attribution, attribute
from supervisor.vram.nvml import NvmlReader, nvml_available

__all__ = [
    "API_GPU_UUID",
    "OTHER",
    "Attribution",
    "NvmlReader",
    "attribute",
    "comfy_vram_bytes",
    "gpus_from_api",
    "nvml_available",
    "ollama_vram_bytes",
]
