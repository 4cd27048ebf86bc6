"""ComfyUI >= 0.15 with Dynamic VRAM, in real containers: its weights live outside
PyTorch's allocator, so /system_stats shows torch figures near 0 while it holds GiBs
(api-facts-2026 section 2). The supervisor must still free it when a load needs room.

Real engine, real supervisor process (no NVML: the API source, where only the device
figures can show the weights), simulated Ollama and ComfyUI containers sharing one
simulated 24 GiB GPU (harness.py). The ComfyUI runs the sim's 2026 profile explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.harness import (
    GIB,
    Sim,
    Sims,
    Supervisor,
    comfy_held,
    comfy_hold_vram,
    comfy_torch_reserved,
    freed_on,
    ollama_load,
    ollama_model,
    wait_until,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

StartSupervisor = Callable[..., Supervisor]
# ~10 GB with its KV cache: it cannot fit beside a ComfyUI holding 16 GiB of a 24 GiB GPU.
BIG_MODEL = "qwen2.5:14b"


def fully_on_gpu(ollama: Sim, model: str) -> bool:
    m = ollama_model(ollama, model)
    return m is not None and m["size_vram"] == m["size"]


def test_a_dynamic_vram_comfyui_with_torch_figures_near_0_is_freed_for_a_load(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    ollama = sims.ollama()
    comfy = sims.comfyui(extra=("--profile", "2026"))
    held = comfy_hold_vram(comfy, 16)
    system = comfy.get("/system_stats")["system"]
    assert system["comfyui_version"] == "0.38.1"
    assert "comfy-aimdo" in system["comfy_package_versions"]
    # The situation of the issue: 16 GiB of weights, and torch reports none of them.
    assert held >= 16 * GIB
    assert comfy_torch_reserved(comfy) < 256 * 1024**2

    sup = start_supervisor()
    sup.wait_for(f"comfyui/{comfy.name}: ComfyUI 0.38.1, Dynamic VRAM")
    sup.wait_for(f"Discovered ollama container {ollama.name}")
    sup.wait_pass()  # Ollama's first read is the baseline: only later models are "new"
    shown = sup.service("comfyui", comfy.name)
    assert shown is not None and shown["mode"] == "dynamic-vram", shown
    assert shown["vram_bytes"] >= 15 * GIB, shown  # bounded from the device figures

    ollama_load(ollama, BIG_MODEL)
    loaded = ollama_model(ollama, BIG_MODEL)
    assert loaded is not None and loaded["size_vram"] < loaded["size"], loaded  # it spilled

    sup.wait_for(f"New Ollama model(s) detected: {BIG_MODEL}")
    sup.wait_for(freed_on(comfy.name))
    wait_until(lambda: fully_on_gpu(ollama, BIG_MODEL), 40, f"{BIG_MODEL} fully on the GPU")
    assert comfy_held(comfy) < held // 4
    assert not sup.find("holds only"), sup.log()
    assert sup.errors() == [], sup.log()
