"""DockerAdapter and DockerEvents against the real engine.

Every container runs on the host network (conftest's `run_container`), binds 127.0.0.1 on a
port from this module's block (18300-18399) and is removed at teardown. Other tests may run
labelled containers on the same engine at the same time, so every assertion looks only at
containers this module named.
"""

from __future__ import annotations

import os
import queue
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
from docker.models.containers import Container
from loguru import logger

from supervisor.docker import DockerAdapter, DockerEvents
from supervisor.model import ContainerState, Role, ServiceHealth

pytestmark = pytest.mark.integration

HTTP_PORT = 18301
EVENT_TIMEOUT_S = 30.0

# A real HTTP server with a real healthcheck that asks it.
HEALTHCHECK = {
    "test": [
        "CMD",
        "python3",
        "-c",
        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/')",
    ],
    "interval": 250_000_000,  # ns
    "timeout": 2_000_000_000,
    "retries": 3,
    "start_period": 0,
}


def unique(role: str) -> str:
    return f"vs-it-{uuid.uuid4().hex[:8]}-{role}"


@pytest.fixture
def factory(docker_host: str) -> Callable[[], docker.DockerClient]:
    """Fresh clients to the test engine (the adapters close the ones they build)."""
    return lambda: docker.DockerClient(base_url=docker_host, timeout=30)


@pytest.fixture
def adapter(factory: Callable[[], docker.DockerClient]) -> Iterator[DockerAdapter]:
    # The tests run on the host: the supervisor is not in a container here.
    adapter = DockerAdapter(client_factory=factory, own_container_id=lambda: None)
    yield adapter
    adapter.close()


def ours(adapter: DockerAdapter, *names: str) -> dict[str, ContainerState]:
    return {s.spec.name: s for s in adapter.list_services() if s.spec.name in names}


def test_discovers_labelled_containers_on_the_host_network(
    adapter: DockerAdapter,
    docker_client: docker.DockerClient,
    run_container: Callable[..., Container],
    base_image: str,
    wait_healthy: Callable[..., None],
    poll: Callable[..., bool],
) -> None:
    ollama, comfy, bad, plain = unique("ollama"), unique("comfyui"), unique("bad"), unique("x")
    run_container(
        base_image, ["sleep", "infinity"], name=ollama, init=True,
        labels={"vram-supervisor.role": "ollama"},
    )  # fmt: skip
    comfy_c = run_container(
        base_image,
        ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(HTTP_PORT)],
        name=comfy,
        init=True,
        healthcheck=HEALTHCHECK,
        labels={
            "vram-supervisor.role": "comfyui",
            "vram-supervisor.url": f"http://127.0.0.1:{HTTP_PORT}",
            "vram-supervisor.restart": "false",
        },
    )
    run_container(
        base_image, ["sleep", "infinity"], name=bad, init=True,
        labels={"vram-supervisor.role": "stable-diffusion"},
    )  # fmt: skip
    run_container(base_image, ["sleep", "infinity"], name=plain, init=True)

    found = ours(adapter, ollama, comfy, bad, plain)
    assert set(found) == {ollama, comfy}  # unlabelled and badly labelled ones are left out
    o, c = found[ollama], found[comfy]
    assert o.spec.role == Role.OLLAMA and c.spec.role == Role.COMFYUI
    assert o.spec.url == "http://127.0.0.1:11434"  # host network: loopback, default port
    assert c.spec.url == f"http://127.0.0.1:{HTTP_PORT}"  # the url label wins
    assert c.spec.restart_allowed is False and o.spec.restart_allowed is None
    assert c.spec.container_id == comfy_c.id
    assert o.is_running and o.health is ServiceHealth.NONE  # no healthcheck
    assert o.spec.gpu_uuids == ()
    # State.Pid is a host PID: it exists in this (the host's) PID namespace.
    assert o.pid > 0 and os.path.exists(f"/proc/{o.pid}")

    wait_healthy(comfy_c)
    assert ours(adapter, comfy)[comfy].health is ServiceHealth.HEALTHY

    # docker top gives host PIDs, including the init process Docker reports as State.Pid.
    pids = adapter.container_pids(comfy_c.id)
    assert found[comfy].pid in pids or ours(adapter, comfy)[comfy].pid in pids
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)

    # The label as it is now (what the Actor reads right before acting).
    assert adapter.role_label(comfy_c.id) == "comfyui"
    plain_id = docker_client.containers.get(plain).id
    assert adapter.role_label(plain_id) is None

    comfy_c.stop(timeout=5)
    stopped = ours(adapter, comfy)[comfy]
    assert stopped.status == "exited" and not stopped.is_running and stopped.pid == 0
    assert adapter.container_pids(comfy_c.id) == ()
    comfy_c.remove()
    assert adapter.role_label(comfy_c.id) is None  # gone


def test_restart_gives_a_new_process_and_recreate_a_new_id(
    adapter: DockerAdapter,
    docker_client: docker.DockerClient,
    run_container: Callable[..., Container],
    base_image: str,
) -> None:
    name = unique("comfyui")
    labels = {"vram-supervisor.role": "comfyui"}
    first = run_container(base_image, ["sleep", "infinity"], name=name, init=True, labels=labels)
    before = ours(adapter, name)[name]

    adapter.restart(first.id, 2)
    after = ours(adapter, name)[name]
    assert after.is_running and after.spec.container_id == first.id
    assert after.pid != before.pid

    first.remove(force=True)
    assert ours(adapter, name) == {}
    second = run_container(base_image, ["sleep", "infinity"], name=name, init=True, labels=labels)
    again = ours(adapter, name)[name]
    assert again.spec.container_id == second.id != first.id
    assert again.spec.key == before.spec.key  # cooldowns keyed by role/name survive


def test_events_for_start_health_rename_stop_and_destroy(
    factory: Callable[[], docker.DockerClient],
    run_container: Callable[..., Container],
    base_image: str,
) -> None:
    got: queue.Queue[str] = queue.Queue()
    source = DockerEvents(client_factory=factory)
    source.start(got.put)
    try:
        assert got.get(timeout=EVENT_TIMEOUT_S) == "resync"
        assert source.connected

        name, renamed = unique("comfyui"), unique("renamed")
        container = run_container(
            base_image,
            ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(HTTP_PORT + 1)],
            name=name,
            init=True,
            healthcheck={
                **HEALTHCHECK,
                "test": [
                    "CMD",
                    "python3",
                    "-c",
                    "import urllib.request; "
                    f"urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT + 1}/')",
                ],
            },
            labels={"vram-supervisor.role": "comfyui"},
        )
        expect(got, f"start {name}")
        expect(got, f"health_status: healthy {name}")
        container.rename(renamed)
        expect(got, f"rename {renamed}")
        container.stop(timeout=5)
        # Engine 20.10 sends die then stop; Engine 26 can send stop first.
        expect(got, f"die {renamed}", f"stop {renamed}")
        container.remove()
        expect(got, f"destroy {renamed}")
        assert source.events_seen >= 6
        assert source.reconnects == 0
    finally:
        source.stop(timeout_s=10)
    # stop() closed the real CancellableStream from this thread: the reader ended.
    assert not source.is_alive and not source.connected


def test_unlabelled_containers_make_no_events(
    factory: Callable[[], docker.DockerClient],
    run_container: Callable[..., Container],
    base_image: str,
) -> None:
    got: queue.Queue[str] = queue.Queue()
    source = DockerEvents(client_factory=factory)
    source.start(got.put)
    try:
        assert got.get(timeout=EVENT_TIMEOUT_S) == "resync"
        plain, marker = unique("plain"), unique("ollama")
        run_container(base_image, ["sleep", "infinity"], name=plain, init=True)
        # A labelled container started afterwards proves the stream was live meanwhile.
        run_container(
            base_image, ["sleep", "infinity"], name=marker, init=True,
            labels={"vram-supervisor.role": "ollama"},
        )  # fmt: skip
        seen = expect(got, f"start {marker}")
        assert not [m for m in seen if plain in m]
    finally:
        source.stop(timeout_s=10)


def test_bad_label_on_a_real_container_is_logged_once(
    adapter: DockerAdapter, run_container: Callable[..., Container], base_image: str
) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        name = unique("typo")
        run_container(
            base_image, ["sleep", "infinity"], name=name, init=True,
            labels={"vram-supervisor.role": "comfyui", "vram-supervisor.restart": "perhaps"},
        )  # fmt: skip
        for _ in range(3):
            assert ours(adapter, name) == {}
    finally:
        logger.remove(sink)
    mine = [line for line in lines if name in line]
    assert len(mine) == 1 and "vram-supervisor.restart='perhaps'" in mine[0]


def expect(got: queue.Queue[str], *messages: str) -> list[str]:
    """Wait until every one of `messages` came, in any order; returns everything seen up to
    then (other tests' events included)."""
    seen: list[str] = []
    missing = set(messages)
    while missing:
        try:
            item: Any = got.get(timeout=EVENT_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"no event {sorted(missing)} within {EVENT_TIMEOUT_S:g}s; saw {seen}")
        seen.append(item)
        missing.discard(item)
    return seen
