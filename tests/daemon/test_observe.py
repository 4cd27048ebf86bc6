"""Observation details the loop tests do not cover: GPUs Docker granted by index."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from supervisor.errors import DockerUnavailable, ServiceError
from supervisor.model import ComfyMode, FreeComfy, FreeResult, FreeStage, GpuMemory, VramSource
from supervisor.observe import resolve_gpu_ids
from tests.daemon.conftest import World, comfy_api_figure, has
from tests.daemon.fakes import GIB, FakeComfy

GPUS = (
    GpuMemory("GPU-aaaa", 0, "A", 24 * GIB, 0, 24 * GIB),
    GpuMemory("GPU-bbbb", 1, "B", 24 * GIB, 0, 24 * GIB),
)


@pytest.mark.parametrize(
    ("ids", "source", "expected"),
    [
        ((), VramSource.NVML, ()),  # no grant: all GPUs
        (("0",), VramSource.NVML, ("GPU-aaaa",)),
        (("1", "0"), VramSource.NVML, ("GPU-bbbb", "GPU-aaaa")),
        (("GPU-bbbb",), VramSource.NVML, ("GPU-bbbb",)),  # a UUID stays
        (("0", "GPU-aaaa"), VramSource.NVML, ("GPU-aaaa",)),  # no duplicate
        (("GPU-cccc",), VramSource.NVML, ("GPU-cccc",)),  # a UUID NVML does not show: not ours
        (("7",), VramSource.NVML, ()),  # an index NVML does not show: cannot tell, so all
        (("0", "7"), VramSource.NVML, ()),
        (("MIG-1234",), VramSource.NVML, ()),
        (("0",), VramSource.API, ()),  # API source: one pseudo GPU, so all
        (("GPU-aaaa",), VramSource.API, ()),
        (("0",), VramSource.NONE, ()),
    ],
)
def test_resolve_gpu_ids(
    ids: tuple[str, ...], source: VramSource, expected: tuple[str, ...]
) -> None:
    assert resolve_gpu_ids(ids, GPUS, source) == expected


def grant_comfyui_gpu(world: World, *ids: str) -> None:
    container = world.docker.containers["comfyui"]
    container.spec = replace(container.spec, gpu_uuids=ids)


def test_a_comfyui_granted_gpu_0_by_index_is_freed_by_the_gate(world: World) -> None:
    """`device_ids: ["0"]` in compose: the gate still finds the ComfyUI on Ollama's GPU
    (before, "0" never matched a UUID and the gate freed nothing)."""
    grant_comfyui_gpu(world, "0")
    world.ollama.load("llama3.2:latest")
    daemon = world.daemon()
    obs = daemon.observe()
    assert obs.comfyuis[0].status.spec.gpu_uuids == (world.gpu.uuid,)
    need = world.gpu.free_bytes + 8 * GIB
    assert daemon.room_maker.make_room(need, reason="gate: load", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]


def test_a_gpu_index_nvml_cannot_resolve_means_every_gpu_with_one_warning(
    world: World, logs: list[str]
) -> None:
    """The supervisor sees fewer GPUs than the host (granted a subset): ComfyUI's index
    "1" matches none. Before, it stayed "1", matched no GPU, and the ComfyUI was silently
    never freed for Ollama."""
    grant_comfyui_gpu(world, "1")
    world.ollama.load("llama3.2:latest")
    daemon = world.daemon()
    obs = daemon.observe()
    daemon.observe()
    assert obs.comfyuis[0].status.spec.gpu_uuids == ()
    warning = "Docker granted comfyui container comfyui GPU '1', which NVML does not show"
    assert sum(warning in line for line in logs) == 1
    need = world.gpu.free_bytes + 8 * GIB
    assert daemon.room_maker.make_room(need, reason="gate: load", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]


def test_without_nvml_a_gpu_index_means_every_gpu(world: World) -> None:
    grant_comfyui_gpu(world, "0")
    obs = world.daemon(nvml=False).observe()
    assert obs.source is VramSource.API
    assert obs.comfyuis[0].status.spec.gpu_uuids == ()


def test_a_container_recreated_between_two_listings_is_announced_again(
    world: World, logs: list[str]
) -> None:
    """`docker compose up` recreates a container (new id, same name) faster than one pass:
    no listing ever sees it stopped. It is still a new container: announced again, and
    judged with a fresh failure count rather than its predecessor's."""
    daemon = world.daemon()
    daemon.observe()
    announced = "Discovered comfyui container comfyui at http://comfyui:8188"
    assert sum(announced in line for line in logs) == 1
    container = world.docker.containers["comfyui"]
    container.spec = replace(container.spec, container_id="id-comfyui-recreated")
    daemon.on_docker_event("start comfyui")  # the new container's start event
    obs = daemon.observe()
    assert sum(announced in line for line in logs) == 2
    assert obs.comfyuis[0].status.spec.container_id == "id-comfyui-recreated"
    daemon.observe()
    assert sum(announced in line for line in logs) == 2  # announced once, not every pass


def test_ollamas_generation_is_read_once_and_again_when_its_container_is_recreated(
    world: World, logs: list[str]
) -> None:
    """An upgrade to Ollama >= 0.30 recreates its container: the supervisor reads the
    version again, with the new container's settings, and logs what changed."""
    daemon = world.daemon()
    obs = daemon.observe()
    daemon.observe()
    assert (obs.ollamas[0].version, obs.ollamas[0].fit_target_bytes) == ("0.12.5", 0)
    assert world.ollama.version_calls == 1  # once per container, not every pass
    assert any("Ollama ollama is version 0.12.5: ollama runner (< 0.15.5)" in x for x in logs)

    world.ollama.version_text = "0.33.0"
    container = world.docker.containers["ollama"]
    settings = (("LLAMA_ARG_FIT_TARGET", "2048"), ("OLLAMA_CONTEXT_LENGTH", "8192"))
    container.spec = replace(container.spec, container_id="id-ollama-2", env=settings)
    daemon.on_docker_event("start ollama")
    obs = daemon.observe()
    assert (obs.ollamas[0].version, obs.ollamas[0].fit_target_bytes) == ("0.33.0", 2 * GIB)
    profile = daemon.room_maker.load_profile()
    assert profile is not None and profile.params.default_num_ctx == 8192
    upgraded = "Ollama ollama is now version 0.33.0: llama-server runners (>= 0.30)"
    assert sum(upgraded in line for line in logs) == 1
    daemon.observe()
    assert sum(upgraded in line for line in logs) == 1 and world.ollama.version_calls == 2


@pytest.mark.parametrize("host", ["wsl2: no processes", "wddm: no memory figure"])
def test_without_per_process_memory_a_stuck_comfyui_is_pinned_not_nothing_held(
    world: World, host: str
) -> None:
    """NVML works for the device but says nothing per process: ComfyUI's own figure
    (torch reserved) is used, so a ComfyUI that keeps 11 GiB is PINNED and escalated,
    not classed "nothing held" from a sum of no figures."""
    if host.startswith("wsl2"):
        world.reader.lists_processes = False
    else:
        world.reader.process_memory = False
    world.comfy.stuck = True  # a leak: /free releases nothing
    world.ollama.load("llama3.2:latest")
    daemon = world.daemon()
    obs = daemon.observe()
    assert obs.source is VramSource.NVML
    low, high = comfy_api_figure(world, 11 * GIB)  # torch reserved or the device bound
    assert low <= (obs.comfyuis[0].vram_bytes or 0) <= high  # not 0
    assert obs.ollamas[0].vram_bytes == 4 * GIB  # the sum of /api/ps size_vram, not 0
    outcome = daemon.actor.execute(FreeComfy("comfyui/comfyui", FreeStage.SOFT, "test"))
    assert outcome.result is FreeResult.PINNED
    assert outcome.before_bytes == outcome.after_bytes
    assert low <= (outcome.before_bytes or 0) <= high


def test_without_per_process_memory_a_free_is_still_verified(world: World) -> None:
    world.reader.process_memory = False
    daemon = world.daemon()
    daemon.observe()
    outcome = daemon.actor.execute(FreeComfy("comfyui/comfyui", FreeStage.SOFT, "test"))
    assert outcome.result is FreeResult.FREED
    low, high = comfy_api_figure(world, 11 * GIB)
    assert low <= (outcome.before_bytes or 0) <= high
    # Classic: torch reserved drops to 0. Dynamic VRAM: the bound (+ its context) is left.
    assert (outcome.after_bytes or 0) <= comfy_api_figure(world, 0)[1]


def test_an_observation_carries_the_wall_clock_time_of_its_pass(world: World) -> None:
    """The policy judges Ollama's expires_at (wall-clock RFC 3339) against it."""
    daemon = world.daemon(wall_clock=lambda: 1_767_225_600.0)
    assert daemon.observe().wall_at == 1_767_225_600.0


def test_a_docker_event_during_a_listing_is_not_lost(world: World) -> None:
    """The event may describe a change the listing under way did not see yet: the next
    pass lists again, without waiting for VRAM_CHECK_INTERVAL."""
    daemon = world.daemon()
    daemon.observe()
    world.docker.on_list = lambda: daemon.on_docker_event("start comfyui")
    daemon.on_docker_event("die comfyui")
    daemon.observe()  # lists; the "start" event arrives meanwhile
    world.docker.on_list = None
    listed = world.docker.list_calls
    daemon.observe()  # same instant: only the event can make it list
    assert world.docker.list_calls == listed + 1
    daemon.observe()
    assert world.docker.list_calls == listed + 1  # and only once


def test_a_failed_docker_listing_is_retried_next_pass(world: World) -> None:
    daemon = world.daemon()
    daemon.observe()
    world.docker.fail = DockerUnavailable("connection refused")
    daemon.on_docker_event("start comfyui")
    assert daemon.observe().docker_ok is False
    world.docker.fail = None
    listed = world.docker.list_calls
    assert daemon.observe().docker_ok is True
    assert world.docker.list_calls == listed + 1


def test_closing_the_daemon_closes_the_docker_client_it_built(world: World) -> None:
    daemon = world.daemon()
    daemon.observe()  # the Docker adapter is built on first use
    daemon.close()
    assert world.docker.closed


def test_an_upgraded_comfyui_is_detected_again_when_its_container_is_recreated(
    world: World, logs: list[str]
) -> None:
    """ComfyUI 0.3.64 upgraded to 0.38 (Dynamic VRAM) by recreating its container: the new
    generation and mode are logged once and carried by the observation and /status."""
    world.comfy.dynamic_vram = False
    daemon = world.daemon(nvml=False)
    obs = daemon.observe()
    assert obs.comfyuis[0].mode is ComfyMode.CLASSIC
    daemon.observe()
    old = "comfyui/comfyui: ComfyUI 0.3.64, classic VRAM"
    assert sum(old in line for line in logs) == 1  # said once, not every pass

    world.comfy.dynamic_vram = True
    container = world.docker.containers["comfyui"]
    container.spec = replace(container.spec, container_id="id-comfyui-upgraded")
    daemon.on_docker_event("start comfyui")
    obs = daemon.observe()
    daemon.observe()
    new = "comfyui/comfyui: ComfyUI 0.38.1, Dynamic VRAM (weights outside torch's figures)"
    assert sum(new in line for line in logs) == 1
    [comfy] = obs.comfyuis
    assert comfy.mode is ComfyMode.DYNAMIC and not comfy.vram_measured
    # Its torch figures show only the 1 GiB cache; the device bound shows the weights too.
    assert comfy.stats is not None and comfy.stats.torch_reserved_bytes == 1 * GIB
    assert (comfy.vram_bytes or 0) > 10 * GIB
    [shown] = daemon.snapshot()["comfyui"]
    assert (shown["mode"], shown["version"], shown["device_type"]) == (
        "dynamic-vram",
        "0.38.1",
        "cuda",
    )


def test_a_dynamic_vram_comfyui_is_measured_by_nvml_when_it_lists_processes(
    world: World,
) -> None:
    world.comfy.dynamic_vram = True
    obs = world.daemon().observe()
    [comfy] = obs.comfyuis
    assert comfy.vram_measured and comfy.mode is ComfyMode.DYNAMIC
    assert comfy.vram_bytes == 11 * GIB + FakeComfy.CONTEXT_BYTES  # NVML: weights + context


def test_a_dynamic_vram_figure_without_nvml_is_an_estimate_and_none_when_ollama_failed(
    world: World,
) -> None:
    """Without NVML the Dynamic-VRAM figure is bounded from the whole device: it is marked
    an estimate, and given no figure in a pass where Ollama's /api/ps failed (its weights
    would count as ComfyUI's)."""
    world.comfy.dynamic_vram = True
    daemon = world.daemon(nvml=False)
    [comfy] = daemon.observe().comfyuis
    assert comfy.vram_bytes is not None and comfy.vram_is_estimate
    [shown] = daemon.snapshot()["comfyui"]
    assert shown["vram_is_estimate"] is True
    world.ollama.fail = ServiceError("ollama", "connection refused")
    [comfy] = daemon.observe().comfyuis
    assert comfy.vram_bytes is None and not comfy.vram_is_estimate
    world.ollama.fail = None
    world.comfy.dynamic_vram = False
    [comfy] = daemon.observe().comfyuis
    assert comfy.vram_bytes is not None and not comfy.vram_is_estimate


def test_a_replaced_client_stays_open_for_threads_that_still_hold_it(world: World) -> None:
    """A recreated container gets a new client; the old one may still be in use by a gate
    thread that took it from the previous `targets`, so it is closed only RETIRE_S later
    (and every one is closed when the supervisor stops)."""
    from supervisor.observe import RETIRE_S

    made: list[Any] = []

    class Tracked:
        def __init__(self) -> None:
            self.closed_at: float | None = None

        def __getattr__(self, name: str) -> Any:
            return getattr(world.comfy, name)

        def close(self) -> None:
            self.closed_at = world.clock.now

    def make(url: str) -> Any:
        made.append(Tracked())
        return made[-1]

    daemon = world.daemon(comfy_client=make)
    daemon.observe()
    first = made[0]
    held = daemon.actor.targets().comfyuis["comfyui/comfyui"][1]  # what a gate would hold
    assert held is first
    container = world.docker.containers["comfyui"]
    container.spec = replace(container.spec, container_id="id-comfyui-recreated")
    daemon.on_docker_event("start comfyui")
    daemon.observe()
    assert len(made) == 2 and first.closed_at is None  # still usable by its holder
    world.clock.sleep(RETIRE_S + 1)
    daemon.observe()
    assert first.closed_at is not None and made[1].closed_at is None
    daemon.close()
    assert made[1].closed_at is not None


def test_a_client_that_fails_to_close_does_not_break_the_pass(
    world: World, logs: list[str]
) -> None:
    """Closing a retired client happens in the middle of a pass: whatever its close()
    raises (a bug included) is logged at DEBUG, the pass completes, and the client is
    not tried again on every later pass."""
    from supervisor.observe import RETIRE_S

    made: list[Any] = []

    class Unclosable:
        def __init__(self) -> None:
            self.close_calls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(world.comfy, name)

        def close(self) -> None:
            self.close_calls += 1
            raise RuntimeError("close bug")

    def make(url: str) -> Any:
        made.append(Unclosable())
        return made[-1]

    daemon = world.daemon(comfy_client=make)
    daemon.observe()
    container = world.docker.containers["comfyui"]
    container.spec = replace(container.spec, container_id="id-comfyui-recreated")
    daemon.on_docker_event("start comfyui")
    daemon.observe()
    world.clock.sleep(RETIRE_S + 1)
    [comfy] = daemon.observe().comfyuis  # the old client's close fails in this pass
    assert comfy.status.is_running and made[0].close_calls == 1
    assert has(logs, "close bug")
    world.clock.sleep(6)
    daemon.observe()
    assert made[0].close_calls == 1
