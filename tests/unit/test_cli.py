"""The CLI as a user runs it: a subprocess of `python -m supervisor`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import __version__
from supervisor.cli import render_status
from supervisor.model import (
    ComfyObservation,
    OllamaObservation,
    Role,
    ServiceSpec,
    ServiceStatus,
)
from supervisor.sim import ComfyConfig, SimHost
from supervisor.snapshot import comfy_json, ollama_json

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VRAM_")}
    base["PYTHONPATH"] = str(ROOT)
    # Never a real Docker engine: a socket that does not exist.
    base["DOCKER_HOST"] = "unix:///nonexistent/vram-supervisor-test.sock"
    base.update(extra)
    return base


def cli(*args: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=ROOT,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vram-supervisor {__version__}"


@pytest.mark.parametrize("command", ["run", "status", "healthcheck", "doctor"])
def test_bad_setting_exits_2_naming_the_variable(command: str) -> None:
    result = cli(command, VRAM_THRESHOLD="lots")
    assert result.returncode == 2
    assert "VRAM_THRESHOLD" in result.stderr and "'lots'" in result.stderr
    assert "Traceback" not in result.stderr


def test_healthcheck_fails_when_nothing_answers() -> None:
    result = cli("healthcheck", VRAM_HTTP_PORT=str(free_port()))
    assert result.returncode == 1 and "no answer" in result.stdout


def fixed_urls(port: int) -> dict[str, str]:
    # Ports with nothing listening: the services are "down", the supervisor must cope.
    return {
        "VRAM_OLLAMA_URL": f"http://127.0.0.1:{free_port()}",
        "VRAM_COMFYUI_URL": f"http://127.0.0.1:{free_port()}",
        "VRAM_HTTP_PORT": str(port),
        "VRAM_HTTP_HOST": "127.0.0.1",
        "VRAM_CHECK_INTERVAL": "0.5",
        "VRAM_REQUEST_TIMEOUT": "1",
    }


def start(settings: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run"],
        cwd=ROOT,
        env=env(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_healthy(
    port: int, extra: dict[str, str], deadline_s: float = 20, first_pass: bool = True
) -> bool:
    """Healthy, and (unless first_pass=False) the first pass has completed."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = cli("healthcheck", VRAM_HTTP_PORT=str(port), **extra)
        if result.returncode == 0 and (
            not first_pass or json.loads(result.stdout)["last_pass_age_s"] is not None
        ):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_run_without_docker_is_healthy_and_exits_0_quickly_on_signal(sig: int) -> None:
    port = free_port()
    settings = fixed_urls(port)
    proc = start(settings)
    try:
        assert wait_healthy(port, {"VRAM_HTTP_HOST": "127.0.0.1"})
        status = cli("status", "--json", VRAM_HTTP_PORT=str(port), VRAM_HTTP_HOST="127.0.0.1")
        snapshot = json.loads(status.stdout)
        assert snapshot["docker"]["state"] == "not used"
        assert {c["key"] for c in snapshot["comfyui"]} == {"comfyui/comfyui"}
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=10)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert code == 0, stderr
    assert took < 2.0, f"took {took:.2f} s to exit"
    assert "Stopping" in stderr  # the graceful stop, not a death by signal
    assert "Using comfyui at" in stderr and "Cannot read ollama" in stderr
    assert "docker" not in stderr.lower().replace("docker: not used", "")


def test_port_in_use_exits_3() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        taken = holder.getsockname()[1]
        settings = fixed_urls(taken)
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", "run"],
            cwd=ROOT,
            env=env(**settings),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        holder.close()
    assert result.returncode == 3 and f"VRAM_HTTP_PORT={taken}" in result.stderr


def test_docker_unreachable_is_not_fatal() -> None:
    """Discovery needed but no Docker: it logs, keeps running and stays healthy."""
    port = free_port()
    proc = start(
        {"VRAM_HTTP_PORT": str(port), "VRAM_HTTP_HOST": "127.0.0.1", "VRAM_CHECK_INTERVAL": "0.5"}
    )
    try:
        assert wait_healthy(port, {"VRAM_HTTP_HOST": "127.0.0.1"})
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert code == 0
    assert "Docker is unreachable" in stderr


def test_status_one_shot_when_no_supervisor_runs() -> None:
    port = free_port()
    result = cli("status", **fixed_urls(port))
    assert result.returncode == 0
    assert (
        f"one-shot observation (no running supervisor answered at http://127.0.0.1:{port}/status)"
        in result.stdout
    )
    assert "Services:" in result.stdout and "no answer" in result.stdout


def test_doctor_reports_each_failure_with_a_fix() -> None:
    result = cli(
        "doctor",
        VRAM_REQUEST_TIMEOUT="1",
        VRAM_HTTP_PORT=str(free_port()),
        VRAM_HTTP_HOST="127.0.0.1",
    )
    assert result.returncode == 1
    assert "FAIL Docker is not reachable" in result.stdout
    assert "mount /var/run/docker.sock" in result.stdout
    assert "NVML missing" in result.stdout or "NVML works" in result.stdout
    fixed = cli("doctor", **fixed_urls(free_port()))
    assert fixed.returncode == 1
    assert "Docker not needed" in fixed.stdout
    assert "FAIL ollama (VRAM_OLLAMA_URL)" in fixed.stdout
    assert "set VRAM_COMFYUI_URL" in fixed.stdout


def test_free_with_nothing_to_free_fails_clearly() -> None:
    result = cli("free", **fixed_urls(free_port()))
    assert result.returncode == 1
    assert "ComfyUI comfyui: failed" in result.stdout


def test_unknown_variable_is_a_warning_not_an_error() -> None:
    result = cli("status", VRAM_TRESHOLD="80", **fixed_urls(free_port()))
    assert result.returncode == 0


def test_render_status_table() -> None:
    snapshot = {
        "docker": {"state": "ok"},
        "vram_source": "nvml",
        "priority": "balanced",
        "dry_run": False,
        "gpus": [
            {
                "index": 0,
                "name": "RTX 4090",
                "used_bytes": 20 * 1024**3,
                "total_bytes": 24 * 1024**3,
                "used_percent": 83.3,
                "free_bytes": 4 * 1024**3,
            }
        ],
        "ollama": [
            {
                "key": "ollama/ollama",
                "running": True,
                "reachable": True,
                "health": "healthy",
                "url": "http://o:11434",
                "error": None,
                "models": [
                    {
                        "name": "llama3.2:latest",
                        "size_bytes": 4 * 1024**3,
                        "size_vram_bytes": 3 * 1024**3,
                        "gpu_percent": 75.0,
                    }
                ],
            }
        ],
        "comfyui": [
            {
                "key": "comfyui/comfyui",
                "name": "comfyui",
                "running": True,
                "reachable": True,
                "health": "none",
                "url": "http://c:8188",
                "error": None,
                "vram_bytes": 11 * 1024**3,
                "queue": {"running": 1, "pending": 0},
                "mode": "dynamic-vram",
                "version": "0.38.1",
                "device_type": "cuda",
                "device_name": "cuda:0 RTX 4090 : cudaMallocAsync",
                "vram_measured": False,
            }
        ],
        "recent_actions": [
            {
                "action": "FreeComfy",
                "stage": "soft",
                "target": "comfyui/comfyui",
                "dry_run": False,
                "result": "freed",
                "ok": True,
                "before_bytes": 11 * 1024**3,
                "after_bytes": 300 * 1024**2,
                "duration_s": 1.2,
                "reason": "new model",
            }
        ],
    }
    text = render_status(snapshot)
    assert "[0] RTX 4090: 20.0 GiB used of 24.0 GiB (83.3%)" in text
    assert "llama3.2:latest" in text and "75.0%" in text and "spilled to CPU" in text
    assert "1 running, 0 pending" in text
    assert (
        "ComfyUI 0.38.1, Dynamic VRAM (weights outside torch's figures), device cuda: "
        "cuda:0 RTX 4090 : cudaMallocAsync (VRAM bounded from the device figures: no NVML)"
    ) in text
    assert "FreeComfy soft comfyui/comfyui: freed, 11.0 GiB -> 300 MiB" in text


def test_render_status_names_a_cpu_comfyui_and_an_old_snapshot() -> None:
    base = {"key": "comfyui/c", "running": True, "reachable": True, "health": "none"}
    base |= {"url": "http://c:8188", "error": None, "queue": None}
    cpu = {**base, "name": "c", "vram_bytes": 0, "mode": "cpu", "version": "0.38.1"}
    cpu |= {"device_type": "cpu", "device_name": "cpu", "vram_measured": False}
    old = {**base, "name": "d", "vram_bytes": None}  # a supervisor without these fields
    text = render_status({"comfyui": [cpu, old]})
    assert "ComfyUI 0.38.1, runs on the CPU: holds no VRAM, device cpu: cpu" in text
    assert "ComfyUI (version unknown), mode unknown (no /system_stats reading)" in text


def test_status_shows_ollamas_generation_and_an_unreachable_fixed_url() -> None:
    gib = 1024**3
    ollama = OllamaObservation(
        ServiceStatus(ServiceSpec(Role.OLLAMA, "ollama", "http://o:11434", "id-o"), True),
        models=(),
        version="0.33.0",
        generation="llama-server runners (>= 0.30)",
        fit_target_bytes=gib,
    )
    down = ComfyObservation(
        ServiceStatus(
            ServiceSpec(Role.COMFYUI, "comfyui", "http://c:8188"),
            is_running=True,
            is_reachable=False,
            error="connection refused",
        )
    )
    snap = {"ollama": [ollama_json(ollama)], "comfyui": [comfy_json(down)]}
    assert snap["ollama"][0]["version"] == "0.33.0"
    assert snap["comfyui"][0]["state"] == "unreachable" and not snap["comfyui"][0]["running"]
    text = render_status(snap)
    assert "Ollama 0.33.0: llama-server runners (>= 0.30), keeps 1.0 GiB free" in text
    line = next(x for x in text.splitlines() if "comfyui/comfyui" in x)
    assert "unreachable, no answer (connection refused)" in line and "running" not in line


def test_json_logs_are_one_object_per_line() -> None:
    port = free_port()
    settings = {**fixed_urls(port), "VRAM_LOG_FORMAT": "json", "VRAM_DEBUG": "true"}
    proc = start(settings)
    try:
        assert wait_healthy(port, {"VRAM_HTTP_HOST": "127.0.0.1"})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records and all({"time", "level", "message"} <= set(r) for r in records)
    assert any(r["level"] == "DEBUG" for r in records)  # VRAM_DEBUG
    assert any(r["message"].startswith("Using comfyui at") for r in records)


def test_json_log_lines_carry_bound_fields_and_exceptions() -> None:
    import io

    from loguru import logger

    from supervisor.logs import configure_logging
    from supervisor.model import LogFormat

    stream = io.StringIO()
    configure_logging(log_format=LogFormat.JSON, stream=stream)
    try:
        logger.bind(target="comfyui/comfyui", stage="soft").info("Freed ComfyUI memory")
        logger.debug("not at INFO")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("A pass of the loop failed")
    finally:
        logger.remove()
        logger.add(sys.stderr)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "Freed ComfyUI memory" and first["level"] == "INFO"
    assert first["target"] == "comfyui/comfyui" and first["stage"] == "soft"
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_fixed_urls_never_import_the_docker_sdk() -> None:
    code = (
        "import sys\n"
        "from supervisor.cli import build_daemon\n"
        "from supervisor.config import Settings\n"
        "d = build_daemon(Settings(ollama_url='http://127.0.0.1:1', comfyui_url='http://127.0.0.1:2'))\n"
        "d.observe(); d.close()\n"
        "assert 'docker' not in sys.modules, 'docker imported'\n"
        "assert 'supervisor.docker.discovery' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_exit_is_quick_even_while_a_service_hangs() -> None:
    """A service that accepts connections and never answers: the pass is stuck in a read
    with a 5 s timeout when SIGTERM comes; the process still exits within 2 s."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # never accept()ed: requests wait for their read timeout
    port = free_port()
    settings = {
        **fixed_urls(port),
        "VRAM_COMFYUI_URL": f"http://127.0.0.1:{hung.getsockname()[1]}",
        "VRAM_REQUEST_TIMEOUT": "5",
    }
    proc = start(settings)
    try:
        # Healthy although the first pass is stuck on the hung ComfyUI (it is in its grace).
        assert wait_healthy(port, {"VRAM_HTTP_HOST": "127.0.0.1"}, first_pass=False)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.communicate()
        hung.close()
    assert code == 0 and took < 2.0, f"exit {code} after {took:.2f} s"


@pytest.mark.parametrize(("profile", "mode"), [("2026", "Dynamic VRAM"), ("2025", "classic VRAM")])
def test_doctor_all_good_against_answering_services(profile: str, mode: str) -> None:
    with SimHost(time_scale=0.01, profile=profile) as host:
        result = cli(
            "doctor",
            VRAM_OLLAMA_URL=host.ollama_url,
            VRAM_COMFYUI_URL=host.comfyui_url,
            VRAM_HTTP_HOST="127.0.0.1",
            VRAM_HTTP_PORT=str(free_port()),
        )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("OK   ollama (VRAM_OLLAMA_URL)") and "model(s) loaded" in line
        for line in lines
    )
    version = "0.38.1" if profile == "2026" else "0.3.64"
    assert any(
        line.startswith("OK   comfyui (VRAM_COMFYUI_URL)")
        and f"ComfyUI {version}, {mode}" in line
        and "(cuda)" in line
        and "GiB VRAM)" in line
        for line in lines
    ), result.stdout
    assert "no supervisor is running" in result.stdout
    assert result.stdout.rstrip().endswith("Result: all good")


def _cpu_comfy_host() -> SimHost:
    return SimHost(time_scale=0.01, comfyui=ComfyConfig(cpu=True))


def test_doctor_warns_when_no_vram_can_be_read_at_all() -> None:
    """No NVML here and a ComfyUI on the CPU: the supervisor would be blind."""
    with _cpu_comfy_host() as host:
        result = cli(
            "doctor",
            VRAM_OLLAMA_URL=host.ollama_url,
            VRAM_COMFYUI_URL=host.comfyui_url,
            VRAM_HTTP_PORT="0",
        )
    assert result.returncode == 0, result.stdout
    assert "on the CPU, holds no VRAM" in result.stdout
    assert "WARN no VRAM reading at all" in result.stdout
    assert "all good" not in result.stdout
    assert result.stdout.rstrip().endswith(
        "Result: runs, but cannot read VRAM (see the WARN above)"
    )


def test_free_of_a_comfyui_on_the_cpu_says_so_at_once_and_succeeds() -> None:
    with _cpu_comfy_host() as host:
        start = time.monotonic()
        result = cli("free", VRAM_OLLAMA_URL=host.ollama_url, VRAM_COMFYUI_URL=host.comfyui_url)
        took = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ComfyUI comfyui runs on the CPU: it holds no VRAM, nothing to free" in result.stdout
    assert "failed" not in result.stdout
    assert took < 8.0  # no verify window (VRAM_VERIFY_TIMEOUT is 10 s)


@pytest.mark.parametrize("var", ["VRAM_HTTP_HOST", "VRAM_GATE_HOST"])
def test_a_host_that_cannot_be_encoded_exits_2(var: str) -> None:
    result = cli("run", **{var: "a" * 64, "VRAM_GATE_PORT": str(free_port())})
    assert result.returncode == 2
    assert var in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor_describes_tenants_of_other_kinds() -> None:
    """A llama-swap and a llama-server in single-model mode beside ComfyUI, by
    VRAM_SERVICES: no Docker needed, each described by its kind, no Ollama required."""
    from supervisor.sim.llama_server import LlamaServerConfig
    from supervisor.sim.llama_swap import LlamaSwapConfig, SwapModel

    swap = LlamaSwapConfig(models=(SwapModel("chat", "llama3.2:latest"),))
    single = LlamaServerConfig(model="llama3.2:latest")
    with SimHost(time_scale=0.01, llama_swap=swap, llama_server=single) as host:
        services = (
            f"llama-swap={host.llama_swap_url},llama-server={host.llama_server_url},"
            f"comfyui={host.comfyui_url}"
        )
        result = cli("doctor", VRAM_SERVICES=services, VRAM_HTTP_PORT="0")
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "OK   Docker not needed: fixed URLs (VRAM_SERVICES)" in out
    assert "OK   llama-swap (VRAM_SERVICES) at " in out
    assert "llama-swap, 0 model(s) loaded, idle models can be unloaded" in out
    assert "llama-server (single-model), 1 model(s) loaded, no unload: observed only" in out
    assert "OK   comfyui (VRAM_SERVICES) at " in out  # VRAM_SERVICES, not VRAM_COMFYUI_URL
    assert "no container labelled" not in out


def test_doctor_fails_on_a_tenant_that_does_not_answer() -> None:
    result = cli(
        "doctor",
        VRAM_SERVICES=f"llama-swap=http://127.0.0.1:{free_port()}",
        VRAM_HTTP_PORT="0",
        VRAM_REQUEST_TIMEOUT="1",
    )
    assert result.returncode != 0
    assert "FAIL llama-swap (VRAM_SERVICES) at http://127.0.0.1:" in result.stdout
    assert "fewer than two tenants found" in result.stdout


def test_doctor_names_the_kind_and_mode_of_every_other_service() -> None:
    """Services of the registry's other kinds (here from VRAM_SERVICES) get a line each:
    their kind, their mode (a vLLM without sleep mode is observed only), their models."""
    from supervisor.sim.gpu import GIB, MemoryGpu
    from supervisor.sim.speaches import FakeSpeaches, SpeachesConfig
    from supervisor.sim.vllm import FakeVllm, VllmConfig

    gpu = MemoryGpu(24 * GIB)
    vllm = FakeVllm(gpu, VllmConfig(model="qwen", enable_sleep_mode=True, dev_mode=False))
    speaches = FakeSpeaches(gpu, SpeachesConfig())
    servers = [vllm.serve(), speaches.serve()]
    down = f"http://127.0.0.1:{free_port()}"
    try:
        services = f"vllm={servers[0].url},speaches={servers[1].url},vllm={down}"
        result = cli(
            "doctor",
            VRAM_SERVICES=services,
            VRAM_REQUEST_TIMEOUT="1",
            VRAM_HTTP_PORT=str(free_port()),
            VRAM_HTTP_HOST="127.0.0.1",
        )
    finally:
        for server in servers:
            server.stop()
        vllm.close()
        speaches.close()
    out = result.stdout
    assert "OK   Docker not needed: fixed URLs (VRAM_SERVICES)" in out
    assert (
        f"OK   vllm (VRAM_SERVICES) at {servers[0].url} answers (vLLM (no sleep mode), "
        "1 model(s) loaded, no unload: observed only)"
    ) in out
    assert (
        f"OK   speaches (VRAM_SERVICES) at {servers[1].url} answers (speaches, 0 model(s) "
        "loaded, idle models can be unloaded)"
    ) in out
    assert f"FAIL vllm (VRAM_SERVICES) at {down}: vLLM at {down}: GET /v1/models" in out
    assert result.returncode == 1, out
