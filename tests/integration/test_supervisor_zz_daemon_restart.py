"""The Docker daemon stops and starts under a running supervisor: it survives and resyncs.

This module restarts the test engine itself (tests/lib/dockerd.sh stop / start), so it runs
last (`zz` in its name) and puts the engine back up afterwards even when the test fails,
restarting the containers of others that ran before.

Which engine it restarts: only tests/lib/dockerd.sh's private engine. On any other engine
(a developer's Docker, which must never be restarted) it runs itself again on a private
engine in its own network namespace: see namespaced_engine.py.

What a user relies on: the supervisor process does not die or wedge when Docker goes away;
/healthz stays up (it keeps supervising what it knew); once Docker is back it reconnects to
the events stream, finds the containers that came back and new ones, and acts again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.harness import (
    Sims,
    Supervisor,
    comfy_hold_vram,
    freed_on,
    ollama_load,
    wait_until,
)
from tests.integration.namespaced_engine import (
    DELEGATING_TIMEOUT_S,
    dockerd,
    engine_answers,
    engine_is_ours,
    restored_engine,
    run_in_a_namespaced_engine,
)

pytest_plugins = ["tests.integration.harness"]
pytestmark = [pytest.mark.integration]

ALWAYS = {"Name": "always"}


@pytest.fixture
def restorable_engine(docker_host: str) -> Iterator[None]:
    """The private engine, which the test may stop: teardown makes sure it is up again."""
    with restored_engine(docker_host):
        yield


def docker_state(sup: Supervisor) -> str:
    return str(sup.status()["docker"]["state"])


def reachable(sup: Supervisor, role: str, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        entry = sup.service(role, name)
        return entry if entry and entry["reachable"] else None

    return check


@pytest.mark.timeout(DELEGATING_TIMEOUT_S)
def test_the_supervisor_survives_a_daemon_restart_and_resyncs(
    docker_host: str, base_image: str, request: pytest.FixtureRequest
) -> None:
    if not engine_is_ours(docker_host):
        run_in_a_namespaced_engine(request.node.nodeid, base_image, "restarts the Docker engine")
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
