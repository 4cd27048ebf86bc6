"""End to end without Docker: the real CLI (`python -m supervisor run`) with fixed URLs
(`VRAM_SERVICES`) beside the simulator's llama-swap, llama.cpp llama-server (router mode)
and ComfyUI (and Ollama) on one simulated 24 GiB GPU.

What a user of such a host notices:
- an image job that needs room makes the supervisor unload an idle model of llama-swap or
  of the router: its VRAM comes back, `status --json` no longer lists it;
- a generation in flight through llama-swap or the router is never cut off for it (the
  fakes count cut-off requests; they stay 0);
- a model that starts loading in llama-swap frees an idle ComfyUI;
- with Ollama too, both model servers yield for an image job, Ollama first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.llama_server import LlamaServerConfig
from supervisor.sim.llama_swap import parse_swap_config
from tests.e2e.test_supervisor_on_sim import (
    ROOT,
    Supervisor,
    comfy_held,
    free_port,
    hold_comfy_vram,
    stop,
)

GIB = 1024**3
BIG = "qwen2.5:14b"  # about 10 GiB with a 4096 context
SWAP_MODELS = {"big": {"model": BIG, "ctx_size": 4096}, "small": {"model": "llama3.2:latest"}}


def swap_host(**extra: Any) -> SimHost:
    config = parse_swap_config({"models": SWAP_MODELS})
    for key, value in extra.items():
        setattr(config, key, value)
    return SimHost(time_scale=0.1, start_ollama=False, llama_swap=config)


def router_host(**extra: Any) -> SimHost:
    config = LlamaServerConfig(models=(BIG, "llama3.2:latest"), ctx_size=4096, **extra)
    return SimHost(time_scale=0.1, start_ollama=False, llama_server=config)


@dataclass
class FixedUrlSupervisor(Supervisor):
    env: dict[str, str] = field(default_factory=dict)  # what it runs with, for `status`


def start(services: str, **extra: str) -> FixedUrlSupervisor:
    """The real CLI with only fixed URLs (no Docker), once its first pass is done."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST="unix:///nonexistent/vram-supervisor-e2e.sock",
        VRAM_SERVICES=services,
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(port),
        VRAM_CHECK_INTERVAL="1",
        **{"VRAM_MIN_FREE_INTERVAL": "4", **extra},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sup = FixedUrlSupervisor(proc, port, env=env)
    threading.Thread(target=sup.follow, daemon=True).start()
    sup.wait_for("VRAM source: api")
    return sup


def status_json(sup: FixedUrlSupervisor) -> dict[str, Any]:
    """`vram-supervisor status --json`, as a user runs it beside the running supervisor."""
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", "--json"],
        cwd=ROOT,
        env=sup.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def server_models(snapshot: dict[str, Any], role: str) -> dict[str, str]:
    [server] = [s for s in snapshot["model_servers"] if s["role"] == role]
    return {m["name"]: m["state"] for m in server["models"] or ()}


def image_job(client: httpx.Client, host: SimHost, seconds: float = 100.0) -> None:
    """Queue an image job that needs 11 GiB (a 10 GiB checkpoint and its workspace) and
    runs `seconds` simulated seconds: with a model server's 10 GiB and more on the 24 GiB
    card it pushes the GPU over the threshold while it has work."""
    job = {
        "prompt": {
            "9": {
                "class_type": "SimJob",
                "inputs": {
                    "ckpt_name": "sim-10.safetensors",
                    "model_gib": 10.0,
                    "workspace_gib": 1.0,
                    "seconds": seconds,
                    "steps": 10,
                },
            }
        }
    }
    r = client.post(f"{host.comfyui_url}/prompt", json=job)
    assert r.status_code == 200, r.text


def chat(url: str, model: str, tokens: int, timeout_s: float = 120.0) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    with httpx.Client(timeout=timeout_s) as c:
        return c.post(f"{url}/v1/chat/completions", json=body)


def in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except httpx.HTTPError as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait(predicate: Callable[[], object], timeout_s: float, what: str, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; log:\n{sup.log()}")


def held_by(host: SimHost, pid: int) -> int:
    return dict(host.gpu.processes()).get(pid, 0)


@pytest.fixture
def swap_sim() -> Iterator[SimHost]:
    with swap_host(token_s=1.0) as host:  # 0.1 s real a token
        yield host


@pytest.fixture
def router_sim() -> Iterator[SimHost]:
    with router_host(token_s=1.0) as host:
        yield host


# --------------------------------------------------------------------------- llama-swap


def test_an_image_job_unloads_an_idle_llama_swap_model(swap_sim: SimHost) -> None:
    host = swap_sim
    fake = host.fake_llama_swap
    assert fake is not None
    assert chat(host.llama_swap_url, "big", 1).status_code == 200
    child = fake.child("big")
    assert child is not None
    held = held_by(host, child.pid)
    assert held >= 9 * GIB
    sup = start(f"llama-swap={host.llama_swap_url},comfyui={host.comfyui_url}")
    try:
        assert server_models(status_json(sup), "llama-swap") == {"big": "ready"}
        with httpx.Client(timeout=30) as client:
            image_job(client, host)
        sup.wait_for("Unloaded model big on llama-swap/llama-swap", timeout_s=30)
        assert fake.state("big") == "stopped" and held_by(host, child.pid) == 0
        wait(
            lambda: server_models(status_json(sup), "llama-swap") == {},
            15,
            "status to show the model gone",
            sup,
        )
        actions = sup.status()["recent_actions"]
    finally:
        code = stop(sup)
    assert code == 0, sup.log()
    [unload] = [a for a in actions if a["action"] == "UnloadModel"]
    assert unload["ok"] and unload["model"] == "big", actions
    # Verified by the free VRAM read before and after: the model's share came back.
    assert unload["after_bytes"] - unload["before_bytes"] >= held - GIB // 2, actions
    assert child.stats.cut_off == 0


def test_a_generation_through_llama_swap_is_never_cut_off(swap_sim: SimHost) -> None:
    host = swap_sim
    fake = host.fake_llama_swap
    assert fake is not None
    assert chat(host.llama_swap_url, "big", 1).status_code == 200
    sup = start(f"llama-swap={host.llama_swap_url},comfyui={host.comfyui_url}")
    try:
        # 120 tokens at 0.1 s real each: 12 s in flight, several supervisor passes.
        gen, out = in_background(lambda: chat(host.llama_swap_url, "big", 120))
        wait(lambda: fake.inflight("big") == 1, 10, "the generation in flight", sup)
        with httpx.Client(timeout=30) as client:
            image_job(client, host, seconds=300.0)
        sup.wait_for(
            "Not unloading model big on llama-swap/llama-swap: it is serving a request", 30
        )
        child = fake.child("big")
        gen.join(60)
        # Once the generation ended the model is idle, and the job still runs: unloaded.
        sup.wait_for("Unloaded model big on llama-swap/llama-swap", timeout_s=30)
    finally:
        code = stop(sup)
    assert code == 0, sup.log()
    [answer] = out
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert answer.json()["usage"]["completion_tokens"] == 120
    assert child is not None and child.stats.cut_off == 0
    log = sup.log()
    assert log.index("Not unloading model big") < log.index("Unloaded model big")


def test_a_llama_swap_model_that_starts_loading_frees_an_idle_comfyui() -> None:
    with swap_host(load_base_s=20.0) as host, httpx.Client(timeout=60) as client:  # 2 s
        hold_comfy_vram(client, host, model_gib=10.0)
        held = comfy_held(client, host)
        assert held >= 10 * GIB
        sup = start(f"llama-swap={host.llama_swap_url},comfyui={host.comfyui_url}")
        try:
            gen, out = in_background(lambda: chat(host.llama_swap_url, "big", 1))
            sup.wait_for("New llama-swap model(s) detected: big", timeout_s=20)
            sup.wait_for("Freed ComfyUI memory", timeout_s=20)
            gen.join(60)
            after = comfy_held(client, host)
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert after < held // 4
    [answer] = out
    assert isinstance(answer, httpx.Response) and answer.status_code == 200


# --------------------------------------------------------------------------- llama-server


def test_an_image_job_unloads_an_idle_router_model_never_a_busy_one(
    router_sim: SimHost,
) -> None:
    host = router_sim
    fake = host.fake_llama_server
    assert fake is not None
    url = host.llama_server_url
    assert chat(url, BIG, 1).status_code == 200  # autoloads
    child = fake.children()[BIG]
    held = held_by(host, child.pid)
    assert held >= 9 * GIB
    sup = start(f"llama-server={url},comfyui={host.comfyui_url}")
    try:
        assert server_models(status_json(sup), "llama-server")[BIG] == "loaded"
        gen, out = in_background(lambda: chat(url, BIG, 120))
        wait(lambda: child.inflight == 1, 10, "the generation in flight", sup)
        with httpx.Client(timeout=30) as client:
            image_job(client, host, seconds=300.0)
        sup.wait_for(
            f"Not unloading model {BIG} on llama-server/llama-server: it is serving a request", 30
        )
        gen.join(60)
        sup.wait_for(f"Unloaded model {BIG} on llama-server/llama-server", timeout_s=30)
        # The router unloads asynchronously: the child has exited when it is verified.
        assert held_by(host, child.pid) == 0
        wait(
            lambda: server_models(status_json(sup), "llama-server")[BIG] == "unloaded",
            15,
            "status to show the model unloaded",
            sup,
        )
    finally:
        code = stop(sup)
    assert code == 0, sup.log()
    [answer] = out
    assert isinstance(answer, httpx.Response) and answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 120
    assert child.stats.cut_off == 0


# --------------------------------------------------------------------------- mixed host


def test_ollama_and_llama_swap_both_yield_for_an_image_job_ollama_first() -> None:
    config = parse_swap_config({"models": SWAP_MODELS})
    with (
        SimHost(time_scale=0.1, llama_swap=config) as host,
        httpx.Client(timeout=60) as client,
    ):
        r = client.post(
            f"{host.ollama_url}/api/generate",
            json={"model": "llama3.1:8b", "keep_alive": "1h", "options": {"num_ctx": 4096}},
        )
        assert r.status_code == 200, r.text
        assert chat(host.llama_swap_url, "big", 1).status_code == 200
        fake = host.fake_llama_swap
        assert fake is not None
        # With the Ollama gate on: without it, Ollama's idle models stay loaded for a
        # Dynamic VRAM ComfyUI's job (trigger 4, `pages_rather_than_spill`).
        sup = start(
            f"ollama={host.ollama_url},llama-swap={host.llama_swap_url},comfyui={host.comfyui_url}",
            VRAM_GATE_PORT=str(free_port()),
            VRAM_GATE_HOST="127.0.0.1",
        )
        try:
            snapshot = status_json(sup)
            assert [o["models"][0]["name"] for o in snapshot["ollama"]] == ["llama3.1:8b"]
            assert server_models(snapshot, "llama-swap") == {"big": "ready"}
            image_job(client, host, seconds=300.0)
            sup.wait_for("Unloaded Ollama model llama3.1:8b", timeout_s=30)
            sup.wait_for("Unloaded model big on llama-swap/llama-swap", timeout_s=30)
            ps = client.get(f"{host.ollama_url}/api/ps").json()["models"]
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert ps == [] and fake.state("big") == "stopped"
    log = sup.log()
    assert log.index("Unloaded Ollama model llama3.1:8b") < log.index("Unloaded model big")


def test_refused_unloads_do_not_hold_back_the_unload_once_the_model_is_idle(
    swap_sim: SimHost,
) -> None:
    host = swap_sim
    fake = host.fake_llama_swap
    assert fake is not None
    assert chat(host.llama_swap_url, "big", 1).status_code == 200
    sup = start(
        f"llama-swap={host.llama_swap_url},comfyui={host.comfyui_url}",
        VRAM_MIN_FREE_INTERVAL="1",
    )
    try:
        gen, out = in_background(lambda: chat(host.llama_swap_url, "big", 100))  # 10 s
        wait(lambda: fake.inflight("big") == 1, 10, "the generation in flight", sup)
        with httpx.Client(timeout=30) as client:
            image_job(client, host, seconds=600.0)
        gen.join(60)
        ended = time.monotonic()
        # Idle now, the job still short of room: unloaded within a few passes.
        unloaded = sup.wait_for("Unloaded model big on llama-swap/llama-swap", timeout_s=20)
    finally:
        code = stop(sup)
    assert code == 0
    assert out and isinstance(out[0], httpx.Response) and out[0].status_code == 200
    assert unloaded - ended < 10
