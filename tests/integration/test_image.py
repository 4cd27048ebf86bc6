"""The container image, built offline from the Dockerfile, does what the docs promise.

The `project_image` fixture itself proves the air-gapped build: legacy builder, RUN steps
with no network, dependencies only from .cache/wheelhouse, base image made by mmdebstrap.
Here: it runs as uid 10001 with the CLI as exec-form entrypoint, its HEALTHCHECK turns
healthy against a running supervisor, `docker stop` ends it cleanly (SIGTERM reaches
Python: exit 0, not a SIGKILL), and the same image runs the simulator.

Ports: 18201 fake Ollama, 18202 fake ComfyUI, 18205 supervisor HTTP (127.0.0.1, host net).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import docker
import httpx
import pytest
from docker.models.containers import Container

SIM_OLLAMA_PORT = 18201
SIM_COMFYUI_PORT = 18202
SUPERVISOR_PORT = 18205
FAST_HEALTHCHECK = {"interval": 250_000_000, "timeout": 3_000_000_000, "retries": 120}


@pytest.fixture
def sim(
    project_image: str,
    run_container: Callable[..., Container],
    wait_healthy: Callable[..., None],
) -> Iterator[Container]:
    """Fake Ollama and fake ComfyUI from the project image (entrypoint override)."""
    container = run_container(
        project_image,
        [
            "-m", "supervisor.sim", "all",
            f"--ollama-port={SIM_OLLAMA_PORT}", f"--comfyui-port={SIM_COMFYUI_PORT}",
        ],
        entrypoint=["python"],
        healthcheck={
            "test": [
                "CMD", "python", "-m", "supervisor.sim", "healthcheck",
                f"http://127.0.0.1:{SIM_COMFYUI_PORT}/system_stats",
            ],
            **FAST_HEALTHCHECK,
        },
    )  # fmt: skip
    wait_healthy(container, timeout_s=60)
    yield container


def test_image_runs_the_cli_through_the_entrypoint_in_exec_form(
    project_image: str, docker_client: docker.DockerClient
) -> None:
    image = docker_client.images.get(project_image)
    config: dict[str, Any] = image.attrs["Config"]
    # Root only for the entrypoint, which drops to 10001 (test_image_socket_access.py).
    assert config["User"] in ("", "0", "root")
    assert config["Entrypoint"] == ["vram-supervisor-entrypoint"]
    assert config["Cmd"] == ["run"]
    assert config["Healthcheck"]["Test"] == ["CMD", "vram-supervisor", "healthcheck"]
    print(f"\n{project_image}: {image.attrs['Size'] / 1e6:.0f} MB")


def test_cli_answers_inside_the_image(
    project_image: str, run_container: Callable[..., Container]
) -> None:
    container = run_container(project_image, ["--version"])
    result = container.wait(timeout=60)
    output = container.logs().decode()
    assert result["StatusCode"] == 0, output
    assert "0.1.0" in output


def test_simulator_runs_from_the_same_image(sim: Container) -> None:
    ollama = httpx.get(f"http://127.0.0.1:{SIM_OLLAMA_PORT}/api/version", timeout=5)
    comfy = httpx.get(f"http://127.0.0.1:{SIM_COMFYUI_PORT}/system_stats", timeout=5)
    assert ollama.status_code == 200 and "version" in ollama.json()
    assert comfy.status_code == 200 and comfy.json()["devices"]


def test_supervisor_turns_healthy_and_stops_cleanly_on_sigterm(
    project_image: str,
    sim: Container,
    run_container: Callable[..., Container],
    wait_healthy: Callable[..., None],
) -> None:
    supervisor = run_container(
        project_image,
        environment={
            "VRAM_OLLAMA_URL": f"http://127.0.0.1:{SIM_OLLAMA_PORT}",
            "VRAM_COMFYUI_URL": f"http://127.0.0.1:{SIM_COMFYUI_PORT}",
            "VRAM_HTTP_HOST": "127.0.0.1",
            "VRAM_HTTP_PORT": str(SUPERVISOR_PORT),
            "VRAM_CHECK_INTERVAL": "1",
        },
        # The image's own check command, polled faster than its 30 s default.
        healthcheck={"test": ["CMD", "vram-supervisor", "healthcheck"], **FAST_HEALTHCHECK},
    )
    wait_healthy(supervisor, timeout_s=60)
    assert httpx.get(f"http://127.0.0.1:{SUPERVISOR_PORT}/healthz", timeout=5).status_code == 200
    page = httpx.get(f"http://127.0.0.1:{SUPERVISOR_PORT}/", timeout=5)  # package data
    assert page.status_code == 200 and "<title>vram-supervisor</title>" in page.text

    supervisor.stop(timeout=20)  # SIGTERM, then SIGKILL after 20 s
    supervisor.reload()
    logs = supervisor.logs().decode(errors="replace")
    assert supervisor.attrs["State"]["ExitCode"] == 0, logs
    assert "Traceback" not in logs, logs
