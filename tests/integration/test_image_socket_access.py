"""The image reaches the Docker socket with no group given, and runs unprivileged.

What a user relies on: `docker compose up -d` with no `.env` works. The container starts as
root only for the entrypoint, which reads the socket's group and drops to uid 10001 with
it (no capabilities, no-new-privs); the supervisor then discovers labelled containers.
A `DOCKER_GID` that is set wins, and a socket the supervisor cannot use gives ONE clear log
line and a failing healthcheck, with the container left running (no crash loop).

Both supervisors run with the hardening of the compose files (cap_drop ALL, cap_add
SETUID/SETGID, no-new-privileges), so those settings are proven to leave enough to start.

Ports (127.0.0.1, host network): 19401 fake Ollama, 19405 and 19406 supervisor HTTP.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from docker.models.containers import Container

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

SIM_PORT = 19401
SUPERVISOR_PORT = 19405
UNUSABLE_PORT = 19406
# start_period 1 ms: a zero would inherit the image's 30 s, during which failures don't count.
FAST_HEALTHCHECK = {
    "interval": 500_000_000,
    "timeout": 3_000_000_000,
    "retries": 2,
    "start_period": 1_000_000,
}
HARDENED: dict[str, Any] = {
    "cap_drop": ["ALL"],
    "cap_add": ["SETUID", "SETGID"],
    "security_opt": ["no-new-privileges:true"],
}


def socket_of(docker_host: str) -> str:
    if not docker_host.startswith("unix://"):
        pytest.fail(f"These tests mount the engine's unix socket; DOCKER_HOST is {docker_host}")
    return docker_host.removeprefix("unix://")


def proc_status(container: Container) -> dict[str, str]:
    """/proc/1/status of the container (PID 1 is the supervisor after the exec chain)."""
    code, out = container.exec_run(["cat", "/proc/1/status"])
    assert code == 0, out
    fields = dict(line.split(":", 1) for line in out.decode().splitlines() if ":" in line)
    return {key: value.strip() for key, value in fields.items()}


def supervisor_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "VRAM_HTTP_HOST": "127.0.0.1",
        "VRAM_HTTP_PORT": str(port),
        "VRAM_CHECK_INTERVAL": "1",
        **extra,
    }


def test_starts_with_no_group_given_reaches_the_socket_and_runs_as_10001(
    project_image: str,
    docker_host: str,
    run_container: Callable[..., Container],
    wait_healthy: Callable[..., None],
) -> None:
    socket_path = socket_of(docker_host)
    socket_gid = os.stat(socket_path).st_gid
    sim = run_container(
        project_image,
        ["-m", "supervisor.sim", "ollama", f"--port={SIM_PORT}"],
        entrypoint=["python"],
        user="10001:10001",
        name=f"vs-sock-{os.getpid()}-ollama",
        labels={
            "vram-supervisor.role": "ollama",
            "vram-supervisor.url": f"http://127.0.0.1:{SIM_PORT}",
        },
    )
    supervisor = run_container(
        project_image,
        # No group_add, no user, no DOCKER_GID: what a compose file without .env gives.
        environment=supervisor_env(SUPERVISOR_PORT),
        volumes={socket_path: {"bind": "/var/run/docker.sock", "mode": "ro"}},
        healthcheck={"test": ["CMD", "vram-supervisor", "healthcheck"], **FAST_HEALTHCHECK,
                     "retries": 120},
        **HARDENED,
    )  # fmt: skip
    wait_healthy(supervisor, timeout_s=60)

    status = proc_status(supervisor)
    assert status["Uid"].split() == ["10001"] * 4, status
    assert status["Gid"].split() == ["10001"] * 4, status
    assert status["Groups"].split() == [str(socket_gid)], status
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert status["NoNewPrivs"] == "1", status
    # PID 1 is the supervisor itself (exec'd through setpriv), so SIGTERM reaches it.
    code, cmdline = supervisor.exec_run(["cat", "/proc/1/cmdline"])
    assert code == 0 and cmdline.split(b"\0")[1:3] == [b"/opt/venv/bin/vram-supervisor", b"run"], (
        cmdline
    )

    def discovered() -> bool:
        logs = supervisor.logs().decode(errors="replace")
        return f"Discovered ollama container {sim.name} at http://127.0.0.1:{SIM_PORT}" in logs

    deadline = time.monotonic() + 30
    while not discovered():
        assert time.monotonic() < deadline, supervisor.logs().decode(errors="replace")
        time.sleep(0.2)
    docker_state = httpx.get(f"http://127.0.0.1:{SUPERVISOR_PORT}/status", timeout=5).json()
    assert docker_state["docker"]["state"] == "ok", docker_state
    # `docker exec` runs as root; through the entrypoint, doctor runs as the supervisor does.
    _code, out = supervisor.exec_run(["vram-supervisor-entrypoint", "doctor"])
    assert "Docker reachable" in out.decode(), out.decode()

    supervisor.stop(timeout=20)
    supervisor.reload()
    assert supervisor.attrs["State"]["ExitCode"] == 0, supervisor.logs().decode()


def test_a_set_docker_gid_wins_and_an_unusable_socket_is_one_line_not_a_crash_loop(
    project_image: str,
    docker_host: str,
    run_container: Callable[..., Container],
) -> None:
    socket_path = socket_of(docker_host)
    socket_gid = os.stat(socket_path).st_gid
    wrong_gid = 4343 if socket_gid != 4343 else 4344
    supervisor = run_container(
        project_image,
        environment=supervisor_env(UNUSABLE_PORT, DOCKER_GID=str(wrong_gid)),
        volumes={socket_path: {"bind": "/var/run/docker.sock", "mode": "ro"}},
        healthcheck={"test": ["CMD", "vram-supervisor", "healthcheck"], **FAST_HEALTHCHECK},
        restart_policy={"Name": "unless-stopped"},
        **HARDENED,
    )
    deadline = time.monotonic() + 30
    while True:
        supervisor.reload()
        if supervisor.attrs["State"]["Health"]["Status"] == "unhealthy":
            break
        assert time.monotonic() < deadline, supervisor.logs().decode(errors="replace")
        time.sleep(0.2)
    time.sleep(6)  # past one recheck of the socket: still one line, still the same process
    supervisor.reload()
    state = supervisor.attrs["State"]
    logs = supervisor.logs().decode(errors="replace")
    assert state["Status"] == "running" and supervisor.attrs["RestartCount"] == 0, logs
    lines = [line for line in logs.splitlines() if line.strip()]
    assert len(lines) == 1, logs
    assert re.search(
        rf"ERROR +\| Cannot use the Docker socket /var/run/docker.sock as uid 10001 with "
        rf"groups \[{wrong_gid}\] \(socket owner \d+:{socket_gid}, mode 0\d+\): "
        rf"DOCKER_GID={wrong_gid} is set and the socket's group is {socket_gid}: "
        rf"set DOCKER_GID={socket_gid}",
        lines[0],
    ), logs
    assert "Traceback" not in logs
    # The group it holds is DOCKER_GID's, not the socket's: the set value won.
    assert proc_status(supervisor)["Groups"].split() == [str(wrong_gid)]
    # doctor through the entrypoint sees what the supervisor would: no Docker.
    code, out = supervisor.exec_run(["vram-supervisor-entrypoint", "doctor"])
    assert code != 0 and "Docker is not reachable" in out.decode(), out.decode()
    # `docker stop` ends the wait at once (PID 1 handles SIGTERM), exit 0.
    started = time.monotonic()
    supervisor.stop(timeout=20)
    supervisor.reload()
    assert time.monotonic() - started < 10
    assert supervisor.attrs["State"]["ExitCode"] == 0
