"""Tests that change the engine itself (restart it, make it a swarm node) run only on an
engine this test run may change: tests/lib/dockerd.sh's private engine.

When the suite runs on any other engine (a developer's Docker, which must not be restarted
or turned into a swarm node), such a test calls `run_in_a_namespaced_engine`: it starts a
private engine of its own in its own network namespace (tests/lib/dockerd.sh with
VRAM_DOCKERD_NETNS; data kept in /tmp/vram-supervisor-dockerd-netns so the base image is
loaded only once), and runs the same test again there: a child pytest under
`nsenter --net=...`, since the containers' 127.0.0.1 (host network) is that namespace's.
The test passes or fails with that run; the engine is stopped and the namespace deleted
afterwards. Where no such engine can be started (not root; dockerd, ip or nsenter missing)
the test skips, naming what is missing; under CI (CI set) it fails instead, as a CI machine
must run it.

Time: the delegating test may take starting the engine, loading the base image, the child
run and stopping the engine, each with its own limit. Mark it with
`@pytest.mark.timeout(DELEGATING_TIMEOUT_S)` (their sum), so pytest-timeout's global 300 s
does not kill it mid-run with no output of the child's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.errors import APIError, DockerException, NotFound

from tests.integration.harness import HARNESS_LABEL, REPO, fail, tail

DOCKERD_SH = REPO / "tests" / "lib" / "dockerd.sh"
DOCKERD_DIR = Path(os.environ.get("VRAM_DOCKERD_DIR", "/tmp/vram-supervisor-dockerd"))
NETNS = "vram-supervisor-test-engine"
NETNS_DIR = Path("/tmp/vram-supervisor-dockerd-netns")
DOCKERD_TIMEOUT_S = 90  # tests/lib/dockerd.sh start or stop
LOAD_TIMEOUT_S = 300  # docker save | docker load of the base image
CHILD_TIMEOUT_S = 400  # the child pytest (its own per-test limit is the global 300 s)
DELEGATING_TIMEOUT_S = 2 * DOCKERD_TIMEOUT_S + 60 + LOAD_TIMEOUT_S + CHILD_TIMEOUT_S + 60


def engine_is_ours(docker_host: str) -> bool:
    """The engine is dockerd.sh's (started from DOCKERD_DIR): a test may change it."""
    own = f"unix://{DOCKERD_DIR / 'docker.sock'}"
    return docker_host == own and (DOCKERD_DIR / "docker.pid").exists()


def engine_answers(docker_host: str) -> bool:
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=10)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, OSError):
        return False


@contextlib.contextmanager
def restored_engine(docker_host: str) -> Iterator[None]:
    """Around code that may stop the private engine: afterwards (even on failure) the engine
    is up again and the containers of others that ran before (not the harness's, which
    their own tests remove) run again, so the engine is left as it was found."""
    if not engine_is_ours(docker_host):
        fail(f"{docker_host} is not tests/lib/dockerd.sh's engine from {DOCKERD_DIR}")
    client = docker.DockerClient(base_url=docker_host, timeout=30)
    try:
        others = [
            c.id
            for c in client.containers.list()
            if not (c.labels or {}).get(HARNESS_LABEL) and c.status in ("running", "paused")
        ]
    finally:
        client.close()
    try:
        yield
    finally:
        if not engine_answers(docker_host):
            dockerd("start")
        start_again(docker_host, [c for c in others if c])


def start_again(docker_host: str, container_ids: list[str]) -> None:
    """Start those of `container_ids` that exited (a daemon restart stopped them)."""
    client = docker.DockerClient(base_url=docker_host, timeout=30)
    try:
        for container_id in container_ids:
            try:
                container = client.containers.get(container_id)
                if container.status == "exited":
                    container.start()
            except (APIError, NotFound) as exc:
                print(f"could not start {container_id[:12]} again: {exc}")
    finally:
        client.close()


def dockerd(command: str, env: dict[str, str] | None = None) -> None:
    """tests/lib/dockerd.sh COMMAND (start/stop), failing the test with the daemon's log."""
    done = subprocess.run(
        [str(DOCKERD_SH), command],
        capture_output=True,
        text=True,
        timeout=DOCKERD_TIMEOUT_S,
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


def missing_for_a_namespaced_engine() -> list[str]:
    missing = [tool for tool in ("dockerd", "ip", "nsenter") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def run_in_a_namespaced_engine(nodeid: str, base_image: str, what: str) -> None:
    """Run test `nodeid` again on a private engine in its own network namespace.

    `what` says what the test does to the engine ("restarts the Docker engine"), for the
    skip message. The child run gets `base_image` (loaded from the engine in use when the
    namespaced engine lacks it) and builds anything else itself."""
    missing = missing_for_a_namespaced_engine()
    if missing:
        message = (
            f"This test {what}. The engine in use was not started by tests/lib/dockerd.sh, "
            "so it is left alone; a private engine in its own network namespace would do, "
            f"but that needs {', '.join(missing)}"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message} (under CI this test must run)")
        pytest.skip(message)
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
                shell=True, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S, check=False,
            )  # fmt: skip
            if loaded.returncode != 0:
                fail(f"Loading {base_image} into the namespaced engine failed:\n{loaded.stderr}")
        child = subprocess.run(
            [
                "nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-m", "pytest",
                "-q", "-s", "-p", "no:cacheprovider", "-rfEs", nodeid,
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
