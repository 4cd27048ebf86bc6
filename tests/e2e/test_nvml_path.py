"""End to end through the NVML path: the real CLI, the real `pynvml` bindings, and the
simulator's fake `libnvidia-ml.so.1` reading the simulated GPU (no GPU, no Docker).

The other end-to-end tests use the API source (ComfyUI /system_stats, Ollama /api/ps). Here
the supervisor finds `libnvidia-ml.so.1` on LD_LIBRARY_PATH, reads device memory through
NVML, logs "VRAM source: nvml", reports the simulated card by its UUID in /status, and
verifies a free by NVML readings.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.nvml_build import STATE_ENV, build_fake_nvml
from tests.e2e.test_supervisor_on_sim import (
    GIB,
    comfy_held,
    hold_comfy_vram,
    start_supervisor,
    stop,
)


@pytest.fixture
def fake_nvml(tmp_path: Path) -> Path:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        message = "no C compiler to build the fake libnvidia-ml.so.1 (install gcc)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return build_fake_nvml(tmp_path / "nvml").parent


@pytest.fixture(params=["2026", "2025"])
def sim_on_file(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SimHost]:
    profile = request.param
    with SimHost(time_scale=0.1, gpu_state=str(tmp_path / "gpu.json"), profile=profile) as host:
        yield host


def test_the_nvml_path_reads_the_card_and_verifies_a_free(
    sim_on_file: SimHost, fake_nvml: Path, tmp_path: Path
) -> None:
    host = sim_on_file
    with httpx.Client(timeout=120) as client:
        hold_comfy_vram(client, host, model_gib=10.0)
        held = comfy_held(client, host)
        sup = start_supervisor(
            host,
            LD_LIBRARY_PATH=str(fake_nvml),
            **{STATE_ENV: str(tmp_path / "gpu.json")},
        )
        try:
            sup.wait_for("VRAM source: nvml")
            gpus = sup.status()["gpus"]
            assert [g["uuid"] for g in gpus] == [host.gpu.uuid]
            assert gpus[0]["total_bytes"] == host.gpu.total_bytes
            used_before = gpus[0]["used_bytes"]
            assert used_before >= 10 * GIB  # ComfyUI's checkpoint, as NVML reports it

            r = client.post(f"{host.ollama_url}/api/generate", json={"model": "llama3.1:8b"})
            assert r.status_code == 200 and r.json()["done_reason"] == "load"
            sup.wait_for("New Ollama model(s) detected")
            sup.wait_for("Freed ComfyUI memory")
            after = comfy_held(client, host)
            # /status shows the latest pass; the one after the free reads the new figure.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                used_after = sup.status()["gpus"][0]["used_bytes"]
                if used_after == host.gpu.used_bytes():
                    break
                time.sleep(0.1)
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert after < held // 4
    # What NVML reports after the free is what the simulated card holds: Ollama's model
    # and ComfyUI's CUDA context, not the 10 GiB checkpoint any more.
    assert used_after == host.gpu.used_bytes() < used_before
    assert "VRAM source: api" not in sup.log()
