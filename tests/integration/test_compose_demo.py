"""The demo stack (compose/compose.demo.yml) does what it says, in real containers.

pytest-docker brings the stack up (`up --wait`: every service healthy, including the
supervisor's own HEALTHCHECK) with the image the `project_image` fixture built offline,
host network on 127.0.0.1 (ports in conftest.py). The workload service renders an image in
the fake ComfyUI, then loads a model in the fake Ollama that needs ComfyUI's memory; the
supervisor must find both services through their Docker labels and free ComfyUI, saying
so in its log with the stable line a user would grep for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx

FREED = re.compile(r"Freed ComfyUI memory \((soft|hard)\): \S+ \S+ -> \S+ \S+")


# demo_stack is conftest.DemoStack (conftest modules are not importable by name).
def test_supervisor_is_healthy_and_discovers_both_services(demo_stack: Any) -> None:
    supervisor = demo_stack.container("vram-supervisor")
    supervisor.reload()
    assert supervisor.attrs["State"]["Health"]["Status"] == "healthy"
    assert httpx.get(f"{demo_stack.supervisor_url}/healthz", timeout=5).status_code == 200
    logs = demo_stack.logs("vram-supervisor")
    ollama = demo_stack.container("fake-ollama").name
    comfyui = demo_stack.container("fake-comfyui").name
    assert f"Discovered ollama container {ollama} at {demo_stack.ollama_url}" in logs, logs
    assert f"Discovered comfyui container {comfyui} at {demo_stack.comfyui_url}" in logs, logs


def test_supervisor_frees_comfyui_when_ollama_needs_room(
    demo_stack: Any, poll: Callable[..., bool]
) -> None:
    freed = poll(lambda: FREED.search(demo_stack.logs("vram-supervisor")) is not None, 120)
    logs = demo_stack.logs("vram-supervisor")
    workload = demo_stack.logs("workload")
    assert freed, f"no free in the supervisor's log:\n{logs}\nworkload:\n{workload}"
