"""Restarting ComfyUI through the daemon's own probe: Docker is asked again just before,
and the VRAM is read afterwards, so the outcome says what the restart achieved."""

from __future__ import annotations

from dataclasses import replace

from supervisor.config import Settings
from supervisor.errors import ServiceError
from supervisor.model import FreeResult, RestartComfy
from supervisor.policy import DEAD_API_CHECKS
from tests.daemon.conftest import World, comfy_api_figure, has
from tests.daemon.fakes import GIB, FakeComfy

COMFY = "comfyui/comfyui"
HELD = FakeComfy.CONTEXT_BYTES + 11 * GIB


def restart_releases(world: World, new_pid: int = 4343) -> None:
    def on_restart(container_id: str) -> None:
        world.comfy.restart(new_pid)
        world.docker.containers["comfyui"].pids = (new_pid,)

    world.docker.on_restart = on_restart


def test_a_restart_is_verified_on_the_new_processes(world: World, logs: list[str]) -> None:
    restart_releases(world)
    daemon = world.daemon()
    daemon.observe()
    outcome = daemon.actor.execute(RestartComfy(COMFY, "pinned after a hard free"))
    assert outcome.ok and outcome.result is FreeResult.FREED
    # NVML memory of the new process (its PIDs listed again), not a guess.
    assert (outcome.before_bytes, outcome.after_bytes) == (HELD, FakeComfy.CONTEXT_BYTES)
    assert has(logs, "Restarted ComfyUI container comfyui: pinned after a hard free")
    assert has(logs, "ComfyUI comfyui after the restart: 11.3 GiB -> 300 MiB")


def test_a_restart_that_gives_nothing_back_is_pinned_not_freed(
    world: World, logs: list[str]
) -> None:
    """Before, any restart Docker accepted was reported FREED without a reading."""
    daemon = world.daemon()  # the fake restart changes nothing: the memory stays held
    daemon.observe()
    outcome = daemon.actor.execute(RestartComfy(COMFY, "pinned"))
    assert world.docker.restarts == ["id-comfyui"]
    assert not outcome.ok and outcome.result is FreeResult.PINNED
    assert outcome.before_bytes == outcome.after_bytes == HELD
    assert "still holds 11.3 GiB" in outcome.detail
    # Watched for VRAM_VERIFY_TIMEOUT, no longer.
    assert outcome.duration_s <= Settings().verify_timeout_s + 1


def test_a_container_stopped_since_the_last_pass_is_never_started(world: World) -> None:
    daemon = world.daemon()
    daemon.observe()
    world.docker.containers["comfyui"].status = "exited"  # the user stopped it meanwhile
    outcome = daemon.actor.execute(RestartComfy(COMFY, "pinned"))
    assert not outcome.ok and "never started" in outcome.detail
    assert world.docker.restarts == []


def test_a_container_recreated_since_the_last_pass_is_not_restarted(world: World) -> None:
    daemon = world.daemon()
    daemon.observe()
    container = world.docker.containers["comfyui"]
    container.spec = replace(container.spec, container_id="id-comfyui-2")
    outcome = daemon.actor.execute(RestartComfy(COMFY, "pinned"))
    assert not outcome.ok and "recreated" in outcome.detail
    assert world.docker.restarts == []


def test_a_hung_comfyui_restart_is_verified_through_its_api_once_it_answers(
    world: World,
) -> None:
    """No per-process NVML memory (WDDM) and a hung API before: after the restart the
    reading is torch's reserved bytes from /system_stats."""
    world.reader.process_memory = False
    restart_releases(world)
    daemon = world.daemon()
    daemon.observe()
    world.comfy.fail = ServiceError("comfyui", "GET /queue: timed out")
    for _ in range(DEAD_API_CHECKS):
        daemon.observe()
    assert COMFY in daemon.actor.targets().dead_comfyuis
    outcome = daemon.actor.execute(RestartComfy(COMFY, "its API is dead"))
    assert outcome.ok and outcome.result is FreeResult.FREED
    # torch reserved of the fresh process, or (Dynamic VRAM) the device bound: its context.
    assert (outcome.after_bytes or 0) <= comfy_api_figure(world, 0)[1]
