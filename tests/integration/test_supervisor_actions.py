"""What the supervisor does to real containers: free, heal, restart (and when it must not).

Real engine, real supervisor process, simulated Ollama and ComfyUI containers that share
one simulated 24 GiB GPU through a state file (harness.py). The fake ComfyUI keeps a
finished job's model on the GPU (smart memory), and the fake Ollama places a model once,
at load time, next to whatever else holds VRAM (partial offload is sticky), as the real
ones do (api-facts 1.8, 2.3).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from tests.integration.harness import (
    GIB,
    Sim,
    Sims,
    Supervisor,
    comfy_history,
    comfy_hold_vram,
    comfy_idle,
    comfy_reserved,
    comfy_submit,
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
SMALL_MODEL = "llama3.2:latest"


def healed(model: str) -> re.Pattern[str]:
    return re.compile(rf"^Healed Ollama model {re.escape(model)}: (\d+)% -> (\d+)% on GPU")


def restarted(name: str) -> str:
    return f"Restarted ComfyUI container {name}: "


def fully_on_gpu(ollama: Sim, model: str) -> bool:
    m = ollama_model(ollama, model)
    return m is not None and m["size_vram"] == m["size"]


def test_a_model_load_frees_comfyui_and_the_model_ends_fully_on_the_gpu(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    ollama = sims.ollama()
    comfy = sims.comfyui()
    held = comfy_hold_vram(comfy, 16)
    sup = start_supervisor()
    sup.wait_for(f"Discovered comfyui container {comfy.name}")
    sup.wait_for(f"Discovered ollama container {ollama.name}")
    sup.wait_pass()  # Ollama's first read is the baseline: only later models are "new"

    ollama_load(ollama, BIG_MODEL)
    loaded = ollama_model(ollama, BIG_MODEL)
    assert loaded is not None and loaded["size_vram"] < loaded["size"], loaded  # it spilled

    sup.wait_for(f"New Ollama model(s) detected: {BIG_MODEL}")
    sup.wait_for(freed_on(comfy.name))
    wait_until(lambda: fully_on_gpu(ollama, BIG_MODEL), 30, f"{BIG_MODEL} fully on the GPU")
    model = ollama_model(ollama, BIG_MODEL)
    assert model is not None and model["size_vram"] == model["size"], sup.log()
    assert comfy_reserved(comfy) < held // 4
    assert sup.errors() == [], sup.log()


def test_a_spilled_model_is_healed(sims: Sims, start_supervisor: StartSupervisor) -> None:
    ollama = sims.ollama()
    comfy = sims.comfyui()
    comfy_hold_vram(comfy, 16)
    # The spill happens while no supervisor runs (it was down, or the load raced it).
    ollama_load(ollama, BIG_MODEL)
    spilled = ollama_model(ollama, BIG_MODEL)
    assert spilled is not None and spilled["size_vram"] < spilled["size"], spilled
    before_pct = spilled["size_vram"] * 100 // spilled["size"]

    sup = start_supervisor()
    line = sup.wait_for(healed(BIG_MODEL), timeout_s=40)
    match = healed(BIG_MODEL).search(line.message)
    assert match is not None
    assert int(match.group(1)) <= before_pct + 1 and int(match.group(2)) == 100, line.message
    model = ollama_model(ollama, BIG_MODEL)
    assert model is not None and model["size_vram"] == model["size"], model
    # The room came from ComfyUI (idle, so it may be freed), not from nowhere.
    assert comfy.get("/sim/stats")["frees_handled"] >= 1
    assert sup.find(freed_on(comfy.name)), sup.log()


def pinned_comfy(sims: Sims) -> Sim:
    """A ComfyUI that ignores /free (the case only a restart fixes), restart allowed."""
    comfy = sims.comfyui(restart=True, extra=("--pinned",))
    comfy_hold_vram(comfy, 8)
    return comfy


def test_a_pinned_comfyui_is_restarted_once_not_in_a_loop(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    ollama = sims.ollama()
    comfy = pinned_comfy(sims)
    first_start = comfy.started_at
    # A short restart cooldown: only the supervisor's judgement can stop a restart loop.
    sup = start_supervisor(VRAM_RESTART_COOLDOWN="2")
    sup.wait_for(f"Discovered comfyui container {comfy.name}")
    sup.wait_pass()

    ollama_load(ollama, SMALL_MODEL)
    sup.wait_for(f"New Ollama model(s) detected: {SMALL_MODEL}")
    restart = sup.wait_for(restarted(comfy.name), timeout_s=30)
    wait_until(lambda: comfy.started_at != first_start, 15, f"{comfy.name} to start again")
    comfy.wait_ready()
    restarted_at = comfy.started_at

    # Watch for longer than the cooldown plus three check intervals.
    time.sleep(max(0.0, restart.at + 5.0 - time.monotonic()))
    lines = sup.find(restarted(comfy.name))
    assert len(lines) == 1, "\n".join(r.message for r in lines) + "\n" + sup.log()
    container = comfy.reload()
    assert container.attrs["State"]["StartedAt"] == restarted_at  # no second restart
    assert container.attrs["State"]["Status"] == "running"
    assert container.attrs["RestartCount"] == 0  # restarted by the supervisor, not crashing
    assert comfy_reserved(comfy) == 0  # the restart gave the VRAM back
    sup.wait_service("comfyui", comfy.name, running=True, reachable=True)


def test_a_comfyui_running_a_prompt_is_not_restarted(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    ollama = sims.ollama()
    comfy = pinned_comfy(sims)
    first_start = comfy.started_at
    # A long job (about 8 s real) on the model it already holds.
    prompt_id = comfy_submit(comfy, 8, 80.0)
    wait_until(lambda: not comfy_idle(comfy), 5, "the long job to be queued")
    # Priority "ollama": the supervisor does act on a busy ComfyUI (the free waits for the
    # prompt), so a restart is what it would reach for next if it ignored the prompt.
    sup = start_supervisor(VRAM_PRIORITY="ollama", VRAM_RESTART_COOLDOWN="2")
    sup.wait_for(f"Discovered comfyui container {comfy.name}")
    sup.wait_pass()

    ollama_load(ollama, SMALL_MODEL)
    sup.wait_for(f"New Ollama model(s) detected: {SMALL_MODEL}")
    # The supervisor does send the free while the prompt runs (ComfyUI keeps the flags).
    wait_until(
        lambda: comfy.get("/sim/stats")["frees_requested"] >= 1, 15, "a /free sent to ComfyUI"
    )
    assert comfy_history(comfy, prompt_id) is None, "the long job ended too soon to prove much"
    entry = wait_until(lambda: comfy_history(comfy, prompt_id), 40, "the long job to finish")
    finished = time.monotonic()

    assert entry["status"]["completed"] is True, entry["status"]  # not interrupted, not killed
    assert comfy.get("/sim/stats")["jobs_interrupted"] == 0
    early = [r for r in sup.find(restarted(comfy.name)) if r.at <= finished]
    assert early == [], sup.log()
    assert comfy.started_at == first_start, sup.log()
    assert held_model_gib(comfy) >= 8  # still holding its model: the free never took it


def held_model_gib(comfy: Sim) -> float:
    return float(sum(comfy.get("/sim/stats")["models"].values())) / GIB
