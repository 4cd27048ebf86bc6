"""The Docker daemon stops and starts under a running supervisor: it survives and resyncs.

This module restarts the test engine itself (tests/lib/dockerd.sh stop / start), so it runs
last (`zz` in its name) and puts the engine back up afterwards even when the test fails,
restarting the containers of others that ran before.

Which engine it restarts: only tests/lib/dockerd.sh's private engine. When the suite runs
on any other engine (a developer's Docker, which must never be restarted), the test starts
a private engine of its own in its own network namespace (VRAM_DOCKERD_NETNS, data kept in
/tmp/vram-supervisor-dockerd-netns so the base image is loaded once), and runs itself again
there: a child pytest under `nsenter --net=...`, since the sims' 127.0.0.1 and the
supervisor's are that namespace's. It passes or fails with that run. Where no such engine
can be started (not root, or dockerd / ip / nsenter missing) it skips, naming what is
missing.

What a user relies on: the supervisor process does not die or wedge when Docker goes away;
/healthz stays up (it keeps supervising what it knew); once Docker is back it reconnects to
the events stream, finds the containers that came back and new ones, and acts again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
pytestmark = [pytest.mark.integration]

DOCKERD_SH = REPO / "tests" / "lib" / "dockerd.sh"
DOCKERD_DIR = Path(os.environ.get("VRAM_DOCKERD_DIR", "/tmp/vram-supervisor-dockerd"))
ALWAYS = {"Name": "always"}
NETNS = "vram-supervisor-restart-test"
NETNS_DIR = Path("/tmp/vram-supervisor-dockerd-netns")
CHILD_TIMEOUT_S = 300


def engine_is_ours(docker_host: str) -> bool:
    """The engine is dockerd.sh's (started from DOCKERD_DIR): this test may restart it."""
    own = f"unix://{DOCKERD_DIR / 'docker.sock'}"
    return docker_host == own and (DOCKERD_DIR / "docker.pid").exists()


def dockerd(command: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        [str(DOCKERD_SH), command],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        log = Path((env or {}).get("VRAM_DOCKERD_DIR", DOCKERD_DIR)) / "dockerd.log"
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
    if not engine_is_ours(docker_host):
        fail(f"{docker_host} is not tests/lib/dockerd.sh's engine from {DOCKERD_DIR}")
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


def missing_for_a_namespaced_engine() -> list[str]:
    missing = [tool for tool in ("dockerd", "ip", "nsenter") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def run_in_a_namespaced_engine(nodeid: str, base_image: str) -> None:
    """Start a private engine in its own network namespace, give it the base image, run
    this test there (child pytest in the namespace), and remove engine and namespace."""
    missing = missing_for_a_namespaced_engine()
    if missing:
        pytest.skip(
            "This test restarts the Docker engine. The engine in use was not started by "
            "tests/lib/dockerd.sh, so it is not restarted; a private engine in its own "
            f"network namespace would be, but that needs {', '.join(missing)}"
        )
    env = {
        "VRAM_DOCKERD_DIR": str(NETNS_DIR),
        "VRAM_DOCKERD_NETNS": NETNS,
        "DOCKER_HOST": f"unix://{NETNS_DIR / 'docker.sock'}",
    }
    try:
        dockerd("start", env)
        child_env = {**os.environ, **env}
        child_env.pop("DOCKER_CONTEXT", None)
        if subprocess.run(
            ["docker", "image", "inspect", base_image],
            env=child_env, capture_output=True, timeout=60, check=False,
        ).returncode != 0:  # fmt: skip
            loaded = subprocess.run(
                f"docker save {base_image} | DOCKER_HOST={env['DOCKER_HOST']} docker load",
                shell=True, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            if loaded.returncode != 0:
                fail(f"Loading {base_image} into the namespaced engine failed:\n{loaded.stderr}")
        child = subprocess.run(
            [
                "nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-m", "pytest",
                "-q", "-p", "no:cacheprovider", "-rfEs", nodeid,
            ],
            cwd=REPO, env=child_env, capture_output=True, text=True,
            timeout=CHILD_TIMEOUT_S, check=False,
        )  # fmt: skip
        output = child.stdout + child.stderr
        print(f"run on the engine in network namespace {NETNS}:\n{tail(output, 40)}")
        if child.returncode != 0 or "1 passed" not in output:
            fail(f"In the namespaced engine, the test exited {child.returncode}:\n{output}")
    finally:
        dockerd("stop", env)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)


def test_the_supervisor_survives_a_daemon_restart_and_resyncs(
    docker_host: str, base_image: str, request: pytest.FixtureRequest
) -> None:
    if not engine_is_ours(docker_host):
        run_in_a_namespaced_engine(request.node.nodeid, base_image)
        return
    # First, so that its teardown (engine up, others' containers started again) runs after
    # the supervisor has stopped and this test's containers are gone.
    request.getfixturevalue("restorable_engine")
    request.getfixturevalue("isolated_engine")
    sims: Sims = request.getfixturevalue("sims")
    start_supervisor: Callable[..., Supervisor] = request.getfixturevalue("start_supervisor")
    survive_a_daemon_restart(sims, start_supervisor, docker_host)


def survive_a_daemon_restart(
    sims: Sims, start_supervisor: Callable[..., Supervisor], docker_host: str
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
