"""The Docker daemon stops and starts under a running supervisor: it survives and resyncs.

This module restarts the test engine itself (tests/lib/dockerd.sh stop / start), so it runs
last (`zz` in its name) and puts the engine back up afterwards even when the test fails,
restarting the containers of others that ran before. It needs the private engine of
tests/lib/dockerd.sh: with DOCKER_HOST pointing at any other engine it FAILS (it will not
restart an engine it does not own).

What a user relies on: the supervisor process does not die or wedge when Docker goes away;
/healthz stays up (it keeps supervising what it knew); once Docker is back it reconnects to
the events stream, finds the containers that came back and new ones, and acts again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import APIError, DockerException, NotFound

from tests.integration.harness import (
    HARNESS_LABEL,
    REPO,
    Sims,
    Supervisor,
    comfy_hold_vram,
    fail,
    freed_on,
    ollama_load,
    tail,
    wait_until,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("isolated_engine")]

DOCKERD_SH = REPO / "tests" / "lib" / "dockerd.sh"
DOCKERD_DIR = Path(os.environ.get("VRAM_DOCKERD_DIR", "/tmp/vram-supervisor-dockerd"))
ALWAYS = {"Name": "always"}


def dockerd(command: str) -> None:
    done = subprocess.run(
        [str(DOCKERD_SH), command], capture_output=True, text=True, timeout=90, check=False
    )
    if done.returncode != 0:
        log = DOCKERD_DIR / "dockerd.log"
        daemon_log = tail(log.read_text(errors="replace"), 30) if log.exists() else ""
        fail(
            f"tests/lib/dockerd.sh {command} exited {done.returncode}:\n"
            f"{done.stdout}{done.stderr}\n{daemon_log}"
        )


def engine_answers(docker_host: str) -> bool:
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=10)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, OSError):
        return False


@pytest.fixture
def restorable_engine(docker_host: str) -> Iterator[None]:
    """The private engine, which the test may stop: teardown makes sure it is up again."""
    own = f"unix://{DOCKERD_DIR / 'docker.sock'}"
    if docker_host != own:
        fail(
            f"This test restarts the private test engine ({own}) and DOCKER_HOST is "
            f"{docker_host}. Run it against tests/lib/dockerd.sh's engine (tests/run does)."
        )
    if not (DOCKERD_DIR / "docker.pid").exists():
        fail(f"{DOCKERD_DIR}/docker.pid is missing: the engine was not started by dockerd.sh")
    client = docker.DockerClient(base_url=docker_host, timeout=30)
    others = [
        c.id
        for c in client.containers.list()
        if not (c.labels or {}).get(HARNESS_LABEL) and c.status in ("running", "paused")
    ]
    client.close()

    yield

    if not engine_answers(docker_host):
        dockerd("start")
    # Leave the engine as we found it: others' containers that ran before run again.
    client = docker.DockerClient(base_url=docker_host, timeout=30)
    try:
        for container_id in others:
            try:
                container = client.containers.get(container_id)
                if container.status == "exited":
                    container.start()
            except (APIError, NotFound) as exc:
                print(f"could not start {container_id[:12]} again: {exc}")
    finally:
        client.close()


def docker_state(sup: Supervisor) -> str:
    return str(sup.status()["docker"]["state"])


def reachable(sup: Supervisor, role: str, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        entry = sup.service(role, name)
        return entry if entry and entry["reachable"] else None

    return check


def test_the_supervisor_survives_a_daemon_restart_and_resyncs(
    # First, so that its teardown (engine up, others' containers started again) runs after
    # the supervisor has stopped and this test's containers are gone.
    restorable_engine: None,
    sims: Sims,
    start_supervisor: Callable[..., Supervisor],
    docker_host: str,
) -> None:
    ollama = sims.ollama(restart_policy=ALWAYS)
    comfy = sims.comfyui(restart_policy=ALWAYS)
    sup = start_supervisor()
    sup.wait_for(f"Discovered ollama container {ollama.name} at {ollama.url}")
    sup.wait_for(f"Discovered comfyui container {comfy.name} at {comfy.url}")
    sup.wait_pass()

    dockerd("stop")
    try:
        assert not engine_answers(docker_host)
        wait_until(lambda: docker_state(sup) == "unreachable", 15, "/status: Docker unreachable")
        sup.wait_passes(2)
        assert sup.is_alive(), sup.log()
        assert sup.healthz() == 200, sup.log()  # it keeps supervising what it knew
    finally:
        dockerd("start")

    # The restart policy brings both containers back; the supervisor finds them again.
    wait_until(lambda: docker_state(sup) == "ok", 20, "/status: Docker ok again")
    wait_until(
        lambda: (sup.status()["docker"]["reconnects"] or 0) >= 1,
        20,
        "/status: the events stream reconnected",
    )
    ollama.wait_ready(30)
    comfy.wait_ready(30)
    for role, sim in (("ollama", ollama), ("comfyui", comfy)):
        entry = wait_until(
            reachable(sup, role, sim.name),
            15,
            f"{sim.name} running and reachable in /status after the daemon restart",
        )
        assert entry["running"] and entry["container_id"] == sim.container.id

    # A container started after the restart is discovered too.
    mark = sup.mark()
    newcomer = sims.comfyui()
    sup.wait_for(f"Discovered comfyui container {newcomer.name} at {newcomer.url}", since=mark)

    # And it still acts: a model load frees the ComfyUI that came back.
    comfy_hold_vram(comfy, 10)
    ollama_load(ollama, "llama3.1:8b")
    sup.wait_for(freed_on(comfy.name), since=mark, timeout_s=20)
    assert sup.is_alive() and sup.healthz() == 200
    assert sup.errors() == [], sup.log()
    assert engine_answers(docker_host)
