"""The fake vLLM behaves as tenants.md §3 says: a fixed reservation taken at start (or no
start), sleep routes only in dev mode, level-1 sleep gives back all but the CUDA context,
new engines queue requests while asleep and never wake by themselves, old ones crash."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.sim.gpu import GIB, MemoryGpu, open_gpu
from supervisor.sim.httpbase import SimServer
from supervisor.sim.vllm import FakeVllm, VllmConfig, VllmStartError

ROOT = Path(__file__).resolve().parents[2]
MODEL = "Qwen/Qwen2.5-7B-Instruct"
Start = Callable[..., tuple[FakeVllm, str]]


@pytest.fixture
def start() -> Iterator[Start]:
    running: list[tuple[SimServer, FakeVllm]] = []

    def _start(gpu: MemoryGpu | None = None, **config: Any) -> tuple[FakeVllm, str]:
        options = {"enable_sleep_mode": True, "dev_mode": True, "time_scale": 0.05, **config}
        fake = FakeVllm(gpu or MemoryGpu(24 * GIB), VllmConfig(**options))
        server = fake.serve()
        running.append((server, fake))
        return fake, server.url

    yield _start
    for server, fake in running:
        if not fake.dead.is_set():
            server.stop()
        fake.close()


def complete(url: str, max_tokens: int = 4, timeout_s: float = 30) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(
        f"{url}/v1/chat/completions", json={**body, "max_tokens": max_tokens}, timeout=timeout_s
    )


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["value"] = fn()
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def metric(url: str, name: str) -> dict[str, float]:
    """Each sample of `name` in /metrics, by its sleep_state label (or "" without one)."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            state = labels.split('sleep_state="')[1].rstrip('"') if "sleep_state" in labels else ""
            out[state] = float(value)
    return out


def test_it_takes_its_share_of_the_gpu_and_refuses_to_start_without_it(start: Start) -> None:
    gpu = MemoryGpu(24 * GIB)
    fake, _ = start(gpu, gpu_memory_utilization=0.5)
    assert fake.held_bytes() == 12 * GIB
    gpu.allocate("other", 1, 2 * GIB)  # 10 GiB free now: 0.5 x 24 = 12 GiB do not fit
    with pytest.raises(VllmStartError) as info:
        FakeVllm(gpu, VllmConfig(model="other/model", gpu_memory_utilization=0.5))
    assert str(info.value) == (
        "ValueError: Free memory on device (10.00/24.00 GiB) on startup is less than desired "
        "GPU memory utilization (0.5, 12.00 GiB). Decrease GPU memory utilization or reduce "
        "GPU memory used by other processes."
    )
    assert gpu.used_bytes() == 14 * GIB  # the failed start took nothing


def test_level_one_sleep_keeps_only_the_context_and_the_wake_takes_it_back(
    start: Start,
) -> None:
    gpu = MemoryGpu(24 * GIB)
    fake, url = start(gpu)
    reserve = fake.reserve_bytes
    assert metric(url, "vllm:engine_sleep_state") == {
        "awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0,
    }  # fmt: skip
    r = httpx.post(f"{url}/sleep?level=1")
    assert (r.status_code, r.content) == (200, b"")
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
    assert fake.held_bytes() == int(reserve * 0.014)
    assert gpu.free_bytes() == 24 * GIB - int(reserve * 0.014)
    assert metric(url, "vllm:engine_sleep_state")["weights_offloaded"] == 1.0
    # Health, models and metrics keep answering while asleep.
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
    r = httpx.post(f"{url}/wake_up")
    assert (r.status_code, r.content) == (200, b"")
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
    assert fake.held_bytes() == reserve


def test_the_sleep_routes_need_dev_mode_and_sleep_mode(start: Start) -> None:
    _, url = start(dev_mode=False)
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
        r = httpx.request(method, f"{url}{path}")
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"}), path
    fake, url = start(enable_sleep_mode=False)
    r = httpx.post(f"{url}/sleep?level=1")
    assert r.status_code == 500 and "Sleep mode is not enabled" in r.text
    assert fake.held_bytes() == fake.reserve_bytes


def test_a_new_engine_queues_a_request_while_asleep_and_never_wakes_by_itself(
    start: Start,
) -> None:
    fake, url = start()
    httpx.post(f"{url}/sleep?level=1")
    thread, out = in_thread(lambda: complete(url))
    until(lambda: fake.waiting == 1, "the request to be queued")
    time.sleep(0.3)
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
    assert metric(url, "vllm:num_requests_waiting") == {"": 1.0}
    assert thread.is_alive()
    httpx.post(f"{url}/wake_up")
    thread.join(10)
    answer = out["value"].json()
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL
    assert answer["choices"][0]["finish_reason"] == "length"
    assert fake.done == 1 and fake.waiting == 0


def test_an_old_engine_crashes_on_a_request_while_asleep(start: Start) -> None:
    gpu = MemoryGpu(24 * GIB)
    fake, url = start(gpu, engine="old")
    assert httpx.get(f"{url}/version").json() == {"version": "0.11.0"}
    httpx.post(f"{url}/sleep?level=1")
    r = complete(url)
    assert r.status_code == 500 and "illegal memory access" in r.text
    until(lambda: fake.dead.is_set(), "the engine to die")
    assert gpu.used_bytes() == 0  # the process is gone, and so is its memory
    until(lambda: not answers(url), "the server to stop")


def answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_an_old_engine_crashes_when_put_to_sleep_during_a_request(start: Start) -> None:
    fake, url = start(engine="old", time_scale=1.0, tokens_per_s=10.0)
    thread, out = in_thread(lambda: complete(url, max_tokens=40))  # 4 s
    until(lambda: fake.running == 1, "a running request")
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{url}/sleep?level=1", timeout=5)
    assert fake.dead.is_set() and "illegal memory access" in (fake.death or "")
    thread.join(10)
    assert "error" in out  # the request was lost with the process


@pytest.mark.parametrize(("mode", "finish"), [("abort", "abort"), ("wait", "length")])
def test_sleep_modes_on_a_running_request(start: Start, mode: str, finish: str) -> None:
    fake, url = start(time_scale=1.0, tokens_per_s=20.0)
    thread, out = in_thread(lambda: complete(url, max_tokens=60))  # 3 s
    until(lambda: fake.running == 1, "a running request")
    query = "level=1" if mode == "abort" else f"level=1&mode={mode}"  # abort: the default
    assert httpx.post(f"{url}/sleep?{query}", timeout=10).status_code == 200
    thread.join(10)
    assert out["value"].json()["choices"][0]["finish_reason"] == finish
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}


def test_a_wake_without_room_is_an_out_of_memory_death(start: Start) -> None:
    gpu = MemoryGpu(24 * GIB)
    fake, url = start(gpu)
    httpx.post(f"{url}/sleep?level=1")
    gpu.allocate("comfyui", 2, 10 * GIB)  # someone took the room meanwhile
    r = httpx.post(f"{url}/wake_up")
    assert r.status_code == 500 and "CUDA out of memory" in r.json()["error"]["message"]
    assert fake.dead.is_set()
    assert gpu.used_bytes() == 10 * GIB


def test_a_wrong_model_name_is_404(start: Start) -> None:
    _, url = start()
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.sim", "vllm", "--gpu-state",
         str(tmp_path / "gpu.json"), "--gpu-total-gib", "24", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_the_process_mode_fails_to_start_without_room_and_exits_on_a_crash(
    tmp_path: Path,
) -> None:
    gpu = open_gpu(tmp_path / "gpu.json", 24 * GIB)
    try:
        gpu.allocate("comfyui", os.getpid(), 8 * GIB)
        proc = sim_process(tmp_path, "--port", "0")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1
        assert "Free memory on device (16.00/24.00 GiB) on startup is less than desired" in err
        gpu.release("comfyui")
        port = free_port()
        proc = sim_process(
            tmp_path, "--port", str(port), "--enable-sleep-mode", "--engine", "old",
            "--time-scale", "0.05", env={"VLLM_SERVER_DEV_MODE": "1"},
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            until(lambda: answers(url), "the fake vLLM to answer", 20)
            assert gpu.used_bytes() == int(24 * GIB * 0.9)
            assert httpx.post(f"{url}/sleep?level=1").status_code == 200
            assert complete(url).status_code == 500
            assert proc.wait(timeout=20) == 1
            assert gpu.used_bytes() == 0
        finally:
            proc.kill()
            proc.communicate()
    finally:
        gpu.close()
