"""End to end without Docker: the real CLI (`python -m supervisor run`) as a subprocess,
against the simulated GPU host (fake Ollama + fake ComfyUI sharing one simulated GPU).

The supervisor gets both fixed URLs, so it must neither need nor touch Docker (DOCKER_HOST
points at a socket that does not exist). ComfyUI is made to hold VRAM with a finished image
job (smart memory keeps the checkpoint loaded), then a model is loaded through the fake
Ollama. The supervisor must notice the new model, free ComfyUI and verify it. The reaction
time (load finished -> verified free in the log) is measured and printed, not asserted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.units import GIB

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Supervisor:
    proc: subprocess.Popen[str]
    port: int
    lines: list[tuple[float, str]] = field(default_factory=list)

    def follow(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout_s: float = 30.0) -> float:
        """When (monotonic) the first line containing `text` was read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if text in line:
                    return at
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"no log line with {text!r}; log:\n{self.log()}")

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


@pytest.fixture(params=["2026", "2025"])
def sim(request: pytest.FixtureRequest) -> Iterator[SimHost]:
    """The simulated host in each generation: ComfyUI 0.38 with Dynamic VRAM (its torch
    figures do not show its weights) and ComfyUI 0.3.64 (classic)."""
    with SimHost(time_scale=0.1, profile=request.param) as host:
        yield host


# A model that fits the 24 GiB card alone but not beside ComfyUI's 10 GiB: at the default
# context of each generation (2026: 32768 tokens on 24 GiB, where qwen2.5:32b needs 28 GiB).
BIG_MODEL = {"2026": "qwen2.5:14b", "2025": "qwen2.5:32b"}


def start_supervisor(host: SimHost, **extra: str) -> Supervisor:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST="unix:///nonexistent/vram-supervisor-e2e.sock",
        VRAM_OLLAMA_URL=host.ollama_url,
        VRAM_COMFYUI_URL=host.comfyui_url,
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(port),
        VRAM_CHECK_INTERVAL="1",
        **extra,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sup = Supervisor(proc, port)
    threading.Thread(target=sup.follow, daemon=True).start()
    return sup


def stop(sup: Supervisor) -> int:
    sup.proc.send_signal(signal.SIGTERM)
    try:
        return sup.proc.wait(timeout=10)
    finally:
        sup.proc.kill()


def hold_comfy_vram(client: httpx.Client, host: SimHost, model_gib: float = 10.0) -> None:
    job = {
        "prompt": {
            "9": {
                "class_type": "SimJob",
                "inputs": {
                    "ckpt_name": f"sim-{model_gib:g}.safetensors",
                    "model_gib": model_gib,
                    "workspace_gib": 1.0,
                    "seconds": 1.0,
                    "steps": 4,
                },
            }
        }
    }
    r = client.post(f"{host.comfyui_url}/prompt", json=job)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = client.get(f"{host.comfyui_url}/prompt").json()
        if info["exec_info"]["queue_remaining"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the image job did not finish")


def comfy_held(client: httpx.Client, host: SimHost) -> int:
    """What the fake ComfyUI holds on the GPU (weights + torch's cache), from /sim/stats:
    under Dynamic VRAM its torch figures (/system_stats) do not show the weights."""
    held: int = client.get(f"{host.comfyui_url}/sim/stats").json()["memory"]["held"]
    return held


def test_new_model_frees_comfyui_end_to_end(sim: SimHost) -> None:
    with httpx.Client(timeout=120) as client:
        hold_comfy_vram(client, sim)
        held = comfy_held(client, sim)
        assert held >= 10 * GIB
        sup = start_supervisor(sim)
        try:
            deadline = time.monotonic() + 30
            while not sup.healthy() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sup.healthy(), sup.log()
            sup.wait_for("VRAM source: api")  # no NVML here; first pass done (baseline)

            requested = time.monotonic()
            r = client.post(f"{sim.ollama_url}/api/generate", json={"model": "llama3.1:8b"})
            loaded = time.monotonic()
            assert r.status_code == 200 and r.json()["done_reason"] == "load"

            detected = sup.wait_for("New Ollama model(s) detected")
            freed = sup.wait_for("Freed ComfyUI memory")
            after = comfy_held(client, sim)
            snapshot = sup.status()
        finally:
            code = stop(sup)
    print(
        f"\nreaction (VRAM_CHECK_INTERVAL=1, sim time_scale 0.1): load took "
        f"{loaded - requested:.2f} s; load finished -> detected {detected - loaded:.2f} s, "
        f"-> verified free {freed - loaded:.2f} s; ComfyUI held "
        f"{held / GIB:.1f} GiB -> {after / GIB:.1f} GiB"
    )
    assert code == 0, sup.log()
    assert after < held // 4
    assert "DRY RUN" not in sup.log()
    # The supervisor told which ComfyUI it found, in its log and in /status.
    mode, version = ("dynamic-vram", "0.38.1") if sim.profile == "2026" else ("classic", "0.3.64")
    words = "Dynamic VRAM" if mode == "dynamic-vram" else "classic VRAM"
    assert f"comfyui/comfyui: ComfyUI {version}, {words}" in sup.log()
    [comfy] = snapshot["comfyui"]
    assert (comfy["mode"], comfy["version"], comfy["device_type"]) == (mode, version, "cuda")
    actions = snapshot["recent_actions"]
    assert actions and actions[-1]["action"] == "FreeComfy" and actions[-1]["result"] == "freed"
    assert "docker" not in sup.log().lower()


def test_dry_run_end_to_end_sends_nothing(sim: SimHost) -> None:
    with httpx.Client(timeout=120) as client:
        hold_comfy_vram(client, sim)
        held = comfy_held(client, sim)
        sup = start_supervisor(sim, VRAM_DRY_RUN="true")
        try:
            sup.wait_for("VRAM source: api")
            client.post(f"{sim.ollama_url}/api/generate", json={"model": "llama3.1:8b"})
            sup.wait_for("DRY RUN: would free ComfyUI comfyui")
            assert comfy_held(client, sim) == held
        finally:
            code = stop(sup)
    assert code == 0
    assert "Freed ComfyUI memory" not in sup.log()


def test_gate_makes_room_before_the_load(sim: SimHost) -> None:
    """With VRAM_GATE_PORT, a load sent through the gate finds the room already made: the
    model lands wholly on the GPU instead of spilling next to ComfyUI's models."""
    gate_port = free_port()
    with httpx.Client(timeout=120) as client:
        hold_comfy_vram(client, sim, model_gib=10.0)
        sup = start_supervisor(sim, VRAM_GATE_PORT=str(gate_port), VRAM_GATE_HOST="127.0.0.1")
        try:
            sup.wait_for("VRAM source: api")
            r = client.post(
                f"http://127.0.0.1:{gate_port}/api/generate",
                json={"model": BIG_MODEL[sim.profile]},
            )
            assert r.status_code == 200, r.text
            models = client.get(f"{sim.ollama_url}/api/ps").json()["models"]
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    [model] = models
    assert model["size_vram"] == model["size"], sup.log()  # not spilled
    assert "Freed ComfyUI memory" in sup.log()
