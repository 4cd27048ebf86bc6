"""The gate's room maker (the real Daemon's ComfyRoomMaker, its Actor and LiveProbe, with
fixed URLs and no NVML) against the simulated host, in both generations.

Seen in the soak: the gate asked for room while ComfyUI held only its CUDA context but had
work queued behind a small job, and memory that was not ComfyUI's was on its way back (a
runner Ollama was unloading). The gate judged ComfyUI by "holds nothing", skipped it and
forwarded the load at once; the queued job's checkpoint then took the room during the
load. Now a ComfyUI with work is waited for and freed once idle.

In the 2025 generation (classic: torch's figures are exact) ComfyUI reads as holding
nothing and the test fails without the fix. Under Dynamic VRAM (2026) without NVML the
reading is a device bound that counts the foreign memory as ComfyUI's, so ComfyUI is not
passed over there either way; the case checks the same outcome."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from supervisor.actions import holds_nothing
from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient
from supervisor.config import Settings
from supervisor.daemon import Daemon
from supervisor.sim import SimHost
from supervisor.sim.gpu import GIB

COMFY = "comfyui/comfyui"


@pytest.fixture(params=["2026", "2025"])
def sim(request: pytest.FixtureRequest) -> Iterator[SimHost]:
    with SimHost(gpu_total_gib=24, time_scale=0.05, profile=request.param) as host:
        yield host


def _job(name: str, model_gib: float, seconds: float) -> dict[str, object]:
    inputs = {
        "ckpt_name": name,
        "model_gib": model_gib,
        "workspace_gib": 0.0,
        "seconds": seconds,
        "steps": 1,
    }
    return {"prompt": {"1": {"class_type": "SimJob", "inputs": inputs}}}


def test_a_comfyui_with_queued_work_is_freed_after_it_not_passed_over(sim: SimHost) -> None:
    settings = replace(Settings(), ollama_url=sim.ollama_url, comfyui_url=sim.comfyui_url)
    daemon = Daemon(
        settings,
        ollama_client=lambda url: OllamaClient(url, 5.0),
        comfy_client=lambda url: ComfyClient(url, 5.0),
    )
    try:
        daemon.observe()
        # Memory that is neither ComfyUI's nor listed by Ollama, back in 0.3 s.
        sim.gpu.allocate_partial("outsider", os.getpid(), 10 * GIB)
        back = threading.Timer(0.3, lambda: sim.gpu.release("outsider"))
        with httpx.Client(timeout=10) as client:
            # A small job runs (ComfyUI holds about nothing), an 8 GiB one waits behind it.
            for body in (_job("tiny.safetensors", 0.02, 4.0), _job("big.safetensors", 8.0, 1.0)):
                assert client.post(f"{sim.comfyui_url}/prompt", json=body).status_code == 200
            deadline = time.monotonic() + 5
            while client.get(f"{sim.comfyui_url}/queue").json()["queue_running"] == []:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        need = sim.gpu.free_bytes() + 6 * GIB
        if sim.profile == "2025":  # its torch figures are exact: it reads as holding nothing
            assert holds_nothing(daemon.actor.probe.comfy_reading(COMFY))
        back.start()
        made = daemon.room_maker.make_room(need, reason="gate: load of m", deadline_s=15)
        assert made, "the room was made: ComfyUI freed after its queued job"
        assert sim.gpu.free_bytes() >= need
    finally:
        daemon.close()
