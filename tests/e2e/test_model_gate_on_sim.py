"""End to end without Docker: the real CLI with VRAM_SERVICES and VRAM_MODEL_GATES against
the simulated host with a fake llama-swap beside ComfyUI. An idle ComfyUI holds 10 GiB;
a load sent straight to llama-swap then fits by leaving part of the model on the CPU
(llama-server's --fit), while the same load sent through the gate finds ComfyUI freed
first and lands wholly on the GPU. A model already loaded is forwarded without a free."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.llama_server import FakeLlamaServer, LlamaServerConfig
from supervisor.sim.llama_swap import LlamaSwapConfig, SwapModel
from supervisor.units import GIB
from tests.e2e.test_supervisor_on_sim import (
    comfy_held,
    free_port,
    hold_comfy_vram,
    start_supervisor,
    stop,
)

BIG = "big"  # qwen2.5:32b upstream: about 20 GiB of the 24 GiB card


@pytest.fixture
def sim() -> Iterator[SimHost]:
    config = LlamaSwapConfig(models=(SwapModel(BIG, "qwen2.5:32b"),))
    with SimHost(time_scale=0.1, llama_swap=config) as host:
        yield host


def chat(client: httpx.Client, url: str) -> None:
    body = {"model": BIG, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = client.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_a_load_through_the_gate_finds_comfyui_freed_first(sim: SimHost) -> None:
    swap = sim.fake_llama_swap
    assert swap is not None
    with httpx.Client(timeout=120) as client:
        # Without the gate: ComfyUI's 10 GiB stay, the model is fitted around them.
        hold_comfy_vram(client, sim)
        chat(client, sim.llama_swap_url)
        child = swap.child(BIG)
        assert child is not None and child.offloaded_bytes > 0
        assert client.get(f"{sim.llama_swap_url}/unload").status_code == 200

        gate_port = free_port()
        sup = start_supervisor(
            sim,
            VRAM_SERVICES=f"llama-swap={sim.llama_swap_url}",
            VRAM_MODEL_GATES=f"llama-swap={gate_port}",
            VRAM_GATE_HOST="127.0.0.1",
            VRAM_GATE_WAIT="10",
            VRAM_THRESHOLD="95",
            VRAM_AGGRESSIVE_THRESHOLD="99",
        )
        try:
            sup.wait_for("llama-swap gate listening")
            sup.wait_for("VRAM source: api")
            hold_comfy_vram(client, sim)
            assert comfy_held(client, sim) >= 10 * GIB
            gate = f"http://127.0.0.1:{gate_port}"
            chat(client, gate)
            child = swap.child(BIG)
            assert child is not None and child.offloaded_bytes == 0, sup.log()
            assert comfy_held(client, sim) < 1 * GIB
            sup.wait_for(f"Gate: {BIG} is not loaded on llama-swap/llama-swap; making room first")

            # Loaded now: the next request goes straight on (no second free).
            frees = sup.log().count("making room first")
            started = time.monotonic()
            chat(client, gate)
            assert time.monotonic() - started < 5
            assert sup.log().count("making room first") == frees
            status = sup.status()
            (server,) = status["model_servers"]
            assert server["key"] == "llama-swap/llama-swap" and server["can_unload"] is True
        finally:
            assert stop(sup) == 0, sup.log()


def test_the_image_gate_unloads_an_idle_llama_swap_model_first(sim: SimHost) -> None:
    """An idle llama-swap model (about 20 GiB) holds the card: an image job sent straight
    to ComfyUI runs in low-VRAM mode; the same job through the image gate finds the model
    unloaded first (the actor read that it served no request) and runs on the GPU."""
    from tests.e2e.test_image_gate_on_sim import run_job

    swap = sim.fake_llama_swap
    assert swap is not None
    with httpx.Client(timeout=120) as client:
        chat(client, sim.llama_swap_url)
        assert swap.state(BIG) == "ready"
        direct = run_job(client, sim.comfyui_url, sim)
        assert direct["jobs_lowvram"] == 1
        gate_port = free_port()
        sup = start_supervisor(
            sim,
            VRAM_SERVICES=f"llama-swap={sim.llama_swap_url}",
            VRAM_COMFYUI_GATE_PORT=str(gate_port),
            VRAM_GATE_HOST="127.0.0.1",
            VRAM_GATE_WAIT="10",
            VRAM_THRESHOLD="99",  # only the gate acts here, not the loop's trigger 4
            VRAM_AGGRESSIVE_THRESHOLD="99",
        )
        try:
            sup.wait_for("ComfyUI gate listening")
            sup.wait_for("VRAM source: api")
            gated = run_job(client, f"http://127.0.0.1:{gate_port}", sim)
            assert gated["jobs_lowvram"] == 1, sup.log()  # no new low-VRAM job
            assert swap.state(BIG) == "stopped"
            sup.wait_for(f"Unloaded model {BIG} on llama-swap/llama-swap")
        finally:
            assert stop(sup) == 0, sup.log()


def test_one_gate_port_routes_each_model_to_the_server_that_has_it() -> None:
    """Two llama-server routers behind one gate port (VRAM_SERVICES names both): a load of
    the big model goes to the server that offers it, after ComfyUI was freed, and lands
    wholly on the GPU; the small model's load goes to the other server. Sent to the first
    server alone, the big model would be refused as unknown there."""
    small, big = "llama3.2:latest", "qwen2.5:32b"
    with (
        SimHost(time_scale=0.1, llama_server=LlamaServerConfig(models=(small,))) as sim,
        httpx.Client(timeout=120) as client,
    ):
        second = FakeLlamaServer(
            sim.gpu, sim.catalog, LlamaServerConfig(models=(big,), time_scale=0.1)
        )
        second_server = second.serve()
        first = sim.fake_llama_server
        assert first is not None
        try:
            refused = client.post(
                f"{sim.llama_server_url}/v1/chat/completions",
                json={"model": big, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert refused.status_code >= 400  # the first server does not have it
            gate_port = free_port()
            sup = start_supervisor(
                sim,
                VRAM_SERVICES=(
                    f"llama-server={sim.llama_server_url},llama-server={second_server.url}"
                ),
                VRAM_MODEL_GATES=f"llama-server={gate_port}",
                VRAM_GATE_HOST="127.0.0.1",
                VRAM_GATE_WAIT="10",
                VRAM_THRESHOLD="95",
                VRAM_AGGRESSIVE_THRESHOLD="99",
            )
            try:
                sup.wait_for("llama-server gate listening")
                sup.wait_for("VRAM source: api")
                hold_comfy_vram(client, sim)
                gate = f"http://127.0.0.1:{gate_port}"
                for model in (big, small):
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    answer = client.post(
                        f"{gate}/v1/chat/completions", json={**body, "max_tokens": 4}
                    )
                    assert answer.status_code == 200, answer.text
                big_child, small_child = second.child(big), first.child(small)
                assert big_child is not None and big_child.offloaded_bytes == 0, sup.log()
                assert small_child is not None
                assert first.child(big) is None and second.child(small) is None
                sup.wait_for(f"Gate: {big} is not loaded on llama-server/llama-server-2")
            finally:
                assert stop(sup) == 0, sup.log()
        finally:
            second_server.stop()
            second.close()
