"""`python -m supervisor.sim` as a container would run it: separate processes, one GPU file."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from supervisor.sim.__main__ import healthcheck
from supervisor.sim.gpu import FileGpu

REPO = Path(__file__).parents[2]
WaitUntil = Callable[..., None]


class SimProcess:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.sim", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.urls: dict[str, str] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if found := re.search(
                r"fake (Ollama|ComfyUI|llama-server|llama-swap) listening on (\S+)", line
            ):
                self.urls[found.group(1)] = found.group(2)
            if line.startswith("sim: GPU "):
                return
        raise AssertionError(f"sim exited early with {self.proc.wait()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spawn() -> Iterator[Callable[..., SimProcess]]:
    procs: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        procs.append(SimProcess(*args))
        return procs[-1]

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.kill()


def test_all_mode_serves_both_on_loopback_and_stops_on_sigterm(
    spawn: Callable[..., SimProcess],
) -> None:
    sim = spawn("all", "--ollama-port", "0", "--comfyui-port", "0", "--time-scale", "0.01")
    ollama, comfy = sim.urls["Ollama"], sim.urls["ComfyUI"]
    assert ollama.startswith("http://127.0.0.1:") and comfy.startswith("http://127.0.0.1:")
    assert healthcheck(ollama, 3) == 0
    assert healthcheck(f"{comfy}/system_stats", 3) == 0
    assert sim.stop() == 0  # docker stop sends SIGTERM; the sim must not need a SIGKILL
    assert healthcheck(ollama, 1) == 1


def test_healthcheck_subcommand_exit_codes(spawn: Callable[..., SimProcess]) -> None:
    sim = spawn("ollama", "--port", "0")
    url = sim.urls["Ollama"]
    check = [sys.executable, "-m", "supervisor.sim", "healthcheck"]
    assert subprocess.run([*check, url], cwd=REPO).returncode == 0
    missing = subprocess.run([*check, f"{url}/nope"], cwd=REPO, capture_output=True)
    assert missing.returncode == 1


def test_two_processes_sharing_a_gpu_file_see_each_other(
    spawn: Callable[..., SimProcess], tmp_path: Path, wait_until: WaitUntil
) -> None:
    state = str(tmp_path / "gpu.json")
    # 2025: Ollama's memory shows under its own PID (2026: test_sim_ollama_2026.py).
    common = ("--gpu-state", state, "--gpu-total-gib", "16", "--time-scale", "0.01")
    common += ("--profile", "2025")
    comfy_proc = spawn("comfyui", "--port", "0", *common)
    ollama_proc = spawn("ollama", "--port", "0", *common)
    comfy, ollama = comfy_proc.urls["ComfyUI"], ollama_proc.urls["Ollama"]
    with httpx.Client(timeout=30) as client:
        graph = {
            "1": {
                "class_type": "CheckpointLoaderSimple",
                "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
            },
            "2": {"class_type": "SaveImage", "inputs": {}},
        }
        assert client.post(f"{comfy}/prompt", json={"prompt": graph}).status_code == 200
        wait_until(
            lambda: client.get(f"{comfy}/prompt").json()["exec_info"]["queue_remaining"] == 0
        )
        # The Ollama process sees ComfyUI's memory and spills a model that no longer fits.
        pids = {p["pid"] for p in client.get(f"{ollama}/sim/gpu").json()["processes"]}
        assert pids == {comfy_proc.proc.pid}
        client.post(f"{ollama}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": -1})
        [model] = client.get(f"{ollama}/api/ps").json()["models"]
        assert 0 < model["size_vram"] < model["size"]
        pids = {p["pid"] for p in client.get(f"{comfy}/sim/gpu").json()["processes"]}
        assert pids == {comfy_proc.proc.pid, ollama_proc.proc.pid}

        # Killing ComfyUI's process gives its VRAM back, as the driver would.
        comfy_proc.kill()
        gpu = client.get(f"{ollama}/sim/gpu").json()
        assert [p["pid"] for p in gpu["processes"]] == [ollama_proc.proc.pid]
        assert gpu["used_bytes"] == model["size_vram"]


@pytest.mark.parametrize(
    ("args", "version", "argv_tail", "device"),
    [
        ((), "0.38.1", [], "cuda"),
        (("--profile", "2025"), "0.3.64", [], "cuda"),
        (("--disable-dynamic-vram",), "0.38.1", ["--disable-dynamic-vram"], "cuda"),
        (("--cpu", "--profile", "2025"), "0.3.64", ["--cpu"], "cpu"),
    ],
)
def test_comfyui_profile_and_modes_are_flags_like_the_real_servers_argv(
    spawn: Callable[..., SimProcess],
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    version: str,
    argv_tail: list[str],
    device: str,
) -> None:
    monkeypatch.delenv("VRAM_SIM_PROFILE", raising=False)
    comfy = spawn("comfyui", "--port", "0", *args).urls["ComfyUI"]
    body = httpx.get(f"{comfy}/system_stats").json()
    assert body["system"]["comfyui_version"] == version
    assert body["system"]["argv"][3:] == argv_tail
    assert body["devices"][0]["type"] == device


def test_a_bad_profile_exits_2_naming_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = [sys.executable, "-m", "supervisor.sim", "comfyui", "--port", "0"]
    bad_flag = subprocess.run([*run, "--profile", "2024"], cwd=REPO, capture_output=True, text=True)
    assert bad_flag.returncode == 2
    assert "--profile: invalid choice: '2024'" in bad_flag.stderr and "2025" in bad_flag.stderr
    monkeypatch.setenv("VRAM_SIM_PROFILE", "next")
    bad_env = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert bad_env.returncode == 2 and "VRAM_SIM_PROFILE='next'" in bad_env.stderr


def test_llama_server_mode_single_and_router_attribute_vram_by_pid(
    spawn: Callable[..., SimProcess], tmp_path: Path, wait_until: WaitUntil
) -> None:
    state = str(tmp_path / "gpu.json")
    common = ("--gpu-state", state, "--time-scale", "0.01", "--port", "0")
    single = spawn(
        "llama-server", "-m", "llama3.2:latest", "--alias", "chat", "-c", "4096", *common
    )
    routed = spawn("llama-server", "--models", "llama3.1:8b", "--models-max", "1", *common)
    one, many = single.urls["llama-server"], routed.urls["llama-server"]
    gpu = FileGpu(state)
    try:
        with httpx.Client(timeout=30) as client:
            wait_until(lambda: client.get(f"{one}/health").status_code == 200)
            assert client.get(f"{one}/v1/models").json()["data"][0]["id"] == "chat"
            assert single.proc.pid in dict(gpu.processes())  # single mode: its own PID
            assert client.get(f"{many}/props").json()["role"] == "router"
            load = client.post(f"{many}/models/load", json={"model": "llama3.1:8b"})
            assert load.json() == {"success": True}
            wait_until(
                lambda: (
                    client.get(f"{many}/models").json()["data"][0]["status"]["value"] == "loaded"
                )
            )
            pids = set(dict(gpu.processes())) - {single.proc.pid}
            assert len(pids) == 1 and routed.proc.pid not in pids  # a child's PID
            [child] = pids
            assert parent_pid(child) == routed.proc.pid
        assert routed.stop() == 0 and single.stop() == 0
        assert gpu.processes() == []
    finally:
        gpu.close()


def test_llama_server_mode_rejects_an_unknown_model(spawn: Callable[..., SimProcess]) -> None:
    run = [sys.executable, "-m", "supervisor.sim", "llama-server", "--port", "0"]
    bad = subprocess.run([*run, "-m", "nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "model 'nope' is not in the simulator's catalog" in bad.stderr
    none = subprocess.run(run, cwd=REPO, capture_output=True, text=True)
    assert none.returncode == 2 and "-m/--model" in none.stderr


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_llama_swap_mode_starts_a_model_under_a_child_pid(
    spawn: Callable[..., SimProcess], tmp_path: Path
) -> None:
    state = str(tmp_path / "gpu.json")
    config = '{"models": {"chat": {"model": "llama3.2:latest", "aliases": ["gpt"]}}}'
    sim = spawn("llama-swap", "--config", config, "--gpu-state", state, "--time-scale", "0.01",
                "--port", "0")  # fmt: skip
    url = sim.urls["llama-swap"]
    gpu = FileGpu(state)
    try:
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{url}/health").text == "OK"
            body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 200
            [row] = client.get(f"{url}/running").json()["running"]
            assert row["model"] == "chat" and row["state"] == "ready"
            [pid] = dict(gpu.processes())
            assert pid != sim.proc.pid and parent_pid(pid) == sim.proc.pid
            assert client.get(f"{url}/unload").text == "OK"
            assert gpu.processes() == []
        assert sim.stop() == 0
    finally:
        gpu.close()
