"""End to end without Docker: the real CLI with VRAM_COMFYUI_GATE_PORT against the simulated
host. An idle Ollama model fills the card; an image job sent straight to ComfyUI then runs
in low-VRAM mode (counted by the fake as `jobs_lowvram`, the benchmark's "paged" jobs),
while the same job sent through the image gate finds the model unloaded first and runs
wholly on the GPU. A model serving a request is never unloaded, and under
VRAM_PRIORITY=ollama the gate forwards without unloading anything."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim import SimHost
from tests.e2e.test_supervisor_on_sim import Supervisor, free_port, start_supervisor, stop
from tests.gate.wsclient import WsClient

BIG = "qwen2.5:32b"  # about 20 GiB loaded: leaves about 3.5 GiB of the 24 GiB card
JOB = {
    "prompt": {
        "3": {
            "class_type": "SimJob",
            "inputs": {
                "ckpt_name": "sim-6.safetensors",
                "model_gib": 6.0,
                "workspace_gib": 1.0,
                "seconds": 1.0,
                "steps": 4,
            },
        }
    }
}


@pytest.fixture
def sim() -> Iterator[SimHost]:
    with SimHost(time_scale=0.1) as host:
        yield host


def load_idle(client: httpx.Client, host: SimHost) -> None:
    r = client.post(f"{host.ollama_url}/api/generate", json={"model": BIG, "keep_alive": "1h"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
    assert names(client, host) == [BIG]


def names(client: httpx.Client, host: SimHost) -> list[str]:
    return [m["name"] for m in client.get(f"{host.ollama_url}/api/ps").json()["models"]]


def run_job(
    client: httpx.Client, url: str, host: SimHost, client_id: str | None = None
) -> dict[str, Any]:
    """Submit JOB at `url` and wait for it; the fake ComfyUI's counters after it."""
    before = client.get(f"{host.comfyui_url}/sim/stats").json()["jobs_done"]
    body = {**JOB, "client_id": client_id} if client_id else JOB
    r = client.post(f"{url}/prompt", json=body)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats: dict[str, Any] = client.get(f"{host.comfyui_url}/sim/stats").json()
        if stats["jobs_done"] > before:
            return stats
        time.sleep(0.05)
    raise AssertionError("the image job did not finish")


def start(host: SimHost, **extra: str) -> tuple[Supervisor, int]:
    port = free_port()
    sup = start_supervisor(
        host,
        VRAM_COMFYUI_GATE_PORT=str(port),
        VRAM_GATE_HOST="127.0.0.1",
        VRAM_GATE_WAIT="3",
        **extra,
    )
    sup.wait_for("VRAM source: api")  # the first pass is done (its baseline has the model)
    return sup, port


def test_straight_to_comfyui_the_job_runs_in_low_vram_mode(sim: SimHost) -> None:
    """The problem the image gate is for, as the simulator shows it."""
    with httpx.Client(timeout=60) as client:
        load_idle(client, sim)
        stats = run_job(client, sim.comfyui_url, sim)
    assert stats["jobs_lowvram"] == 1


def test_through_the_gate_the_idle_model_is_unloaded_first(sim: SimHost) -> None:
    with httpx.Client(timeout=60) as client:
        load_idle(client, sim)
        sup, port = start(sim)
        ws = None
        try:
            # The web UI's socket, through the gate, follows the job to its end.
            ws = WsClient(port, "/ws?clientId=ui")
            ws.messages_until(lambda m: m["type"] == "status")
            stats = run_job(client, f"http://127.0.0.1:{port}", sim, client_id="ui")
            events = ws.messages_until(lambda m: m["type"] == "execution_success")
            left = names(client, sim)
            metrics = client.get(f"http://127.0.0.1:{sup.port}/metrics").text
        finally:
            if ws is not None:
                ws.close()
            code = stop(sup)
    assert {"execution_start", "progress", "executed"} <= {m["type"] for m in events}
    assert code == 0, sup.log()
    assert stats["jobs_lowvram"] == 0, sup.log()
    assert left == [], sup.log()
    assert "Gate: making room for a ComfyUI job (sim-6.safetensors)" in sup.log()
    assert f"Unloaded Ollama model {BIG}" in sup.log()
    assert "vram_supervisor_comfyui_gate_prompts_total 1.0" in metrics
    assert "vram_supervisor_comfyui_gate_waits_total 1.0" in metrics
    assert "vram_supervisor_comfyui_gate_websockets_total 1.0" in metrics


def test_a_model_serving_a_request_is_not_unloaded(sim: SimHost) -> None:
    """A generation in flight through the Ollama gate keeps its model: the prompt waits
    VRAM_GATE_WAIT, then goes on (and runs in low-VRAM mode), the generation unharmed."""
    ollama_gate = free_port()
    with httpx.Client(timeout=60) as client:
        load_idle(client, sim)
        sup, port = start(sim, VRAM_GATE_PORT=str(ollama_gate))
        streaming = threading.Event()
        stop_reading = threading.Event()
        chunks: list[bytes] = []

        def generate() -> None:
            body = {"model": BIG, "prompt": "a long story", "options": {"num_predict": 100000}}
            url = f"http://127.0.0.1:{ollama_gate}/api/generate"
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for chunk in r.iter_bytes():
                    chunks.append(chunk)
                    streaming.set()
                    if stop_reading.is_set():
                        return

        reader = threading.Thread(target=generate, daemon=True)
        reader.start()
        try:
            assert streaming.wait(30), sup.log()
            stats = run_job(client, f"http://127.0.0.1:{port}", sim)
            left = names(client, sim)
            n_chunks = len(chunks)
            time.sleep(0.3)
            still_streaming = len(chunks) > n_chunks
        finally:
            stop_reading.set()
            reader.join(10)
            code = stop(sup)
    assert code == 0, sup.log()
    assert left == [BIG], sup.log()
    assert still_streaming
    assert stats["jobs_lowvram"] == 1
    assert f"Gate: not unloading {BIG} for image gate" in sup.log()
    assert "Gate: forwarding the ComfyUI job (sim-6.safetensors) without enough free VRAM" in (
        sup.log()
    )


def test_under_priority_ollama_the_job_is_forwarded_without_unloading(sim: SimHost) -> None:
    with httpx.Client(timeout=60) as client:
        load_idle(client, sim)
        sup, port = start(sim, VRAM_PRIORITY="ollama")
        try:
            stats = run_job(client, f"http://127.0.0.1:{port}", sim)
            left = names(client, sim)
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert left == [BIG], sup.log()
    assert stats["jobs_lowvram"] == 1
    assert "VRAM_PRIORITY=ollama keeps them" in sup.log()
    # Forwarded at once, not after VRAM_GATE_WAIT (3 s).
    assert re.search(r"without enough free VRAM after [0-2]\.\d s", sup.log()), sup.log()


MID = "qwen2.5:14b"  # about 14.9 GiB loaded (context 32768): leaves about 8.6 GiB


def big_job(model_gib: float) -> dict[str, Any]:
    inputs = {**JOB["prompt"]["3"]["inputs"], "ckpt_name": "big.safetensors"}
    inputs["model_gib"] = model_gib
    return {"prompt": {"3": {"class_type": "SimJob", "inputs": inputs}}}


@pytest.mark.parametrize("mounted", [False, True])
def test_a_first_job_is_sized_from_the_models_folder(
    sim: SimHost, tmp_path: Path, mounted: bool
) -> None:
    """A checkpoint the gate has never seen run (8 GiB, plus its workspace) next to an idle
    model that leaves about 8.6 GiB: the 8 GiB default says it fits, and the job runs in
    low-VRAM mode; with ComfyUI's models folder mounted (VRAM_COMFYUI_MODELS) the gate
    reads the file's size, unloads the idle model first, and the job runs wholly on the
    GPU. The benchmark's paged Flux jobs were this case."""
    folder = tmp_path / "models"
    (folder / "checkpoints").mkdir(parents=True)
    with (folder / "checkpoints" / "big.safetensors").open("wb") as f:
        f.truncate(8 * 1024**3)  # sparse: only its size is read
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{sim.ollama_url}/api/generate", json={"model": MID, "keep_alive": "1h"})
        assert r.status_code == 200, r.text
        extra = {"VRAM_COMFYUI_MODELS": str(folder)} if mounted else {}
        sup, port = start(sim, **extra)
        try:
            before = client.get(f"{sim.comfyui_url}/sim/stats").json()["jobs_done"]
            r = client.post(f"http://127.0.0.1:{port}/prompt", json=big_job(8.0))
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            while client.get(f"{sim.comfyui_url}/sim/stats").json()["jobs_done"] == before:
                assert time.monotonic() < deadline, "the image job did not finish"
                time.sleep(0.05)
            stats = client.get(f"{sim.comfyui_url}/sim/stats").json()
            left = names(client, sim)
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    if mounted:
        assert stats["jobs_lowvram"] == 0, sup.log()
        assert left == [], sup.log()
        assert "(its files' sizes)" in sup.log()
    else:  # what the gate did before it read the folder
        assert stats["jobs_lowvram"] == 1, sup.log()
        assert left == [MID], sup.log()


def test_a_model_whose_request_ends_during_the_wait_is_unloaded_then(sim: SimHost) -> None:
    """The model serves a generation when the prompt arrives, and the generation ends a
    second later (well within VRAM_GATE_WAIT, 3 s): the gate looks again, unloads the model
    once it is idle, and the job runs wholly on the GPU instead of starting paged next to
    a model that was idle a moment later (the benchmark's Flux jobs queued behind another
    job met exactly that)."""
    ollama_gate = free_port()
    with httpx.Client(timeout=60) as client:
        load_idle(client, sim)
        sup, port = start(sim, VRAM_GATE_PORT=str(ollama_gate))
        streaming = threading.Event()
        stop_reading = threading.Event()

        def generate() -> None:
            body = {"model": BIG, "prompt": "a story", "options": {"num_predict": 100000}}
            url = f"http://127.0.0.1:{ollama_gate}/api/generate"
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for _chunk in r.iter_bytes():
                    streaming.set()
                    if stop_reading.is_set():
                        return  # the client leaves: the request ends

        reader = threading.Thread(target=generate, daemon=True)
        reader.start()
        try:
            assert streaming.wait(30), sup.log()
            threading.Timer(1.0, stop_reading.set).start()
            started = time.monotonic()
            stats = run_job(client, f"http://127.0.0.1:{port}", sim)
            took = time.monotonic() - started
            left = names(client, sim)
        finally:
            stop_reading.set()
            reader.join(10)
            code = stop(sup)
    assert code == 0, sup.log()
    assert f"Gate: not unloading {BIG} for image gate" in sup.log()
    assert f"Unloaded Ollama model {BIG}" in sup.log()
    assert stats["jobs_lowvram"] == 0, sup.log()
    assert left == [], sup.log()
    assert took < 10
