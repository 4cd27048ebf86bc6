"""Job servers of the registry's other kinds on the real engine: a labelled fake A1111
(`sd-webui`, started with `--api`) and a labelled fake InvokeAI (`invokeai`) beside a
labelled fake Ollama, the three sharing one simulated 24 GiB GPU, read by the supervisor
through the fake `libnvidia-ml.so.1` (harness.py starts the sims; the supervisor finds
them by their labels).

A model that Ollama loads frees both while they are idle (A1111's checkpoint unloaded,
InvokeAI's model cache emptied), verified by NVML; while their jobs run they are never
freed, and their jobs finish.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim.nvml_build import STATE_ENV, build_fake_nvml
from tests.integration.harness import Sim, Sims, Supervisor, ollama_load, wait_until

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

StartSupervisor = Callable[..., Supervisor]
MODEL = "qwen2.5:14b"


@pytest.fixture
def nvml_dir(tmp_path: Path) -> Path:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.fail("no C compiler to build the fake libnvidia-ml.so.1 (install gcc)")
    return build_fake_nvml(tmp_path / "nvml").parent


def start_tenants(sims: Sims) -> tuple[Sim, Sim, Sim]:
    ollama = sims.ollama()
    webui = sims.start("sd-webui", extra=("--variant", "a1111", "--api"))
    invoke = sims.start("invokeai")
    return ollama, webui, invoke


def enqueue(invoke: Sim, seconds: float) -> None:
    model = {"key": "sdxl", "name": "sdxl", "base": "sdxl", "type": "main", "sim_gib": 6.0}
    body = {"batch": {"graph": {"nodes": {"m": {"model": model}}}, "sim_seconds": seconds}}
    invoke.post("/api/v1/queue/default/enqueue_batch", body)


def invoke_idle_after(invoke: Sim, completed: int) -> bool:
    status: dict[str, Any] = invoke.get("/api/v1/queue/default/status")
    return bool(
        status["queue"]["completed"] == completed and not status["processor"]["is_processing"]
    )


def supervise(sims: Sims, start_supervisor: StartSupervisor, nvml: Path) -> Supervisor:
    sup = start_supervisor(
        LD_LIBRARY_PATH=str(nvml), **{STATE_ENV: str(sims.state_dir / "gpu.json")}
    )
    sup.wait_for("VRAM source: nvml")
    sup.wait_for("Discovered sd-webui container")
    sup.wait_for("Discovered invokeai container")
    sup.wait_pass()  # Ollama's first read is the baseline: only later models are "new"
    return sup


def test_a_model_load_frees_idle_sd_webui_and_invokeai(
    sims: Sims, start_supervisor: StartSupervisor, nvml_dir: Path
) -> None:
    ollama, webui, invoke = start_tenants(sims)
    enqueue(invoke, seconds=1)
    wait_until(lambda: invoke_idle_after(invoke, 1), 30, "InvokeAI's job")
    assert webui.get("/sim/state")["on_gpu"] is True
    sup = supervise(sims, start_supervisor, nvml_dir)

    ollama_load(ollama, MODEL)
    sup.wait_for(f"New Ollama model(s) detected: {MODEL}")
    freed_webui = sup.wait_for(f"Freed sd-webui/{webui.name}: ")
    freed_invoke = sup.wait_for(f"Freed invokeai/{invoke.name}: ")
    assert "of VRAM came back" in freed_webui.message, freed_webui.message
    assert "of VRAM came back" in freed_invoke.message, freed_invoke.message
    state = webui.get("/sim/state")
    assert state["unloads"] == 1 and state["parked"] is True
    assert invoke.get("/sim/state") == {"cache": {}, "empty_calls": 1, "processing": False}
    assert sup.errors() == [], sup.log()


def test_busy_sd_webui_and_invokeai_are_never_freed_during_their_jobs(
    sims: Sims, start_supervisor: StartSupervisor, nvml_dir: Path
) -> None:
    ollama, webui, invoke = start_tenants(sims)
    sup = supervise(sims, start_supervisor, nvml_dir)
    codes: list[int] = []
    # Sims run at time scale 0.1: 1200 steps take ~12 s, the InvokeAI run 12 s.
    job = threading.Thread(
        target=lambda: codes.append(
            httpx.post(
                f"{webui.url}/sdapi/v1/txt2img", json={"steps": 1200}, timeout=120
            ).status_code
        )
    )
    job.start()
    enqueue(invoke, seconds=120)
    wait_until(lambda: webui.get("/sim/state")["running"], 20, "the A1111 job to start")
    wait_until(
        lambda: invoke.get("/api/v1/queue/default/status")["processor"]["is_processing"],
        20,
        "the InvokeAI run to start",
    )
    mark = sup.mark()
    ollama_load(ollama, MODEL)
    sup.wait_for(f"New Ollama model(s) detected: {MODEL}", since=mark)
    # Every pass while they run sees a new model and (mostly) a GPU over the threshold;
    # each snapshot says at once whether a job runs and whether it was freed.
    while True:
        w, i = webui.get("/sim/state"), invoke.get("/sim/state")
        if w["running"]:
            assert w["unloads"] == 0, sup.log()
        if i["processing"]:
            assert i["empty_calls"] == 0, sup.log()
        if not (w["running"] or i["processing"]):
            break
        sup.wait_pass()
    job.join(timeout=60)
    assert codes == [200]  # A1111's job was never broken by an unload
    assert sup.errors() == [], sup.log()
