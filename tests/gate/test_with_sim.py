"""End to end on the simulated GPU host: with ComfyUI holding most of the card, a load
through the gate lands fully on the GPU, while the same load straight to Ollama spills to
the CPU (the problem the gate exists for, api-facts §1.8). The real OllamaClient talks to
the sim's fake Ollama; the RoomMaker here frees the sim's ComfyUI and watches its GPU."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from supervisor.clients.ollama import OllamaClient
from supervisor.gate import Gate
from supervisor.ollama_profile import OllamaProfile, ollama_profile
from supervisor.ports import LoadRoom
from supervisor.sim import SimHost
from supervisor.sim.gpu import GIB

MODEL = "llama3.1:8b"  # about 5.8 GB once loaded at 4k context


class SimComfyRoom:
    """`ports.RoomMaker` for the sim: POST /free to its ComfyUI, then poll the GPU."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.calls: list[int] = []

    def room_for(self, need_bytes: int) -> LoadRoom | None:
        return LoadRoom(self.host.gpu.free_bytes())

    def load_profile(self) -> OllamaProfile | None:
        return ollama_profile(self.host.ollama_config.version, {}, self.host.gpu.total_bytes)

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        self.calls.append(need_bytes)
        httpx.post(
            f"{self.host.comfyui_url}/free",
            json={"unload_models": True, "free_memory": True},
            timeout=5,
        )
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.host.gpu.free_bytes() >= need_bytes:
                return True
            time.sleep(0.01)
        return False


@pytest.fixture
def busy_host() -> Iterator[SimHost]:
    """A 24 GiB card with ComfyUI idle but holding about 19 GiB of models and cache."""
    with SimHost(gpu_total_gib=24, time_scale=0.01) as host:
        inputs = {
            "ckpt_name": "big.safetensors",
            "model_gib": 18.0,
            "workspace_gib": 1.0,
            "seconds": 1.0,
            "steps": 2,
        }
        job = {"prompt": {"1": {"class_type": "SimJob", "inputs": inputs}}}
        with httpx.Client(timeout=10) as client:
            assert client.post(f"{host.comfyui_url}/prompt", json=job).status_code == 200
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                queue = client.get(f"{host.comfyui_url}/prompt").json()
                if queue["exec_info"]["queue_remaining"] == 0:
                    break
                time.sleep(0.01)
        assert host.gpu.free_bytes() < 6 * GIB
        yield host


def _load(url: str) -> None:
    r = httpx.post(
        f"{url}/api/generate",
        json={"model": MODEL, "prompt": "hello", "stream": False},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_through_the_gate_the_model_lands_fully_on_the_gpu(busy_host: SimHost) -> None:
    room = SimComfyRoom(busy_host)
    with OllamaClient(busy_host.ollama_url) as ollama:
        gate = Gate(upstream_url=busy_host.ollama_url, ollama=ollama, room=room, port=0)
        gate.start()
        try:
            _load(f"http://127.0.0.1:{gate.port}")
        finally:
            gate.stop()
        [model] = ollama.ps()

    assert model.name == MODEL
    assert not model.is_spilled, f"{model.gpu_fraction:.0%} on GPU"
    [need] = room.calls
    assert need >= model.size_bytes  # the estimate asked for at least what the load took


def test_straight_to_ollama_the_same_load_spills(busy_host: SimHost) -> None:
    _load(busy_host.ollama_url)

    with OllamaClient(busy_host.ollama_url) as ollama:
        [model] = ollama.ps()
    assert model.is_spilled
