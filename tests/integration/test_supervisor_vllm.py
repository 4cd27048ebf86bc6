"""A labelled vLLM container beside a labelled ComfyUI on the real engine.

Simulated vLLM (`python -m supervisor.sim vllm`, the new engine, sleep mode on with
`VLLM_SERVER_DEV_MODE=1`) and ComfyUI containers share one simulated 24 GiB GPU through
a state file (harness.py). vLLM reserves 60 % of the card at start and holds it; a
ComfyUI job takes the GPU over the threshold. The supervisor discovers the vLLM by its
label, puts it to sleep for the job (never while a request runs there, and nothing is
aborted), and wakes it when a request waits for it; the request is answered, the vLLM
container never dies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.harness import (
    GIB,
    Sim,
    Sims,
    Supervisor,
    comfy_idle,
    comfy_submit,
    wait_until,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

StartSupervisor = Callable[..., Supervisor]
MODEL = "Qwen/Qwen2.5-7B-Instruct"
# 10 tokens/s of simulated time, at the harness's time scale 0.1: 100 tokens a second.
VLLM_OPTIONS = (
    "--enable-sleep-mode", "--gpu-memory-utilization", "0.6", "--model", MODEL,
    "--tokens-per-s", "10",
)  # fmt: skip


def start_vllm(sims: Sims) -> Sim:
    return sims.start("vllm", extra=VLLM_OPTIONS, environment={"VLLM_SERVER_DEV_MODE": "1"})


def stats(vllm: Sim) -> dict[str, Any]:
    data: dict[str, Any] = vllm.get("/sim/stats")
    return data


def complete(vllm: Sim, max_tokens: int) -> Callable[[], dict[str, Any]]:
    """A completion in a thread; the returned function joins it and gives the answer."""
    out: dict[str, Any] = {}

    def go() -> None:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens}
        try:
            out["answer"] = httpx.post(f"{vllm.url}/v1/completions", json=body, timeout=90).json()
        except httpx.HTTPError as exc:
            out["error"] = repr(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()

    def result() -> dict[str, Any]:
        thread.join(90)
        assert "answer" in out, out
        answer: dict[str, Any] = out["answer"]
        return answer

    return result


def pressed_while_busy(sup: Supervisor) -> bool:
    """The last pass saw the GPU over the threshold, ComfyUI's job running and the vLLM
    model serving a request."""
    snap = sup.status()
    servers = [s for s in snap["model_servers"] if s["role"] == "vllm"]
    comfys = snap["comfyui"]
    return bool(
        snap["gpus"]
        and max(g["used_percent"] for g in snap["gpus"]) >= 75
        and any((c["queue"] or {}).get("running", 0) >= 1 for c in comfys)
        and servers
        and servers[0]["models"]
        and servers[0]["models"][0]["busy"] is True
    )


def test_vllm_sleeps_for_a_comfyui_job_never_while_busy_and_wakes_for_a_request(
    sims: Sims, start_supervisor: StartSupervisor
) -> None:
    vllm = start_vllm(sims)
    comfy = sims.comfyui()
    reserve = stats(vllm)["reserve"]
    assert reserve == int(24 * GIB * 0.6)
    sup = start_supervisor()
    sup.wait_for(f"Discovered vllm container {vllm.name}")
    sup.wait_for(f"{vllm.name}: vLLM (sleep mode); its idle models can be unloaded")
    key = f"vllm/{vllm.name}"

    # 1. A request runs (15 s) while a ComfyUI job takes the GPU over the threshold.
    busy_request = complete(vllm, 1500)
    wait_until(lambda: stats(vllm)["running"] == 1, 10, "the vLLM request to run")
    comfy_submit(comfy, model_gib=8, seconds=300)  # 30 s at the harness's time scale
    wait_until(lambda: pressed_while_busy(sup), 30, "a pass that saw both at work")
    sup.wait_passes(2)
    assert stats(vllm)["running"] == 1, "the request ended too early for this test"
    assert stats(vllm)["sleeps"] == 0, sup.log()
    answer = busy_request()
    ended = time.monotonic()
    assert answer["choices"][0]["finish_reason"] == "length"  # not cut off

    # 2. Idle, the job still running: put to sleep, its room given back.
    slept = sup.wait_for(f"Unloaded model {MODEL} on {key}", timeout_s=30)
    assert slept.at > ended - 0.1, sup.log()
    after = stats(vllm)
    assert after["sleeping"] and after["aborted"] == 0
    assert after["held"] < reserve // 50
    wait_until(lambda: comfy_idle(comfy), 60, "the ComfyUI job to end")

    # 3. A request for the sleeping model waits in vLLM's queue; the supervisor wakes it.
    asleep_request = complete(vllm, 20)
    sup.wait_for(f"Woke model {MODEL} on {key}", timeout_s=30)
    answer = asleep_request()
    assert answer["choices"][0]["finish_reason"] == "length"
    final = stats(vllm)
    assert not final["sleeping"] and final["held"] == reserve and final["death"] is None
    assert final["wakes"] == 1 and final["aborted"] == 0
    assert vllm.state() == "running"
    assert sup.errors() == [], sup.log()
