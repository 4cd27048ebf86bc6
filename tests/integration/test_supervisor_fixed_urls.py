"""Fixed-URL mode: no Docker at all, and the supervisor does not miss it.

The simulated Ollama and ComfyUI run as plain host processes (`python -m supervisor.sim`)
sharing a GPU state file; the supervisor gets both URLs and a DOCKER_HOST that points at a
socket that does not exist. It must run, free ComfyUI when a model loads, and never report a
Docker failure (a user running without Docker would otherwise see an error every pass).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.integration.harness import (
    HostSim,
    Supervisor,
    comfy_held,
    comfy_hold_vram,
    ollama_load,
    ollama_model,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = pytest.mark.integration

NO_DOCKER = "unix:///nonexistent/vram-supervisor-it.sock"


def test_fixed_urls_without_docker_free_comfyui_on_a_load(
    host_sims: Callable[..., HostSim], start_supervisor: Callable[..., Supervisor]
) -> None:
    ollama = host_sims("ollama")
    comfy = host_sims("comfyui")
    held = comfy_hold_vram(comfy, 10)
    sup = start_supervisor(
        DOCKER_HOST=NO_DOCKER, VRAM_OLLAMA_URL=ollama.url, VRAM_COMFYUI_URL=comfy.url
    )
    sup.wait_pass()
    status = sup.status()
    assert [c["url"] for c in status["comfyui"]] == [comfy.url]
    assert [o["url"] for o in status["ollama"]] == [ollama.url]

    ollama_load(ollama, "llama3.1:8b")
    sup.wait_for("New Ollama model(s) detected: llama3.1:8b")
    sup.wait_for(re.compile(r"^Freed ComfyUI memory \(soft\): .* on comfyui "))
    assert comfy_held(comfy) < held // 4
    model = ollama_model(ollama, "llama3.1:8b")
    assert model is not None and model["size_vram"] == model["size"]

    # Several more passes: still nothing about Docker, and no error of any kind.
    sup.wait_passes(3)
    assert sup.is_alive() and sup.healthz() == 200
    assert sup.errors() == [], sup.log()
    docker_lines = [
        r for r in sup.snapshot() if "docker" in r.message.lower() and r.level != "DEBUG"
    ]
    assert docker_lines == [], sup.log()
    status = sup.status()
    assert status["docker"]["in_use"] is False and status["docker"]["state"] == "not used"
    assert all(s["reachable"] for s in status["comfyui"] + status["ollama"]), status
