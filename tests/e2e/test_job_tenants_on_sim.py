"""End to end without Docker: the real CLI beside a fake Ollama, a fake A1111 (sd-webui)
and a fake InvokeAI on one file-backed simulated GPU, read through the fake
`libnvidia-ml.so.1`, all given as fixed URLs (`VRAM_SERVICES`).

A model that Ollama loads frees the idle job servers (A1111's checkpoint unloaded, the
InvokeAI cache emptied), verified by NVML; job servers with a running job are never freed
while it runs (their jobs finish; the idle Ollama model is unloaded for them instead);
A1111's weights, parked in CPU RAM by the free, are reloaded once the GPU has room again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from supervisor.sim import SimHost
from supervisor.sim.gpu import FileGpu
from supervisor.sim.invokeai import FakeInvokeAI, InvokeConfig
from supervisor.sim.nvml_build import STATE_ENV
from supervisor.sim.sdwebui import FakeSdWebUI, SdConfig
from tests.e2e.test_nvml_path import fake_nvml  # noqa: F401  (fixture)
from tests.e2e.test_supervisor_on_sim import ROOT, Supervisor, free_port, stop

GIB = 1024**3


@dataclass
class Host:
    sim: SimHost
    webui: FakeSdWebUI
    webui_url: str
    invoke: FakeInvokeAI
    invoke_url: str
    state: Path


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    state = tmp_path / "gpu.json"
    with SimHost(time_scale=0.1, gpu_state=str(state), start_comfyui=False) as sim:
        gpus = [FileGpu(state), FileGpu(state)]
        webui = FakeSdWebUI(gpus[0], SdConfig(variant="a1111", time_scale=1.0))
        invoke = FakeInvokeAI(gpus[1], InvokeConfig(time_scale=1.0, load_seconds=0.2))
        servers = [webui.serve(), invoke.serve()]
        try:
            yield Host(sim, webui, servers[0].url, invoke, servers[1].url, state)
        finally:
            for server in servers:
                server.stop()
            webui.close()
            invoke.close()
            for gpu in gpus:
                gpu.close()


def start(host: Host, nvml: Path) -> Supervisor:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DOCKER_HOST="unix:///nonexistent/vram-supervisor-e2e.sock",
        VRAM_SERVICES=(
            f"ollama={host.sim.ollama_url},sd-webui={host.webui_url},invokeai={host.invoke_url}"
        ),
        VRAM_HTTP_HOST="127.0.0.1",
        VRAM_HTTP_PORT=str(port),
        VRAM_CHECK_INTERVAL="1",
        VRAM_MIN_FREE_INTERVAL="2",
        LD_LIBRARY_PATH=str(nvml),
        **{STATE_ENV: str(host.state)},
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
    return sup


def invoke_job(client: httpx.Client, host: Host, seconds: float) -> None:
    model = {"key": "sdxl", "name": "sdxl", "base": "sdxl", "type": "main", "sim_gib": 6.0}
    body = {"batch": {"graph": {"nodes": {"m": {"model": model}}}, "sim_seconds": seconds}}
    r = client.post(f"{host.invoke_url}/api/v1/queue/default/enqueue_batch", json=body)
    assert r.status_code == 200


def invoke_done(client: httpx.Client, host: Host, n: int) -> bool:
    status = client.get(f"{host.invoke_url}/api/v1/queue/default/status").json()
    return bool(status["queue"]["completed"] == n and not status["processor"]["is_processing"])


def wait(pred: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def load_model(client: httpx.Client, host: Host) -> None:
    r = client.post(f"{host.sim.ollama_url}/api/generate", json={"model": "llama3.1:8b"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load"


def test_a_model_load_frees_idle_job_servers_and_a1111_is_reloaded_later(
    host: Host,
    fake_nvml: Path,  # noqa: F811
) -> None:
    with httpx.Client(timeout=60) as client:
        invoke_job(client, host, seconds=0.1)
        wait(lambda: invoke_done(client, host, 1))
        assert host.webui.on_gpu  # A1111 loads its checkpoint at start
        before = host.sim.gpu.used_bytes()
        sup = start(host, fake_nvml)
        try:
            sup.wait_for("Using sd-webui at")
            sup.wait_for("Using invokeai at")
            # The first pass read Ollama's /api/ps (its baseline) before the load: the load
            # is then a new model (else it may land before that read, and count as there).
            sup.wait_for("VRAM source:")
            load_model(client, host)
            sup.wait_for("New Ollama model(s) detected")
            sup.wait_for("Freed sd-webui/sd-webui")
            sup.wait_for("Freed invokeai/invokeai")
            assert not host.webui.on_gpu and host.webui.parked
            assert host.invoke.empty_calls == 1
            freed = host.sim.gpu.used_bytes()
            # Ollama's model goes (keep_alive 0): room again for A1111's 6.5 GiB.
            r = client.post(
                f"{host.sim.ollama_url}/api/generate",
                json={"model": "llama3.1:8b", "keep_alive": 0},
            )
            assert r.status_code == 200
            sup.wait_for("Reloaded sd-webui/sd-webui's weights to the GPU")
            assert host.webui.on_gpu and not host.webui.parked
            r = client.post(f"{host.webui_url}/sdapi/v1/txt2img", json={"steps": 2})
            assert r.status_code == 200  # its next job works (no device mismatch)
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert freed < before
    assert host.webui.unloads == 1 and host.webui.reloads == 1


def test_busy_job_servers_are_never_freed_while_their_jobs_run(
    host: Host,
    fake_nvml: Path,  # noqa: F811
) -> None:
    results: list[int] = []
    with httpx.Client(timeout=60) as client:
        sup = start(host, fake_nvml)
        try:
            sup.wait_for("Using invokeai at")
            # The first pass read Ollama's /api/ps (its baseline) before the load: the load
            # is then a new model (else it may land before that read, and count as there).
            sup.wait_for("VRAM source:")
            job = threading.Thread(
                target=lambda: results.append(
                    httpx.post(
                        f"{host.webui_url}/sdapi/v1/txt2img", json={"steps": 60}, timeout=60
                    ).status_code
                )
            )
            job.start()
            invoke_job(client, host, seconds=6.0)
            wait(lambda: host.webui.job is not None)
            wait(lambda: host.invoke.queue_status()["processor"]["is_processing"])
            load_model(client, host)
            sup.wait_for("New Ollama model(s) detected")
            # Trigger 4 instead: the GPU is over the threshold and they have work, so the
            # idle Ollama model makes room for them.
            sup.wait_for("Unloaded Ollama model llama3.1:8b")
            # Both jobs run for ~6 s; every pass sees them busy: none may free them.
            while host.webui.job is not None:
                assert host.webui.unloads == 0 and host.invoke.empty_calls == 0
                time.sleep(0.05)
            job.join()
            assert results == [200]  # A1111's job was not broken by an unload
            wait(lambda: invoke_done(client, host, 1))
            time.sleep(3)  # a few more passes, idle and below the threshold now
        finally:
            code = stop(sup)
    assert code == 0, sup.log()
    assert host.webui.unloads == 0 and host.invoke.empty_calls == 0
    assert "Freed sd-webui" not in sup.log() and "Freed invokeai" not in sup.log()
