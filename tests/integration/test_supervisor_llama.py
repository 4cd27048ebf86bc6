"""llama-swap and llama.cpp's llama-server (router mode) beside ComfyUI, on a real engine.

Real engine, real supervisor process (discovery by the `vram-supervisor.role` label,
NVML through the simulator's fake `libnvidia-ml.so.1`), simulated llama-swap,
llama-server and ComfyUI containers sharing one simulated 24 GiB GPU (harness.py). Each
model of llama-swap and of the router runs as its own child process inside the
container, as the real ones do: the supervisor must attribute those children's VRAM to
the container (NVML PIDs x `docker top`).

What a user notices: while a generation runs, an image job that needs room does not get
the model unloaded under it (the generation completes, the fake counts no request cut
off); once the model is idle, it is unloaded and its VRAM comes back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim.nvml_build import STATE_ENV, build_fake_nvml
from tests.integration.harness import (
    GIB,
    Sim,
    Sims,
    Supervisor,
    comfy_submit,
    wait_until,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

StartSupervisor = Callable[..., Supervisor]
# Each unload the actor refuses (the model serves a request) counts toward the daemon's
# safety limit (6 actions per service a minute): with the harness's 1 s interval a 7 s
# generation would use it up and block the unload once the model is idle. 4 s: two or
# three refusals, then the unload.
MIN_FREE_INTERVAL = {"VRAM_MIN_FREE_INTERVAL": "4"}
BIG = "qwen2.5:14b"  # about 10 GiB with a 4096 context
# At time scale 1 a 14B model makes about 44 tokens a second: 300 tokens are 7 s.
TOKENS = 300
SWAP_CONFIG = {"models": {"big": {"model": BIG, "ctx_size": 4096}}}


@pytest.fixture
def nvml_env(sims: Sims, tmp_path: Path) -> dict[str, str]:
    """Environment that makes the supervisor read the sims' GPU through NVML."""
    lib = build_fake_nvml(tmp_path / "nvml")
    return {"LD_LIBRARY_PATH": str(lib.parent), STATE_ENV: str(sims.state_dir / "gpu.json")}


@pytest.fixture
def real_time_sims(sims: Sims) -> Iterator[Sims]:
    """Sims at time scale 1: a generation lasts seconds, long enough to overlap a pass."""
    sims.time_scale = 1.0
    yield sims


def chat(url: str, model: str, tokens: int) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


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


def server_entry(sup: Supervisor, name: str) -> dict[str, Any] | None:
    return next((s for s in sup.status()["model_servers"] if s["name"] == name), None)


def attributed(sup: Supervisor, name: str, at_least: int) -> dict[str, Any] | None:
    entry = server_entry(sup, name)
    if entry is None or (entry["vram_bytes"] or 0) < at_least:
        return None
    return entry


def yields_only_when_idle(
    sup: Supervisor, server: Sim, comfy: Sim, model: str, in_flight: Callable[[], bool]
) -> tuple[list[object], int]:
    """A long generation in flight, then an image job that needs room: the model must not
    be unloaded until the generation ended, then it is. Returns the generation's outcome
    and the log index where the job was queued."""
    gen, out = in_background(lambda: chat(server.url, model, TOKENS))
    wait_until(in_flight, 20, f"a generation in flight on {server.name}")
    mark = sup.mark()
    comfy_submit(comfy, 10, 300.0)
    sup.wait_for(f"Not unloading model {model} on ", since=mark, timeout_s=20)
    gen.join(60)
    assert out, "the generation did not end"
    sup.wait_for(f"Unloaded model {model} on ", since=mark, timeout_s=30)
    return out, mark


def test_llama_swap_model_unloaded_for_an_image_job_only_when_idle(
    real_time_sims: Sims, start_supervisor: StartSupervisor, nvml_env: dict[str, str]
) -> None:
    sims = real_time_sims
    swap = sims.start("llama-swap", extra=("--config", json.dumps(SWAP_CONFIG)))
    comfy = sims.comfyui()
    assert chat(swap.url, "big", 1).status_code == 200  # started under its own child PID
    sup = start_supervisor(**nvml_env, **MIN_FREE_INTERVAL)
    sup.wait_for("VRAM source: nvml")
    sup.wait_for(f"Discovered llama-swap container {swap.name}")
    # The model's child process holds the VRAM; NVML x docker top gives it to llama-swap.
    entry = wait_until(
        lambda: attributed(sup, swap.name, 9 * GIB), 20, "llama-swap's VRAM in /status"
    )
    assert [m["name"] for m in entry["models"]] == ["big"], entry

    def in_flight() -> bool:
        return any(s["is_processing"] for s in swap.get("/upstream/big/slots"))

    out, mark = yields_only_when_idle(sup, swap, comfy, "big", in_flight)
    [answer] = out
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert answer.json()["usage"]["completion_tokens"] == TOKENS
    assert swap.get("/running") == {"running": []}
    unloaded = sup.find("Unloaded model big on ", since=mark)[0].message
    assert "of VRAM came back" in unloaded, unloaded
    wait_until(
        lambda: (server_entry(sup, swap.name) or {}).get("vram_bytes") in (0, None),
        15,
        "llama-swap's VRAM to be gone from /status",
    )
    assert sup.errors() == [], sup.log()


def test_llama_server_router_model_unloaded_for_an_image_job_only_when_idle(
    real_time_sims: Sims, start_supervisor: StartSupervisor, nvml_env: dict[str, str]
) -> None:
    sims = real_time_sims
    router = sims.start("llama-server", extra=("--models", BIG, "-c", "4096"))
    comfy = sims.comfyui()
    assert chat(router.url, BIG, 1).status_code == 200  # autoloads a child
    sup = start_supervisor(**nvml_env, **MIN_FREE_INTERVAL)
    sup.wait_for("VRAM source: nvml")
    sup.wait_for(f"Discovered llama-server container {router.name}")
    entry = wait_until(
        lambda: attributed(sup, router.name, 9 * GIB), 20, "llama-server's VRAM in /status"
    )
    assert entry["mode"] == "router" and entry["models"][0]["state"] == "loaded", entry

    def in_flight() -> bool:
        slots = router.get(f"/slots?model={BIG}")
        return any(s["is_processing"] for s in slots)

    out, _ = yields_only_when_idle(sup, router, comfy, BIG, in_flight)
    [answer] = out
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert answer.json()["usage"]["completion_tokens"] == TOKENS
    models = {m["id"]: m["status"]["value"] for m in router.get("/models")["data"]}
    assert models[BIG] == "unloaded"
    assert sup.errors() == [], sup.log()
