"""The API fallback: VRAM figures from ComfyUI /system_stats and Ollama /api/ps."""

from __future__ import annotations

from supervisor.model import ComfyStats, GpuMemory, OllamaModel
from supervisor.vram.api import API_GPU_UUID, comfy_vram_bytes, gpus_from_api, ollama_vram_bytes

GIB = 1024**3
MIB = 1024**2


def stats(
    *,
    total: int = 24 * GIB,
    driver_free: int = 10 * GIB,
    reserved: int = 6 * GIB,
    cached: int = 2 * GIB,
    kind: str = "cuda",
) -> ComfyStats:
    # vram_free counts torch's cache as free (api-facts 2.2).
    return ComfyStats(
        device_name="cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
        device_type=kind,
        vram_total_bytes=total,
        vram_free_bytes=driver_free + cached,
        torch_reserved_bytes=reserved,
        torch_cached_bytes=cached,
    )


def model(vram: int, size: int | None = None) -> OllamaModel:
    return OllamaModel(name="m:latest", size_bytes=size or vram, size_vram_bytes=vram)


def test_torch_cache_counts_as_used() -> None:
    (gpu,) = gpus_from_api([stats()], [model(8 * GIB)])
    assert gpu == GpuMemory(
        uuid=API_GPU_UUID,
        index=0,
        name="cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
        total_bytes=24 * GIB,
        used_bytes=14 * GIB,  # not 12: ComfyUI's 2 GiB cache is not free for Ollama
        free_bytes=10 * GIB,
    )
    assert API_GPU_UUID == "api-0"


def test_without_comfyui_stats_the_gpu_is_unknown() -> None:
    assert gpus_from_api([], [model(8 * GIB)]) == ()


def test_cpu_comfyui_gives_no_gpu_but_a_later_cuda_one_does() -> None:
    assert gpus_from_api([stats(kind="cpu")], []) == ()
    (gpu,) = gpus_from_api([stats(kind="cpu"), stats(total=16 * GIB, driver_free=GIB)], [])
    assert gpu.total_bytes == 16 * GIB and gpu.free_bytes == GIB


def test_ollama_loaded_since_the_stats_reading_is_a_floor() -> None:
    # Stats say 20 GiB free, but ps (read later) shows a 12 GiB model: it is on that GPU.
    (gpu,) = gpus_from_api([stats(driver_free=20 * GIB, reserved=GIB, cached=0)], [model(12 * GIB)])
    assert gpu.used_bytes == 13 * GIB
    assert gpu.free_bytes == 11 * GIB


def test_figures_stay_within_the_total() -> None:
    (gpu,) = gpus_from_api([stats(total=8 * GIB, driver_free=GIB)], [model(40 * GIB)])
    assert (gpu.used_bytes, gpu.free_bytes) == (8 * GIB, 0)
    # A cache larger than vram_free (readings taken at different moments inside ComfyUI)
    odd = ComfyStats("cuda:0", "cuda", 8 * GIB, 100 * MIB, GIB, 900 * MIB)
    (gpu,) = gpus_from_api([odd], [])
    assert (gpu.used_bytes, gpu.free_bytes) == (8 * GIB, 0)


def test_comfy_vram_is_what_torch_reserves() -> None:
    assert comfy_vram_bytes(stats(reserved=6 * GIB)) == 6 * GIB
    assert comfy_vram_bytes(stats(kind="cpu")) == 0  # --cpu reports system RAM there


def test_ollama_vram_is_the_sum_of_size_vram() -> None:
    assert ollama_vram_bytes([model(3 * GIB, size=4 * GIB), model(5 * GIB)]) == 8 * GIB
    assert ollama_vram_bytes([]) == 0
