"""What the supervisor does to real containers: free, heal, restart (and when it must not).

Real engine, real supervisor process, simulated Ollama and ComfyUI containers that share
one simulated 24 GiB GPU through a state file (harness.py). The fake ComfyUI keeps a
finished job's model on the GPU (smart memory), and the fake Ollama places a model once,
at load time, next to whatever else holds VRAM (partial offload is sticky), as the real
ones do (api-facts 1.8, 2.3).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.integration.harness import (
    Record,
    Sim,
    Sims,
    Supervisor,
    comfy_held,
    comfy_history,
    comfy_hold_vram,
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
    assert comfy_held(comfy) < held // 4
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
    """A ComfyUI that ignores /free (the case only a restart fixes), restart allowed.
    Classic memory: these sims run without NVML, and a Dynamic VRAM ComfyUI's figure is
    then an estimate from the device, on which the supervisor never restarts anything."""
    comfy = sims.comfyui(restart=True, extra=("--pinned", "--disable-dynamic-vram"))
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
    assert comfy_held(comfy) == 0  # the restart gave the VRAM back
    sup.wait_service("comfyui", comfy.name, running=True, reachable=True)


def test_a_free_sent_during_a_prompt_waits_for_it_then_takes_effect(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    """Priority "ollama" frees a busy ComfyUI: /free only sets flags, the prompt runs to
    its end, and then the memory comes back (api-facts 2.3)."""
    ollama = sims.ollama()
    comfy = sims.comfyui()
    held = comfy_hold_vram(comfy, 16)
    prompt_id = comfy_submit(comfy, 16, 80.0)  # about 8 s on the model it holds
    sup = start_supervisor(VRAM_PRIORITY="ollama")
    sup.wait_for(f"Discovered comfyui container {comfy.name}")
    sup.wait_pass()

    ollama_load(ollama, SMALL_MODEL)
    sup.wait_for(f"New Ollama model(s) detected: {SMALL_MODEL}")
    sup.wait_for(f"ComfyUI {comfy.name} is running a prompt: the soft free takes effect")
    assert comfy.get("/sim/stats")["frees_requested"] >= 1
    assert comfy_history(comfy, prompt_id) is None, "the prompt ended too soon to prove much"
    assert comfy_held(comfy) >= held  # nothing taken from under the prompt

    entry = wait_until(lambda: comfy_history(comfy, prompt_id), 40, "the prompt to finish")
    assert entry["status"]["completed"] is True, entry["status"]
    assert comfy.get("/sim/stats")["jobs_interrupted"] == 0
    wait_until(lambda: comfy_held(comfy) < held // 4, 10, "ComfyUI to let go of its model")
    assert sup.find(restarted(comfy.name)) == [], sup.log()
    assert sup.errors() == [], sup.log()


def kept_after(stage: str, name: str) -> str:
    """The Actor's verdict that a free of an idle ComfyUI released nothing (PINNED)."""
    return f"ComfyUI {name} is idle but kept its VRAM after the {stage} free"


def test_a_comfyui_running_a_prompt_is_not_restarted(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    """A restart is due (pinned, restart allowed, GPU over the aggressive threshold, soft
    and hard frees released nothing), and then a prompt starts with another queued: the
    restart waits for the queue to drain, then happens once.

    The prompts are queued in the instant between the hard free's PINNED verdict and the
    next pass (the supervisor is frozen meanwhile), so the next pass reaches the restart
    itself with the queue busy: only the restart guard stands between it and killing the
    prompt. Queued earlier, the frees would see the prompt (PENDING) and wait instead,
    and the guard would never be asked.
    """
    comfy = pinned_comfy(sims)  # 8 GiB model + workspace + context: about 39 % of 24 GiB
    first_start = comfy.started_at
    key = f"comfyui/{comfy.name}"
    # Thresholds below what ComfyUI holds alone: it must be freed, and as /free does
    # nothing, restarted. Priority "ollama" acts even on a busy ComfyUI, so only the
    # restart guard can hold the restart back. The short cooldown leaves a second restart
    # to the supervisor's judgement alone.
    sup = start_supervisor(
        VRAM_PRIORITY="ollama",
        VRAM_THRESHOLD="25",
        VRAM_AGGRESSIVE_THRESHOLD="30",
        VRAM_RESTART_COOLDOWN="2",
    )
    sup.wait_for(f"Discovered comfyui container {comfy.name}")
    sup.wait_for(kept_after("soft", comfy.name), timeout_s=30)
    verdict = wait_tightly(sup, kept_after("hard", comfy.name), timeout_s=30)
    # The next pass (0.5 s after the verdict) would restart ComfyUI: freeze the supervisor
    # before it, and queue a long prompt (about 8 s) and a short one (2 s) meanwhile.
    with sup.frozen():
        lag = time.time() - logged_at(verdict)
        if lag >= 0.4 or sup.find(restarted(comfy.name)):
            # Reported, not hidden: -ra prints this reason. A lost race teaches nothing
            # about the supervisor (the guard itself is also covered without timing by
            # tests/unit/test_policy_episodes.py and tests/daemon/test_actions.py), and a
            # red run for the test's own timing would be noise.
            pytest.skip(
                f"timing race lost: the test froze the supervisor {lag:.2f} s after its hard "
                "free's verdict, too late to be sure its next pass (0.5 s later) had not "
                "begun; this run says nothing about the supervisor"
            )
        long_id = comfy_submit(comfy, 8, 80.0)
        short_id = comfy_submit(comfy, 8, 20.0)
        queue = comfy.get("/queue")
        assert len(queue["queue_running"]) + len(queue["queue_pending"]) == 2, queue
    since = sup.mark()

    # The next pass reaches the restart and the guard refuses it because of the queue.
    sup.wait_for(refused_for_queue(key), since=since, timeout_s=10)
    # Watch while the long prompt runs: no restart, not even one the Actor had to refuse.
    long = wait_until(
        lambda: comfy_history(comfy, long_id), 40, "the long prompt to finish", pause_s=0.2
    )
    assert long["status"]["completed"] is True, long["status"]  # not interrupted
    # The queued prompt runs now; the supervisor sees it and still holds back.
    sup.wait_for(refused_for_queue(key, "1 running, 0 pending"), since=since, timeout_s=10)
    assert sup.find(restarted(comfy.name)) == [], sup.log()
    assert sup.find(f"Not restarting ComfyUI {key}: a generation", since=since) == [], (
        "the policy asked for a restart while the queue was busy (the Actor refused it)\n"
        + sup.log()
    )
    assert comfy.started_at == first_start, sup.log()

    # The queue drains. The restart due all along follows within a pass and takes the
    # history with it: read how the last prompt ended with the supervisor frozen (it saw
    # the prompt running, so it cannot be restarting ComfyUI at this moment).
    with sup.frozen():
        short = wait_until(
            lambda: comfy_history(comfy, short_id), 20, "the queued prompt to finish"
        )
        stats = comfy.get("/sim/stats")
        drained = time.monotonic()
    assert short["status"]["completed"] is True, short["status"]
    assert (stats["jobs_done"], stats["jobs_interrupted"]) == (3, 0), stats  # + the first job
    restart = sup.wait_for(restarted(comfy.name), since=since, timeout_s=20)
    assert restart.at >= drained, "restarted before the queue drained\n" + sup.log()
    wait_until(lambda: comfy.started_at != first_start, 15, f"{comfy.name} to start again")
    comfy.wait_ready()
    # Longer than the cooldown plus a few passes: still exactly one restart.
    time.sleep(max(0.0, restart.at + 5.0 - time.monotonic()))
    assert len(sup.find(restarted(comfy.name))) == 1, sup.log()
    assert comfy.reload().attrs["RestartCount"] == 0  # the supervisor's restart, no crash


def logged_at(record: Record) -> float:
    """When the supervisor logged this line (Unix time, from its JSON log)."""
    return datetime.fromisoformat(json.loads(record.raw)["time"]).timestamp()


def refused_for_queue(key: str, counts: str = "") -> re.Pattern[str]:
    """The policy's (DEBUG) reason for not restarting a ComfyUI whose queue is busy."""
    return re.compile(
        rf"^Not restarting {re.escape(key)} \(.*\): .*a generation is running or queued"
        + (rf" \({re.escape(counts)}\)" if counts else "")
    )


def wait_tightly(sup: Supervisor, text: str, timeout_s: float) -> Record:
    """Like `Supervisor.wait_for`, polling every 5 ms: the caller races the next pass."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sup.find(text)
        if found:
            return found[0]
        if time.monotonic() > deadline or not sup.is_alive():
            raise AssertionError(f"No log line {text!r} within {timeout_s:g}s:\n{sup.log()}")
        time.sleep(0.005)
