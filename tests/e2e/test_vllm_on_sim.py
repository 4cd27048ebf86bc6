"""The real supervisor (`python -m supervisor run`) with a fake vLLM beside a fake ComfyUI
on one simulated 24 GiB GPU, fixed URLs (`VRAM_SERVICES=vllm=...,comfyui=...`), no Docker.

vLLM reserves 60 % of the card whether it serves or not; a ComfyUI job that loads an
8 GiB model takes the GPU over the threshold. The supervisor must put vLLM to sleep for
that job, but never while a request runs there, and when a request arrives for the
sleeping model (the new engine queues it) wake it, with the request answered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.httpbase import SimServer
from supervisor.sim.vllm import FakeVllm, VllmConfig
from supervisor.units import GIB
from tests.e2e.test_supervisor_on_sim import ROOT, Supervisor, free_port, stop

MODEL = "Qwen/Qwen2.5-7B-Instruct"


class World:
    def __init__(self, host: SimHost, vllm: FakeVllm, server: SimServer) -> None:
        self.host = host
        self.vllm = vllm
        self.vllm_url = server.url


@pytest.fixture
def world() -> Iterator[World]:
    with SimHost(time_scale=0.1, start_ollama=False, profile="2026") as host:
        config = VllmConfig(
            model=MODEL,
            gpu_memory_utilization=0.6,
            enable_sleep_mode=True,
            dev_mode=True,
            time_scale=1.0,
            tokens_per_s=100.0,
        )
        vllm = FakeVllm(host.gpu, config, pid=4242)
        server = vllm.serve()
        try:
            yield World(host, vllm, server)
        finally:
            if not vllm.dead.is_set():
                server.stop()
            vllm.close()


def start(world: World) -> Supervisor:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST="unix:///nonexistent/vram-supervisor-e2e.sock",
        VRAM_SERVICES=f"vllm={world.vllm_url},comfyui={world.host.comfyui_url}",
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(port),
        VRAM_CHECK_INTERVAL="1",
        VRAM_MIN_FREE_INTERVAL="1",
        VRAM_VERIFY_TIMEOUT="3",
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
    sup.wait_for("vllm: vLLM (sleep mode); its idle models can be unloaded")
    return sup


def submit_comfy_job(client: httpx.Client, url: str, seconds: float, model_gib: int = 8) -> None:
    job = {
        "prompt": {
            "9": {
                "class_type": "SimJob",
                "inputs": {
                    "ckpt_name": f"sim-{model_gib}.safetensors",
                    "model_gib": model_gib,
                    "workspace_gib": 1,
                    "seconds": seconds,
                    "steps": 4,
                },
            }
        }
    }
    r = client.post(f"{url}/prompt", json=job)
    assert r.status_code == 200, r.text


def comfy_idle(client: httpx.Client, url: str) -> bool:
    return bool(client.get(f"{url}/prompt").json()["exec_info"]["queue_remaining"] == 0)


def complete(url: str, max_tokens: int) -> Callable[[], dict[str, Any]]:
    """Send a completion in a thread; the returned function joins it and gives the answer."""
    out: dict[str, Any] = {}

    def go() -> None:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens}
        try:
            out["answer"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        except httpx.HTTPError as exc:
            out["error"] = repr(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()

    def result() -> dict[str, Any]:
        thread.join(60)
        assert "answer" in out, out
        answer: dict[str, Any] = out["answer"]
        return answer

    return result


def pressed(sup: Supervisor, vllm_busy: bool) -> bool:
    """The supervisor's last pass saw the GPU over the threshold with the ComfyUI job
    running and the vLLM model busy (or idle)."""
    snap = sup.status()
    [gpu], [comfy], [server] = snap["gpus"], snap["comfyui"], snap["model_servers"]
    queue = comfy["queue"] or {}
    return bool(
        gpu["used_percent"] >= 75
        and queue.get("running", 0) >= 1
        and server["models"]
        and server["models"][0]["busy"] is vllm_busy
    )


def two_more_passes(sup: Supervisor) -> None:
    seen = sup.status()["last_pass_wall_time"]
    until(lambda: sup.status()["last_pass_wall_time"] >= seen + 2, "2 more passes", sup)


def until(check: Callable[[], bool], what: str, sup: Supervisor, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log:\n{sup.log()}")
        time.sleep(0.05)


def test_a_comfyui_job_puts_idle_vllm_to_sleep_never_a_busy_one_and_a_request_wakes_it(
    world: World,
) -> None:
    vllm, comfy_url = world.vllm, world.host.comfyui_url
    reserve = vllm.reserve_bytes
    assert reserve == int(24 * GIB * 0.6)
    sup = start(world)
    try:
        with httpx.Client(timeout=30) as client:
            # 1. A request runs on vLLM (15 s) while a ComfyUI job starts and takes the GPU
            # over the threshold: vLLM is not put to sleep while the request runs.
            busy_request = complete(world.vllm_url, 1500)
            until(lambda: vllm.running == 1, "the vLLM request to run", sup)
            submit_comfy_job(client, comfy_url, seconds=250)  # 25 s at time_scale 0.1
            until(lambda: pressed(sup, True), "a pass that saw both at work", sup)
            two_more_passes(sup)
            assert vllm.running == 1, "the request ended too early for this test"
            assert not vllm.sleeping and vllm.sleeps == 0, sup.log()
            answer = busy_request()
            ended = time.monotonic()
            assert answer["choices"][0]["finish_reason"] == "length"  # not cut off

            # 2. Idle now, the job still runs: vLLM is put to sleep, its room given back.
            slept = sup.wait_for(f"Unloaded model {MODEL} on vllm/vllm")
            assert slept > ended - 0.05, sup.log()
            assert vllm.sleeping and vllm.held_bytes() == vllm.context_bytes
            assert vllm.aborted == 0
            until(lambda: comfy_idle(client, comfy_url), "the ComfyUI job to end", sup)

            # 3. A request for the sleeping model waits in vLLM's queue; the supervisor
            # sees it waiting and wakes the model; the request is answered.
            asleep_request = complete(world.vllm_url, 10)
            sup.wait_for(f"Woke model {MODEL} on vllm/vllm")
            answer = asleep_request()
            assert answer["choices"][0]["finish_reason"] == "length"
            assert not vllm.sleeping and vllm.held_bytes() == reserve
            assert not vllm.dead.is_set() and vllm.wakes == 1
            snapshot = sup.status()
    finally:
        code = stop(sup)
    assert code == 0, sup.log()
    [server] = snapshot["model_servers"]
    assert server["kind"] == "vLLM" and server["mode"] == "sleep mode", server
    assert "Traceback" not in sup.log()


def test_a_sleeping_vllm_is_woken_only_when_its_room_is_back(world: World) -> None:
    """A bigger ComfyUI job runs while vLLM sleeps: the card has no room for vLLM's
    reservation, and a wake then would fail inside vLLM (CUDA out of memory, the fake
    dies of it). The request waits in vLLM's queue until the job ends and ComfyUI is
    freed; then vLLM is woken and the request answered."""
    vllm, comfy_url = world.vllm, world.host.comfyui_url
    sup = start(world)
    try:
        with httpx.Client(timeout=30) as client:
            submit_comfy_job(client, comfy_url, seconds=30)  # 3 s: puts vLLM to sleep
            submit_comfy_job(client, comfy_url, seconds=150, model_gib=12)  # then 15 s
            sup.wait_for(f"Unloaded model {MODEL} on vllm/vllm")
            until(
                lambda: world.host.gpu.free_bytes() < vllm.reserve_bytes - vllm.context_bytes,
                "the second job to take vLLM's room",
                sup,
            )
            request = complete(world.vllm_url, 10)
            sup.wait_for(f"Not waking {MODEL} on vllm/vllm yet: its sleep gave back 14.2 GiB")
            assert vllm.sleeping and vllm.waiting == 1 and not vllm.dead.is_set()
            assert not comfy_idle(client, comfy_url)
            woke = sup.wait_for(f"Woke model {MODEL} on vllm/vllm", timeout_s=60)
            answer = request()
            assert answer["choices"][0]["finish_reason"] == "length"
            assert not vllm.dead.is_set() and vllm.held_bytes() == vllm.reserve_bytes
            freed = [at for at, line in sup.lines if "Freed ComfyUI memory" in line]
            assert freed and min(freed) < woke, sup.log()
            assert "Skipping WakeModel" not in sup.log()  # no storm of refused wakes
    finally:
        code = stop(sup)
    assert code == 0, sup.log()


def test_an_old_engine_is_never_put_to_sleep(world: World) -> None:
    """An engine that would crash on a request while asleep is observed only."""
    world.vllm.config.engine = "old"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST="unix:///nonexistent/vram-supervisor-e2e.sock",
        VRAM_SERVICES=f"vllm={world.vllm_url},comfyui={world.host.comfyui_url}",
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(port),
        VRAM_CHECK_INTERVAL="1",
        VRAM_MIN_FREE_INTERVAL="1",
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
    try:
        sup.wait_for("vLLM 0.11.0 crashes on a request while asleep); it has no unload")
        with httpx.Client(timeout=30) as client:
            submit_comfy_job(client, world.host.comfyui_url, seconds=100)
            until(lambda: pressed(sup, False), "a pass that saw the job and the GPU full", sup)
            two_more_passes(sup)
            assert not comfy_idle(client, world.host.comfyui_url)
        assert world.vllm.sleeps == 0 and not world.vllm.dead.is_set()
        assert "Unloaded model" not in sup.log()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
