"""compose/stack.swarm.yml on a real (single-node) Docker Swarm.

What a user relies on: `docker stack deploy -c compose/stack.swarm.yml` starts one
supervisor task on each node labelled gpu=true (a global service); it
discovers the labelled containers of other stacks' services on its node (the labels under
`labels:`, not `deploy.labels:`), frees ComfyUI when Ollama needs room, and
`docker service logs` shows the lines the docs tell people to look for.

The swarm is this test's own: `docker swarm init --advertise-addr 127.0.0.1` on the test
engine, and `docker swarm leave --force` afterwards whatever happened (and the
docker_gwbridge network Swarm leaves behind is removed when it was not there before). An
engine that is already part of a swarm is not touched: the test skips, saying so. On an
engine that tests/lib/dockerd.sh did not start (a developer's Docker, which this test must
not turn into a swarm node), it runs itself on a private engine in its own network
namespace instead (namespaced_engine.py).
Everything runs on the node's network on 127.0.0.1 (ports 19411-19415 of this file).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from tests.integration.harness import (
    REPO,
    SimApi,
    comfy_hold_vram,
    fail,
    freed_on,
    ollama_load,
    tail,
    wait_until,
)
from tests.integration.namespaced_engine import (
    DELEGATING_TIMEOUT_S,
    engine_is_ours,
    run_in_a_namespaced_engine,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration]

STACK_FILE = REPO / "compose" / "stack.swarm.yml"
TEST_ADDITIONS = REPO / "tests" / "integration" / "stack.swarm-test.yml"
SIMS_FILE = REPO / "tests" / "integration" / "stack.swarm-sims.yml"
SIMS_STACK = "vramsup-swarm-sims"
SUPERVISOR_STACK = "vramsup-swarm"
SUPERVISOR_SERVICE = f"{SUPERVISOR_STACK}_vram-supervisor"
OLLAMA_PORT, COMFYUI_PORT, HIDDEN_PORT, HTTP_PORT = 19411, 19412, 19413, 19415


def docker_cli(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and done.returncode != 0:
        fail(f"`docker {shlex.join(args)}` exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def stack_containers(client: docker.DockerClient, *stacks: str) -> list[Container]:
    # sparse: no inspect per container, which races with Swarm removing a task's container
    # (404 No such container between the list and the inspect).
    return [
        c
        for stack in stacks
        for c in client.containers.list(
            all=True, sparse=True, filters={"label": f"com.docker.stack.namespace={stack}"}
        )
    ]


@pytest.fixture
def swarm(docker_client: docker.DockerClient) -> Iterator[str]:
    """A single-node swarm on the test engine, node labelled as a GPU node; left after."""
    state = docker_client.info()["Swarm"]["LocalNodeState"]
    if state != "inactive":
        pytest.skip(
            f"The engine is already a swarm node (state {state!r}); this test makes a "
            "single-node swarm of its own and leaves it afterwards, which would take this "
            "engine out of that swarm"
        )
    had_gwbridge = bool(docker_client.networks.list(names=["docker_gwbridge"]))
    try:
        docker_cli("swarm", "init", "--advertise-addr", "127.0.0.1")
        node = docker_client.info()["Swarm"]["NodeID"]
        docker_cli("node", "update", "--label-add", "gpu=true", node)
        yield node
    finally:
        try:
            docker_cli("stack", "rm", SUPERVISOR_STACK, SIMS_STACK, check=False)
            deadline = time.monotonic() + 60
            while stack_containers(docker_client, SUPERVISOR_STACK, SIMS_STACK):
                if time.monotonic() > deadline:
                    for container in stack_containers(docker_client, SUPERVISOR_STACK, SIMS_STACK):
                        with contextlib.suppress(APIError, NotFound):
                            container.remove(force=True)
                    break
                time.sleep(0.5)
        finally:  # never leave the engine a swarm node, whatever failed above
            print(docker_cli("swarm", "leave", "--force", check=False))
            if not had_gwbridge:
                with contextlib.suppress(APIError, NotFound):
                    for network in docker_client.networks.list(names=["docker_gwbridge"]):
                        network.remove()


@dataclass
class TaskSim(SimApi):
    """A simulated service running as a Swarm task (its container found by service name)."""

    role: str
    name: str
    port: int
    container: Container

    def logs(self) -> str:
        try:
            raw: bytes = self.container.logs()
        except (APIError, NotFound) as exc:
            return f"(no logs: {exc})"
        return raw.decode(errors="replace")

    def state(self) -> str:
        try:
            self.container.reload()
            return str(self.container.attrs["State"]["Status"])
        except (APIError, NotFound) as exc:
            return f"gone ({exc.__class__.__name__})"


def task_sim(client: docker.DockerClient, service: str, role: str, port: int) -> TaskSim:
    def running() -> Container | None:
        found = client.containers.list(
            filters={"label": f"com.docker.swarm.service.name={SIMS_STACK}_{service}"}
        )
        return found[0] if found else None

    container: Container = wait_until(running, 60, f"a running task of {service}")
    sim = TaskSim(role, str(container.name), port, container)
    sim.wait_ready(30)
    return sim


def service_log_messages() -> list[str]:
    """The supervisor's messages from `docker service logs` (text format: time | level |)."""
    raw = docker_cli("service", "logs", "--raw", "--no-trunc", SUPERVISOR_SERVICE)
    return [line.split(" | ", 2)[2] for line in raw.splitlines() if line.count(" | ") >= 2]


def wait_for_log(pattern: str | re.Pattern[str], timeout_s: float) -> str:
    regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern

    def found() -> str | None:
        return next((m for m in service_log_messages() if regex.search(m)), None)

    try:
        line: str = wait_until(found, timeout_s, f"{regex.pattern!r} in docker service logs")
    except AssertionError as exc:
        fail(f"{exc}\n{tail(chr(10).join(service_log_messages()), 40)}")
        raise
    return line


@pytest.mark.timeout(DELEGATING_TIMEOUT_S)
def test_a_global_service_supervises_the_labelled_tasks_of_its_node(
    docker_host: str, base_image: str, request: pytest.FixtureRequest
) -> None:
    if not engine_is_ours(docker_host):
        what = "makes the Docker engine a swarm node"
        run_in_a_namespaced_engine(request.node.nodeid, base_image, what)
        return
    request.getfixturevalue("isolated_engine")
    request.getfixturevalue("swarm")
    deploy_and_supervise(
        request.getfixturevalue("project_image"),
        request.getfixturevalue("docker_client"),
        docker_host,
        request.getfixturevalue("tmp_path"),
    )


def deploy_and_supervise(
    project_image: str, docker_client: docker.DockerClient, docker_host: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "gpu-state"
    state_dir.mkdir()
    state_dir.chmod(0o777)  # the sims run as uid 10001
    if not docker_host.startswith("unix://"):
        fail(f"The stack mounts the engine's unix socket; DOCKER_HOST is {docker_host}")
    env = {
        "VRAM_IMAGE": project_image,
        "VRAM_SIM_STATE": str(state_dir),
        "VRAM_SIM_OLLAMA_PORT": str(OLLAMA_PORT),
        "VRAM_SIM_COMFYUI_PORT": str(COMFYUI_PORT),
        "VRAM_SIM_HIDDEN_PORT": str(HIDDEN_PORT),
        # What a user exports for compose/stack.swarm.yml:
        "VRAM_SUPERVISOR_IMAGE": project_image,
        "DOCKER_SOCKET": docker_host.removeprefix("unix://"),
        "VRAM_HTTP_PORT": str(HTTP_PORT),
    }
    os.environ.update(env)
    try:
        started = time.monotonic()
        docker_cli("stack", "deploy", "-c", str(SIMS_FILE), SIMS_STACK)
        docker_cli(
            "stack", "deploy", "-c", str(STACK_FILE), "-c", str(TEST_ADDITIONS), SUPERVISOR_STACK
        )
    finally:
        for key in env:
            os.environ.pop(key, None)

    ollama = task_sim(docker_client, "fake-ollama", "ollama", OLLAMA_PORT)
    comfy = task_sim(docker_client, "fake-comfyui", "comfyui", COMFYUI_PORT)
    hidden = task_sim(docker_client, "fake-ollama-service-label", "ollama", HIDDEN_PORT)

    wait_for_log(f"Discovered ollama container {ollama.name} at {ollama.url}", 60)
    wait_for_log(f"Discovered comfyui container {comfy.name} at {comfy.url}", 20)
    discovered_s = time.monotonic() - started

    # One task of the global service, on this (the only GPU-labelled) node.
    tasks = docker_cli(
        "service", "ps", "--filter", "desired-state=running", "--format",
        "{{.Node}} {{.CurrentState}}", SUPERVISOR_SERVICE,
    ).splitlines()  # fmt: skip
    assert len(tasks) == 1 and tasks[0].split()[1] == "Running", tasks

    comfy_hold_vram(comfy, 10)
    ollama_load(ollama, "llama3.1:8b")
    freed = wait_for_log(freed_on(comfy.name), 30)
    freed_s = time.monotonic() - started

    messages = service_log_messages()
    # deploy.labels are on the service, not on its container: not discovered.
    assert not [m for m in messages if hidden.name in m], messages
    assert not [m for m in messages if m.startswith(("ERROR", "CRITICAL"))]
    print(
        f"\nswarm: deploy to both discovered {discovered_s:.1f}s, to freed {freed_s:.1f}s\n"
        f"freed line: {freed}\n`docker service logs {SUPERVISOR_SERVICE}`:\n"
        + tail(docker_cli("service", "logs", "--no-trunc", SUPERVISOR_SERVICE), 30)
    )
