"""The Actor: every action verified by reading VRAM afterwards, classified, never raising."""

from __future__ import annotations

import threading
from dataclasses import replace

import httpx
import pytest

from supervisor.actions import Actor
from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient
from supervisor.config import Settings, load_settings
from supervisor.errors import DockerUnavailable, ServiceError
from supervisor.gate.admission import model_key
from supervisor.model import (
    FreeComfy,
    FreeResult,
    FreeStage,
    HealOllama,
    OllamaModel,
    Priority,
    RestartComfy,
    Role,
    ServedModel,
    ServedState,
    ServiceSpec,
    UnloadModel,
    UnloadOllama,
)
from supervisor.ollama_actions import reload_keep_alive, restore_keep_alive
from supervisor.ollama_profile import ollama_profile
from supervisor.ports import LoadRoom, Reading, Targets
from supervisor.room import ComfyRoomMaker
from supervisor.room_image import OllamaRoomMaker
from supervisor.units import format_bytes
from tests.daemon.conftest import World, has
from tests.daemon.fakes import (
    GIB,
    MIB,
    WALL_EPOCH,
    FakeClock,
    FakeComfy,
    FakeDocker,
    FakeGpu,
    FakeOllama,
)

COMFY = "comfyui/comfyui"
OLLAMA = "ollama/ollama"


class GpuProbe:
    """Reads the fake GPU the way the daemon's probe does with NVML attribution."""

    def __init__(self, gpu: FakeGpu, comfy: FakeComfy) -> None:
        self.gpu, self.comfy = gpu, comfy
        self.broken = False

    def comfy_reading(self, key: str, *, fresh_pids: bool = False) -> Reading | None:
        if self.broken:
            return None
        return Reading(self.gpu.held.get(self.comfy.pid, 0))

    def free_bytes(self, gpu_uuids: tuple[str, ...] = ()) -> int | None:
        return self.gpu.free_bytes


def make_actor(
    w: World,
    *,
    settings: Settings | None = None,
    docker: FakeDocker | None = None,
    container: bool = True,
    ollama_version: str | None = None,
) -> tuple[Actor, GpuProbe]:
    probe = GpuProbe(w.gpu, w.comfy)
    cid = "id-comfyui" if container else None
    if docker is not None and "comfyui" not in docker.containers:
        docker.add(Role.COMFYUI, "comfyui", w.comfy.base_url, pids=(w.comfy.pid,))
    if docker is not None and "ollama" not in docker.containers:
        docker.add(Role.OLLAMA, "ollama", w.ollama.base_url)
    targets = Targets(
        comfyuis={COMFY: (ServiceSpec(Role.COMFYUI, "comfyui", w.comfy.base_url, cid), w.comfy)},
        ollamas={
            OLLAMA: (ServiceSpec(Role.OLLAMA, "ollama", w.ollama.base_url, "id-ollama"), w.ollama)
        },
        ollama_profiles={OLLAMA: ollama_profile(ollama_version, {}, w.gpu.total_bytes)},
    )
    actor = Actor(
        settings or Settings(),
        probe=probe,
        targets=lambda: targets,
        docker=lambda: docker,
        clock=w.clock,
        wall_clock=w.clock.wall,
        sleep=w.clock.sleep,
    )
    return actor, probe


def test_format_bytes() -> None:
    assert format_bytes(int(12.3 * GIB)) == "12.3 GiB"
    assert format_bytes(512 * 1024**2) == "512 MiB"
    assert format_bytes(None) == "unknown"


def test_soft_free_of_an_idle_comfyui_is_verified_and_logged(world: World, logs: list[str]) -> None:
    actor, _ = make_actor(world)
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "new model"))
    assert world.comfy.free_calls == [(True, False)]  # the gentle call: unload_models only
    assert outcome.result is FreeResult.FREED and outcome.ok
    assert outcome.before_bytes == FakeComfy.CONTEXT_BYTES + 11 * GIB
    assert outcome.after_bytes == FakeComfy.CONTEXT_BYTES
    assert has(logs, "Freed ComfyUI memory (soft): 11.3 GiB -> 300 MiB")


def test_hard_free_sends_both_flags(world: World) -> None:
    actor, _ = make_actor(world)
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.HARD, "still high"))
    assert world.comfy.free_calls == [(True, True)]
    assert outcome.result is FreeResult.FREED


def test_free_while_a_prompt_runs_is_pending_and_does_not_wait_out_the_timeout(
    world: World,
) -> None:
    world.comfy.start_prompt(seconds=60)
    actor, _ = make_actor(world)
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "new model"))
    assert outcome.result is FreeResult.PENDING
    assert outcome.duration_s < actor.settings.verify_timeout_s
    # ComfyUI kept the flags: the VRAM comes back when the prompt ends.
    world.clock.sleep(61)
    assert world.gpu.held[world.comfy.pid] == FakeComfy.CONTEXT_BYTES


def test_idle_comfyui_that_keeps_its_vram_is_pinned_then_hard_frees_it(world: World) -> None:
    world.comfy.highvram = True  # --highvram: unload_models alone offloads to the GPU itself
    actor, _ = make_actor(world)
    soft = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "new model"))
    assert soft.result is FreeResult.PINNED and not soft.ok
    assert soft.duration_s >= actor.settings.verify_timeout_s  # watched the whole window
    hard = actor.execute(FreeComfy(COMFY, FreeStage.HARD, "pinned"))
    assert hard.result is FreeResult.FREED


def test_api_error_is_failed_not_raised(world: World) -> None:
    world.comfy.fail_free = ServiceError("comfyui", "POST /free: HTTP 500")
    actor, _ = make_actor(world)
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "x"))
    assert outcome.result is FreeResult.FAILED and "500" in outcome.detail


def test_unreadable_vram_is_failed_not_freed(world: World) -> None:
    actor, probe = make_actor(world)
    probe.broken = True
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "x"))
    assert outcome.result is FreeResult.FAILED


def test_comfyui_holding_nothing_is_freed_without_escalation(world: World) -> None:
    world.comfy.models_bytes = world.comfy.cache_bytes = 0
    world.comfy._sync()
    actor, _ = make_actor(world)
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "x"))
    assert outcome.result is FreeResult.FREED and outcome.detail == "nothing held"
    # Known after the first look: the verify window is not waited out for nothing.
    assert outcome.duration_s < 1.0


def test_gate_does_not_hold_a_load_when_comfyui_holds_only_its_context(world: World) -> None:
    """Another process fills the GPU, ComfyUI holds only its CUDA context: freeing it
    cannot make room, and the gate must say so at once instead of holding the request
    (and the Actor's lock) for its whole deadline."""
    world.comfy.models_bytes = world.comfy.cache_bytes = 0
    world.comfy._sync()
    world.gpu.held[9999] = 18 * GIB  # another process fills the GPU
    daemon = world.daemon()
    daemon.observe()
    start = world.clock.now
    assert not daemon.room_maker.make_room(8 * GIB, reason="gate: load", deadline_s=30)
    assert world.clock.now - start < 1.0  # fake clock: the time the request was held
    assert world.comfy.free_calls == []  # nothing to free, nothing sent


def test_dry_run_sends_nothing(world: World, logs: list[str]) -> None:
    docker = FakeDocker()
    actor, _ = make_actor(world, settings=Settings(dry_run=True), docker=docker)
    world.ollama.load("llama3.2:latest")
    outcomes = [
        actor.execute(FreeComfy(COMFY, FreeStage.HARD, "x")),
        actor.execute(RestartComfy(COMFY, "pinned")),
        actor.execute(UnloadOllama(OLLAMA, "llama3.2:latest", "comfy needs room")),
        actor.execute(HealOllama(OLLAMA, "llama3.2:latest", "spilled", (COMFY,))),
    ]
    assert all(o.dry_run and o.ok for o in outcomes)
    assert world.comfy.free_calls == [] and docker.restarts == []
    assert world.ollama.unload_calls == [] and world.ollama.preload_calls == []
    assert sum("DRY RUN: would" in line for line in logs) == 4


def test_restart_is_refused_while_a_prompt_runs_or_waits(world: World, logs: list[str]) -> None:
    docker = FakeDocker()
    actor, _ = make_actor(world, docker=docker)
    world.comfy.start_prompt(seconds=30)
    refused = actor.execute(RestartComfy(COMFY, "pinned after hard"))
    assert not refused.ok and refused.result is FreeResult.PENDING
    world.clock.sleep(31)
    world.comfy.pending = 2
    assert not actor.execute(RestartComfy(COMFY, "pinned after hard")).ok
    assert docker.restarts == []
    assert has(logs, "Not restarting ComfyUI comfyui/comfyui: a generation is running")


def restart_releases(world: World, docker: FakeDocker, new_pid: int = 4343) -> None:
    """Restarting the container starts a new ComfyUI process that holds nothing yet."""

    def on_restart(container_id: str) -> None:
        world.comfy.restart(new_pid)
        docker.containers["comfyui"].pids = (new_pid,)

    docker.on_restart = on_restart


def test_restart_of_an_idle_comfyui(world: World, logs: list[str]) -> None:
    docker = FakeDocker()
    actor, _ = make_actor(world, docker=docker)
    restart_releases(world, docker)
    outcome = actor.execute(RestartComfy(COMFY, "VRAM pinned after a hard free"))
    assert outcome.ok and docker.restarts == ["id-comfyui"]
    assert has(logs, "Restarted ComfyUI container comfyui: VRAM pinned after a hard free")


def test_restart_needs_a_readable_queue_unless_the_api_is_dead(world: World) -> None:
    docker = FakeDocker()
    actor, _ = make_actor(world, docker=docker)
    restart_releases(world, docker)
    world.comfy.fail = ServiceError("comfyui", "GET /queue: timed out")
    assert not actor.execute(RestartComfy(COMFY, "x")).ok
    base = actor.targets()
    actor.targets = lambda: replace(base, dead_comfyuis=frozenset({COMFY}))
    assert actor.execute(RestartComfy(COMFY, "hung")).ok
    assert docker.restarts == ["id-comfyui"]


def test_restart_without_a_container_or_docker_is_refused(world: World) -> None:
    fixed, _ = make_actor(world, docker=FakeDocker(), container=False)
    assert "fixed URL" in fixed.execute(RestartComfy(COMFY, "x")).detail
    no_docker, _ = make_actor(world, docker=None)
    assert "Docker" in no_docker.execute(RestartComfy(COMFY, "x")).detail


def test_restart_failure_from_docker_is_reported(world: World) -> None:
    docker = FakeDocker()
    docker.fail = DockerUnavailable("Docker restart failed: connection refused")
    actor, _ = make_actor(world, docker=docker)
    outcome = actor.execute(RestartComfy(COMFY, "x"))
    assert outcome.result is FreeResult.FAILED


def test_unload_waits_until_the_model_leaves_ps(world: World) -> None:
    world.ollama.load("llama3.2:latest")
    actor, _ = make_actor(world)
    outcome = actor.execute(UnloadOllama(OLLAMA, "llama3.2:latest", "comfy needs room"))
    assert outcome.ok and world.ollama.unload_calls == ["llama3.2:latest"]
    assert outcome.before_bytes == 4 * GIB


def test_unload_listeners_hear_of_an_unload_before_it_is_sent(world: World) -> None:
    """The gate is told first, so it never forwards a request to a model on its way out as
    if it were resident. A listener that fails does not stop the unload."""
    world.ollama.load("llama3.2:latest")
    actor, _ = make_actor(world)
    heard: list[tuple[str, int]] = []

    def broken(model: str) -> None:
        raise RuntimeError("a listener bug")

    actor.unload_listeners += [
        broken,
        lambda model: heard.append((model, len(world.ollama.unload_calls))),
    ]
    assert actor.execute(UnloadOllama(OLLAMA, "llama3.2:latest", "comfy needs room")).ok
    assert heard == [("llama3.2:latest", 0)]  # before the unload request went out
    assert world.ollama.unload_calls == ["llama3.2:latest"]


def test_unload_of_a_model_in_use_is_reported_not_pretended(world: World) -> None:
    world.ollama.load("llama3.2:latest")
    world.ollama.busy_until["llama3.2:latest"] = world.clock.now + 3600
    actor, _ = make_actor(world)
    outcome = actor.execute(UnloadOllama(OLLAMA, "llama3.2:latest", "x"))
    assert not outcome.ok and outcome.detail == "still loaded"


def test_heal_frees_comfyui_unloads_and_reloads_fully(world: World, logs: list[str]) -> None:
    world.gpu.total_bytes = 14 * GIB
    world.ollama.load("llama3.2:latest")  # ComfyUI holds 11.3 GiB: the model spills
    spilled = world.ollama.models["llama3.2:latest"]
    assert spilled.is_spilled
    actor, _ = make_actor(world)
    outcome = actor.execute(
        HealOllama(OLLAMA, "llama3.2:latest", "spilled", (COMFY,), spilled.gpu_fraction)
    )
    assert outcome.ok and outcome.after_fraction == 1.0
    assert world.comfy.free_calls == [(True, True)]
    assert world.ollama.unload_calls == ["llama3.2:latest"]
    assert world.ollama.preload_calls == ["llama3.2:latest"]
    # Its keep-alive cannot be told from expires_at: none is sent, the server's applies.
    assert world.ollama.preload_keep_alives == [None]
    before = round(spilled.gpu_fraction * 100)
    assert has(logs, f"Healed Ollama model llama3.2:latest: {before}% -> 100% on GPU")


def test_heal_does_not_reload_into_a_container_that_opted_out_meanwhile(
    world: World, logs: list[str]
) -> None:
    """A heal waits seconds between its unload and its reload; an Ollama recreated
    without its role label meanwhile (same URL) gets no reload: that would load a model
    into a container that opted out."""
    world.gpu.total_bytes = 14 * GIB
    world.ollama.load("llama3.2:latest")
    spilled = world.ollama.models["llama3.2:latest"]
    docker = FakeDocker()
    actor, _ = make_actor(world, docker=docker)
    unload = world.ollama.unload

    def unload_then_opt_out(model: str) -> None:
        unload(model)
        docker.containers["ollama"].unlabelled = True

    world.ollama.unload = unload_then_opt_out  # type: ignore[method-assign]
    outcome = actor.execute(
        HealOllama(OLLAMA, "llama3.2:latest", "spilled", (COMFY,), spilled.gpu_fraction)
    )
    assert world.ollama.unload_calls == ["llama3.2:latest"]
    assert world.ollama.preload_calls == []
    assert not outcome.ok
    assert outcome.detail.startswith("not reloaded: its container id-ollama is gone")
    assert has(logs, "Could not heal Ollama model llama3.2:latest: not reloaded")


def lock_is_free_for_another_thread(actor: Actor) -> bool:
    got: list[bool] = []

    def grab() -> None:
        ok = actor.lock.acquire(timeout=1)
        got.append(ok)
        if ok:
            actor.lock.release()

    t = threading.Thread(target=grab)
    t.start()
    t.join()
    return got == [True]


def test_heal_does_not_hold_the_lock_while_ollama_unloads_and_reloads(
    world: World, logs: list[str]
) -> None:
    """Before, a heal held the Actor's lock for its whole reload (up to ~18 s wall in the
    benchmark), so the gate could not make room and forwarded loads that spilled. Now the
    lock is held for the free and the unload only."""
    world.gpu.total_bytes = 14 * GIB
    world.ollama.load("llama3.2:latest")
    spilled = world.ollama.models["llama3.2:latest"]
    actor, _ = make_actor(world)
    lock_free_at: dict[str, bool] = {}
    real_preload, real_ps = world.ollama.preload, world.ollama.ps

    def preload(model: str, timeout_s: float, keep_alive: int | str | None = None) -> None:
        lock_free_at["reload"] = lock_is_free_for_another_thread(actor)
        real_preload(model, timeout_s, keep_alive)

    def ps() -> tuple[OllamaModel, ...]:
        if world.ollama.unload_calls and "wait" not in lock_free_at:
            lock_free_at["wait"] = lock_is_free_for_another_thread(actor)
        return real_ps()

    world.ollama.preload = preload  # type: ignore[method-assign]
    world.ollama.ps = ps  # type: ignore[method-assign]
    outcome = actor.execute(
        HealOllama(OLLAMA, "llama3.2:latest", "spilled", (COMFY,), spilled.gpu_fraction)
    )
    assert outcome.ok and outcome.after_fraction == 1.0
    assert lock_free_at == {"wait": True, "reload": True}
    assert has(logs, "Healed Ollama model llama3.2:latest:")


def test_heal_reloads_a_model_kept_forever_with_keep_alive_forever(world: World) -> None:
    """Before, the reload sent no keep_alive: a model a client had pinned with -1 came
    back with OLLAMA_KEEP_ALIVE (5 min) and was unloaded behind the user's back."""
    world.gpu.total_bytes = 14 * GIB
    world.ollama.load("llama3.2:latest", keep_alive_s=-1)
    spilled = world.ollama.models["llama3.2:latest"]
    assert spilled.is_spilled and (spilled.expires_at or "").startswith("2318-")
    actor, _ = make_actor(world)
    outcome = actor.execute(
        HealOllama(OLLAMA, "llama3.2:latest", "spilled", (COMFY,), spilled.gpu_fraction)
    )
    assert outcome.ok and world.ollama.preload_keep_alives == [-1]
    assert world.ollama.keep_alive_s["llama3.2:latest"] < 0  # still kept forever
    world.clock.sleep(3600)
    assert "llama3.2:latest" in world.ollama.models


MODEL = "llama3.2:latest"


def _busy_heal(world: World, keep_alive_s: float | None) -> tuple[Actor, HealOllama]:
    """A spilled model with a request in flight for 60 s, and its heal."""
    world.gpu.total_bytes = 14 * GIB
    world.ollama.load(MODEL, keep_alive_s=keep_alive_s)
    spilled = world.ollama.models[MODEL]
    world.ollama.busy_until[MODEL] = world.clock.now + 60
    actor, _ = make_actor(world)
    return actor, HealOllama(OLLAMA, MODEL, "spilled", (COMFY,), spilled.gpu_fraction)


@pytest.mark.parametrize(("keep_alive_s", "restored"), [(None, 300), (-1, -1), (3600, 3600)])
def test_heal_of_a_model_in_use_leaves_its_unload_armed_and_reports_waiting(
    world: World, logs: list[str], keep_alive_s: float | None, restored: int
) -> None:
    """A request keeps the model busy past the verify timeout: the heal does not withdraw
    its unload (that left the model spilled for minutes) nor block the loop; it reports
    the unload waiting, with the keep-alive to restore, and Ollama unloads the model when
    the request ends."""
    actor, heal = _busy_heal(world, keep_alive_s)
    outcome = actor.execute(heal)
    assert not outcome.ok and outcome.awaiting_unload and outcome.after_fraction is None
    assert outcome.detail.startswith("waiting:")
    assert world.ollama.preload_calls == []  # nothing withdrawn
    assert has(logs, f"Heal of Ollama model {MODEL} waits for its request to end")
    sent = outcome.keep_alive
    assert isinstance(sent, int)
    if restored < 0:
        assert sent == -1
    else:  # the verify window (10 s) has passed since the reading
        assert restored - 15 <= sent <= restored
    world.clock.sleep(61)  # the request ends: the armed unload happens
    assert MODEL not in world.ollama.models


@pytest.mark.parametrize("keep_alive_s", [None, -1])
def test_reload_after_the_request_ends_heals_with_the_saved_keep_alive(
    world: World, logs: list[str], keep_alive_s: float | None
) -> None:
    actor, heal = _busy_heal(world, keep_alive_s)
    waiting = actor.execute(heal)
    world.clock.sleep(61)
    assert MODEL not in world.ollama.models
    reload = replace(heal, reload_only=True, free_first=(), keep_alive=waiting.keep_alive)
    outcome = actor.execute(reload)
    assert outcome.ok and outcome.after_fraction == 1.0
    assert world.ollama.unload_calls == [MODEL]  # the reload did not unload again
    assert world.ollama.preload_keep_alives == [waiting.keep_alive]
    if keep_alive_s is not None:
        assert world.ollama.keep_alive_s[MODEL] < 0  # still kept forever
    pct = round(heal.before_fraction * 100)
    assert has(logs, f"Healed Ollama model {MODEL}: {pct}% -> 100% on GPU")


def test_reload_frees_again_only_the_comfyuis_the_policy_names(world: World) -> None:
    actor, heal = _busy_heal(world, None)
    waiting = actor.execute(heal)
    frees = len(world.comfy.free_calls)
    world.clock.sleep(61)
    reload = replace(heal, reload_only=True, keep_alive=waiting.keep_alive)
    assert actor.execute(replace(reload, free_first=())).ok
    assert len(world.comfy.free_calls) == frees
    world.ollama.unload(MODEL)
    world.clock.sleep(2)
    assert actor.execute(reload).ok
    assert len(world.comfy.free_calls) == frees + 1


def test_a_model_a_request_loaded_again_first_is_judged_not_reloaded(
    world: World, logs: list[str]
) -> None:
    actor, heal = _busy_heal(world, None)
    waiting = actor.execute(heal)
    world.clock.sleep(62)
    world.ollama.load(MODEL)  # a chat came first; ComfyUI was freed, so it fits
    reload = replace(heal, reload_only=True, free_first=(), keep_alive=waiting.keep_alive)
    outcome = actor.execute(reload)
    assert outcome.ok and outcome.after_fraction == 1.0
    assert world.ollama.preload_calls == []  # its own keep-alive stays


@pytest.mark.parametrize(("keep_alive_s", "restored"), [(None, 300), (-1, -1), (3600, 3600)])
def test_withdraw_of_a_heal_whose_request_outlasts_the_bound(
    world: World, logs: list[str], keep_alive_s: float | None, restored: int
) -> None:
    """Past the policy's bound the unload is withdrawn: a load request with the saved
    keep-alive, so Ollama does not unload the model behind everyone's back."""
    actor, heal = _busy_heal(world, keep_alive_s)
    waiting = actor.execute(heal)
    withdraw = replace(
        heal, reload_only=True, withdraw=True, free_first=(), keep_alive=waiting.keep_alive
    )
    outcome = actor.execute(withdraw)
    assert not outcome.ok and "still in use" in outcome.detail
    assert "withdrawn" in outcome.detail and outcome.after_fraction is None
    assert has(logs, f"Could not heal Ollama model {MODEL}: it is still in use")
    sent = world.ollama.preload_keep_alives
    assert sent == [waiting.keep_alive]
    world.clock.sleep(61)  # the request ends
    assert MODEL in world.ollama.models  # not unloaded behind everyone's back
    assert world.ollama.keep_alive_s[MODEL] == sent[0]


def test_a_stopping_supervisor_withdraws_the_unload_at_once(world: World) -> None:
    actor, heal = _busy_heal(world, None)
    actor._stop.set()  # SIGTERM while the heal waits
    outcome = actor.execute(heal)
    assert not outcome.awaiting_unload and "withdrawn" in outcome.detail
    world.clock.sleep(61)
    assert MODEL in world.ollama.models


@pytest.mark.parametrize(
    ("expires_at", "reload", "restore"),
    [
        ("2318-06-12T03:15:42.123456789Z", -1, -1),  # keep_alive -1 (Go's longest time)
        ("2026-01-01T02:00:00+01:00", None, 3600),  # an hour left (offset honoured)
        ("2026-01-01T00:00:10Z", None, 300),  # 10 s left: at least Ollama's default
        ("2025-12-31T00:00:00Z", None, 300),  # stale: a long generation (gotcha 6)
        (None, None, 300),
        ("not a time", None, 300),
    ],
)
def test_keep_alive_read_from_expires_at(
    expires_at: str | None, reload: int | None, restore: int
) -> None:
    model = OllamaModel("m:latest", GIB, GIB, expires_at=expires_at)
    assert reload_keep_alive(model) == reload
    assert restore_keep_alive(model, wall_now=WALL_EPOCH) == restore


def test_heal_is_refused_when_the_model_cannot_fit(world: World) -> None:
    world.gpu.total_bytes = 16 * GIB
    world.ollama.load("big:latest", size_bytes=40 * GIB)
    actor, _ = make_actor(world)
    outcome = actor.execute(HealOllama(OLLAMA, "big:latest", "spilled", ()))
    assert not outcome.ok and "not enough room" in outcome.detail
    assert world.ollama.unload_calls == []  # nothing was torn down for nothing


def test_heal_counts_the_head_room_of_an_ollama_before_0_30(world: World) -> None:
    """Ollama 0.12 keeps memory free when it places a model (its layer estimate): with
    only 256 MiB beyond the model's size the reload would spill again, so the heal is
    refused before anything is torn down (the gate counts the same head room)."""
    size = world.gpu.free_bytes - 256 * MIB
    world.ollama.load("m:latest", size_bytes=size)
    actor, _ = make_actor(world, ollama_version="0.12.6")
    outcome = actor.execute(HealOllama(OLLAMA, "m:latest", "spilled", ()))
    assert not outcome.ok and "not enough room" in outcome.detail
    assert world.ollama.unload_calls == []


@pytest.mark.parametrize("evicts", [True, False])
def test_heal_counts_the_models_ollama_evicts_itself_as_room(world: World, evicts: bool) -> None:
    """Found by the 24-hour soak: a spilled gemma2:27b beside an idle qwen2.5:14b was
    refused ("not enough room: 14.0 GiB would be free, 17.5 GiB needed") and stayed
    spilled for 3,400 simulated seconds, while Ollama before 0.30 evicts its other models
    for a load that does not fit beside them: that room was there. The heal counts them
    as the gate does, and the reload lands wholly on the GPU."""
    world.ollama.installed.update({"qwen:14b": 8 * GIB, "big:12b": 12 * GIB})
    world.ollama.load("qwen:14b")  # beside ComfyUI's 11.3 GiB
    world.ollama.load("big:12b")  # 0.5 GiB left free beside them: it spills
    spilled = world.ollama.models["big:12b"]
    assert spilled.is_spilled
    world.ollama.evicts_own = evicts
    actor, _ = make_actor(world, ollama_version="0.12.6" if evicts else "0.33.0")

    outcome = actor.execute(HealOllama(OLLAMA, "big:12b", "spilled", (), spilled.gpu_fraction))

    if evicts:
        assert outcome.ok and outcome.after_fraction == 1.0, outcome.detail
        assert "qwen:14b" not in world.ollama.models  # Ollama evicted it for the reload
    else:
        # From 0.30 Ollama evicts one runner only while the need is above 80 % of its
        # free figure: 12 GiB against 4.2 + 0.5 free is, so qwen's 8 GiB count, but not
        # the 1 GiB fit target on top: refused before anything is torn down.
        assert not outcome.ok and "not enough room" in outcome.detail
        assert "8.0 GiB Ollama evicts" in outcome.detail
        assert world.ollama.unload_calls == []


def test_room_maker_frees_until_the_need_is_covered(world: World) -> None:
    actor, _ = make_actor(world)
    seen: list[FreeResult | None] = []
    maker = ComfyRoomMaker(actor, world.clock, on_outcome=lambda o: seen.append(o.result))
    need = world.gpu.free_bytes + 8 * GIB
    assert maker.make_room(need, reason="gate: load of llama3.2", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]  # soft was enough
    assert seen == [FreeResult.FREED]


def test_room_maker_leaves_a_busy_comfyui_alone_unless_priority_ollama(world: World) -> None:
    world.comfy.start_prompt(seconds=5)
    need = world.gpu.free_bytes + 8 * GIB
    actor, _ = make_actor(world, settings=Settings(priority=Priority.COMFYUI))
    assert not ComfyRoomMaker(actor, world.clock).make_room(need, reason="gate", deadline_s=3)
    assert world.comfy.free_calls == []
    actor, _ = make_actor(world, settings=Settings(priority=Priority.OLLAMA))
    # Under ollama priority the flags are set and the gate waits for the prompt to end.
    assert ComfyRoomMaker(actor, world.clock).make_room(need, reason="gate", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]


@pytest.mark.parametrize("raw", ["ollama", "ollama,comfyui", " Ollama "])
def test_room_maker_reads_the_priority_as_the_environment_gives_it(world: World, raw: str) -> None:
    # VRAM_PRIORITY from the environment is plain text, not the Priority enum: the gate
    # must rank by it all the same (Ollama above ComfyUI: a busy ComfyUI is flagged).
    settings, _ = load_settings({"VRAM_PRIORITY": raw})
    world.comfy.start_prompt(seconds=5)
    need = world.gpu.free_bytes + 8 * GIB
    actor, _ = make_actor(world, settings=settings)
    assert ComfyRoomMaker(actor, world.clock).make_room(need, reason="gate", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]


@pytest.mark.parametrize("version", ["0.12.6", "0.33.0"])
@pytest.mark.parametrize(
    ("loaded", "short_by", "freed"),
    [
        # Ollama has a 4 GiB model loaded and would evict it itself (0.12: the new one must
        # fit fully; 0.33: the need is above 80 % of the free memory): ComfyUI is left alone.
        (True, 3 * GIB, []),
        # More than free + Ollama's own VRAM: ComfyUI is freed (soft is enough).
        (True, 6 * GIB, [(True, False)]),
        # Nothing of Ollama's loaded: its first load may spill, free VRAM alone counts.
        (False, 3 * GIB, [(True, False)]),
    ],
)
def test_room_counts_ollamas_resident_models_when_it_has_any(
    world: World, loaded: bool, short_by: int, freed: list[tuple[bool, bool]], version: str
) -> None:
    """Before, the room was the free VRAM alone: with Ollama's own models loaded (which
    Ollama evicts itself for a new load, api-facts 1.8) ComfyUI was freed needlessly."""
    if loaded:
        world.ollama.load("llama3.2:latest")  # 4 GiB on the GPU
    free = world.gpu.free_bytes
    actor, _ = make_actor(world, ollama_version=version)
    maker = ComfyRoomMaker(actor, world.clock)
    assert maker.room_for(free + short_by) == LoadRoom(free, 4 * GIB if loaded else 0)
    assert maker.make_room(free + short_by, reason="gate: load of m:latest", deadline_s=30)
    assert world.comfy.free_calls == freed


@pytest.mark.parametrize(("version", "counted"), [("0.12.6", 4 * GIB), ("0.33.0", 0)])
def test_room_counts_resident_models_only_where_that_ollama_evicts_them(
    world: World, version: str, counted: int
) -> None:
    """Ollama >= 0.30 evicts its own models only while the need exceeds 80 % of its free
    memory; below that it loads beside them, so they are no room for a small load."""
    world.ollama.load("llama3.2:latest")  # 4 GiB on the GPU
    free = world.gpu.free_bytes
    actor, _ = make_actor(world, ollama_version=version)
    maker = ComfyRoomMaker(actor, world.clock)
    assert maker.room_for(free // 2) == LoadRoom(free, counted)
    assert maker.load_profile() is not None
    assert maker.load_profile().fit_target_bytes == (0 if version == "0.12.6" else 1024**3)  # type: ignore[union-attr]


@pytest.mark.parametrize("priority", [Priority.BALANCED, Priority.COMFYUI])
def test_room_maker_waits_for_a_busy_comfyui_to_finish_then_frees_it(
    world: World, logs: list[str], priority: Priority
) -> None:
    """Before, under balanced and comfyui the gate forwarded at once when ComfyUI had
    work, and the load spilled. Now it waits (within its deadline) until the prompt ends,
    never interrupting it, then frees ComfyUI; it does not hold the Actor's lock while
    merely waiting, so the loop can act meanwhile."""
    world.comfy.start_prompt(seconds=5)
    prompt_ends = world.clock.now + 5
    need = world.gpu.free_bytes + 8 * GIB
    actor, _ = make_actor(world, settings=Settings(priority=priority))
    lock_free_while_busy: list[bool] = []

    def try_lock_from_another_thread(now: float) -> None:
        if world.comfy.running_until is None:
            return
        lock_free_while_busy.append(lock_is_free_for_another_thread(actor))

    world.clock.tickers.append(try_lock_from_another_thread)
    maker = ComfyRoomMaker(actor, world.clock)
    assert maker.make_room(need, reason="gate: load of llama3.2:latest", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]  # sent once the prompt had ended
    assert world.clock.now >= prompt_ends
    assert lock_free_while_busy and all(lock_free_while_busy)
    waiting = (
        "Gate: waiting for ComfyUI comfyui to finish its work before making room for "
        "llama3.2:latest"
    )
    assert sum(waiting in line for line in logs) == 1


@pytest.mark.parametrize("short_by_gib", [8, 2], ids=["busy-model-too-small", "it-covers"])
def test_image_room_maker_waits_for_a_busy_model_only_when_it_would_make_the_room(
    world: World, logs: list[str], short_by_gib: int
) -> None:
    """A model serving a request holds 4 GiB of the card. When the job is 2 GiB short the
    image gate waits for the chat to end (5 s), then unloads the model: the job starts
    unpaged. When it is 8 GiB short, unloading that model would not make the room either:
    the gate does not look again every 0.25 s until VRAM_GATE_WAIT (30 s) for nothing,
    it says why and the job goes on at once (before, it was held the whole 30 s)."""
    world.ollama.load("llama3.2:latest")  # 4 GiB on the GPU
    chat_ends = world.clock.now + 5
    actor, _ = make_actor(world)

    def busy() -> frozenset[str]:
        return frozenset({model_key("llama3.2:latest")} if world.clock.now < chat_ends else ())

    maker = OllamaRoomMaker(actor, busy, world.clock)
    room = maker.free_bytes()
    assert room is not None
    reads: list[float] = []
    ps = world.ollama.ps

    def counted_ps() -> tuple[OllamaModel, ...]:
        reads.append(world.clock.now)
        return ps()

    world.ollama.ps = counted_ps  # type: ignore[method-assign]
    started = world.clock.now
    done = maker.make_room(room + short_by_gib * GIB, reason="an image job", deadline_s=30)
    if short_by_gib == 8:
        assert not done and world.ollama.unload_calls == []
        assert world.clock.now - started < 1 and len(reads) == 1
        assert has(logs, "Gate: not waiting for llama3.2:latest for an image job")
    else:
        assert done and world.ollama.unload_calls == ["llama3.2:latest"]
        assert world.clock.now >= chat_ends
        assert not has(logs, "Gate: not waiting for")


def test_room_maker_waits_for_a_prompt_that_started_between_its_look_and_its_free(
    world: World,
) -> None:
    """ComfyUI was idle when the gate looked, but a prompt started before the free arrived:
    the free's flags wait for that prompt. Before, the gate then gave up at once and
    forwarded the load without room (it spilled; seen in the benchmark). Now it waits for
    the prompt like for any work, within its deadline, and the room is made."""
    need = world.gpu.free_bytes + 8 * GIB
    free = world.comfy.free

    def free_after_a_prompt_got_in(*, unload_models: bool, free_memory: bool) -> None:
        if not world.comfy.free_calls:
            world.comfy.start_prompt(seconds=5)
        free(unload_models=unload_models, free_memory=free_memory)

    world.comfy.free = free_after_a_prompt_got_in  # type: ignore[method-assign]
    prompt_ends = world.clock.now + 5
    actor, _ = make_actor(world)
    maker = ComfyRoomMaker(actor, world.clock)
    assert maker.make_room(need, reason="gate: load of llama3.2:latest", deadline_s=30)
    assert world.clock.now >= prompt_ends
    assert world.gpu.free_bytes >= need


@pytest.mark.parametrize("priority", [Priority.BALANCED, Priority.OLLAMA])
def test_room_maker_does_not_pass_over_a_comfyui_that_holds_nothing_yet_but_has_work(
    world: World, logs: list[str], priority: Priority
) -> None:
    """Seen in the soak: the gate looked while ComfyUI held only its CUDA context but had
    an image job under way whose checkpoint was not loaded yet, and while one of Ollama's
    runners was still giving its VRAM back. "Holds nothing" made the gate skip ComfyUI and
    forward at once (0.0 s); the job's checkpoint then landed during the load, which
    spilled. Now a ComfyUI with work is waited for (balanced) or flagged (ollama) like any
    busy one, and freed once its job is done: the room is made."""
    world.comfy.models_bytes = world.comfy.cache_bytes = 0
    world.comfy._sync()
    start = world.clock.now
    world.comfy.start_prompt(seconds=5)  # its checkpoint loads 1 s in
    world.gpu.held[9999] = 12 * GIB  # a runner Ollama unloads; its VRAM is back in 2 s
    need = world.gpu.free_bytes + 6 * GIB

    def job_and_unload(now: float) -> None:
        loading = now >= start + 1 and world.comfy.running_until is not None
        if loading and not world.comfy.models_bytes and not world.comfy.free_calls:
            world.comfy.models_bytes = 8 * GIB
            world.comfy._sync()
        if now >= start + 2:
            world.gpu.held.pop(9999, None)

    world.clock.tickers.append(job_and_unload)
    actor, _ = make_actor(world, settings=Settings(priority=priority))
    maker = ComfyRoomMaker(actor, world.clock)
    assert maker.make_room(need, reason="gate: load of gemma2:27b", deadline_s=30)
    assert world.comfy.free_calls == [(True, False)]
    assert world.clock.now >= start + 5  # the job ran to its end
    assert world.gpu.free_bytes >= need
    if priority is Priority.BALANCED:
        assert any("Gate: waiting for ComfyUI comfyui" in line for line in logs)


def test_room_maker_shares_the_loop_lock(world: World) -> None:
    actor, _ = make_actor(world)
    maker = ComfyRoomMaker(actor, FakeClock())
    holding = threading.Event()
    release = threading.Event()

    def loop_action() -> None:
        with actor.lock:
            holding.set()
            release.wait(5)

    t = threading.Thread(target=loop_action)
    t.start()
    holding.wait(5)
    try:
        # The loop is acting: the gate gets no room within its deadline and sends nothing.
        assert not maker.make_room(world.gpu.total_bytes, reason="gate", deadline_s=0.2)
        assert world.comfy.free_calls == []
    finally:
        release.set()
        t.join()


def test_an_adapter_breaking_its_contract_becomes_a_failed_outcome(world: World) -> None:
    world.comfy.fail_free = RuntimeError("not a ServiceError")  # type: ignore[assignment]
    actor, _ = make_actor(world)
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "x"))
    assert outcome.result is FreeResult.FAILED and "internal error" in outcome.detail


def test_unknown_target_is_failed(world: World) -> None:
    actor, _ = make_actor(world)
    assert actor.execute(FreeComfy("comfyui/gone", FreeStage.SOFT, "x")).result is (
        FreeResult.FAILED
    )
    assert not actor.execute(UnloadOllama("ollama/gone", "m", "x")).ok


def test_fakes_follow_api_facts() -> None:
    """The fakes themselves: /free acts only between prompts, unload is asynchronous."""
    clock, gpu = FakeClock(), FakeGpu()
    comfy = FakeComfy(gpu, clock)
    comfy.start_prompt(10)
    comfy.free(unload_models=True, free_memory=False)
    assert gpu.held[comfy.pid] > FakeComfy.CONTEXT_BYTES
    clock.sleep(10)
    assert gpu.held[comfy.pid] == FakeComfy.CONTEXT_BYTES
    ollama = FakeOllama(gpu, clock, release_delay_s=2)
    ollama.load("llama3.2:latest")
    pid = ollama.pids["llama3.2:latest"]
    ollama.unload("llama3.2:latest")
    assert ollama.ps() == () and pid in gpu.held  # gone from ps, VRAM not yet back
    clock.sleep(2)
    assert pid not in gpu.held


def test_room_maker_stops_waiting_for_a_busy_comfyui_on_shutdown(
    world: World, logs: list[str]
) -> None:
    """SIGTERM while the gate waits for an image job: it gives up at once and says why,
    instead of blaming a deadline that has not passed."""
    world.comfy.start_prompt(seconds=60)
    stop = threading.Event()
    actor, _ = make_actor(world)
    actor = Actor(
        Settings(),
        probe=actor.probe,
        targets=actor.targets,
        docker=lambda: None,
        clock=world.clock,
        wall_clock=world.clock.wall,
        sleep=world.clock.sleep,
        stop=stop,
    )
    started = world.clock.now
    world.clock.tickers.append(lambda now: stop.set() if now >= started + 2 else None)
    maker = ComfyRoomMaker(actor, world.clock)
    need = world.gpu.free_bytes + 8 * GIB
    assert not maker.make_room(need, reason="gate: load of llama3.2:latest", deadline_s=30)
    assert world.clock.now < started + 30  # gave up on the stop, not on the deadline
    assert world.comfy.free_calls == []  # the running generation was left alone
    assert has(logs, "Gate: stopped waiting for ComfyUI comfyui: shutting down")
    assert not has(logs, "still has work at the deadline")


def test_the_safety_limit_counts_every_caller_of_the_actor(world: World) -> None:
    """The gate's frees and a heal's own frees go to the Actor directly, not through the
    loop: the safety limit is the Actor's, so they count too, and a storm from any caller
    stops at MAX_ACTIONS_PER_SERVICE_PER_MIN per service per minute."""
    from supervisor.actions import MAX_ACTIONS_PER_SERVICE_PER_MIN

    actor, _ = make_actor(world)
    maker = ComfyRoomMaker(actor, world.clock)
    outcomes = [
        actor.free_comfy(FreeComfy("comfyui/comfyui", FreeStage.SOFT, "gate"))
        for _ in range(MAX_ACTIONS_PER_SERVICE_PER_MIN + 3)
    ]
    assert len(world.comfy.free_calls) == MAX_ACTIONS_PER_SERVICE_PER_MIN
    skipped = [o for o in outcomes if o.detail.startswith("skipped:")]
    assert len(skipped) == 3 and all(o.result is FreeResult.FAILED for o in skipped)
    # The gate then gives up on that ComfyUI instead of freeing it again.
    need = world.gpu.free_bytes + 8 * GIB
    assert not maker.make_room(need, reason="gate", deadline_s=1)
    assert len(world.comfy.free_calls) == MAX_ACTIONS_PER_SERVICE_PER_MIN
    # A minute later the service may be acted on again.
    world.clock.sleep(61)
    actor.free_comfy(FreeComfy("comfyui/comfyui", FreeStage.SOFT, "gate"))
    assert len(world.comfy.free_calls) == MAX_ACTIONS_PER_SERVICE_PER_MIN + 1


class _Server:
    """A model server (`ports.ModelServerApi`) whose `/slots` shows nothing yet: a request
    that has just reached it is not processing."""

    def __init__(self) -> None:
        self.unloads: list[str] = []

    def served(self) -> ServedState:
        models = () if self.unloads else (ServedModel("qwen", "ready"),)
        return ServedState(models, can_unload=True)

    def busy(self, model: str) -> bool | None:
        return False

    def unload(self, model: str) -> None:
        self.unloads.append(model)

    def wake(self, model: str) -> None:
        raise AssertionError("not a sleeping kind")

    def close(self) -> None:
        pass


def _swap_actor(world: World) -> tuple[Actor, _Server]:
    """An Actor with one llama-swap (`llama-swap/swap`, a `_Server`) to act on."""
    server = _Server()
    spec = ServiceSpec("llama-swap", "swap", "http://127.0.0.1:8080", "id-swap")
    targets = Targets(model_servers={"llama-swap/swap": (spec, server)})
    actor = Actor(
        Settings(),
        probe=GpuProbe(world.gpu, world.comfy),
        targets=lambda: targets,
        clock=world.clock,
        sleep=world.clock.sleep,
    )
    return actor, server


def test_a_model_with_a_request_in_flight_through_a_gate_is_never_unloaded(
    world: World, logs: list[str]
) -> None:
    """Seen in the llama-swap benchmark with the gates: a chat that had just reached
    llama-swap through the model gate did not show in its upstream's /slots yet, the
    image gate's unload went ahead and cut it off. What is in flight through a gate is
    serving a request whatever the server's own figure says, and refusing sends nothing
    (the safety limit does not count it)."""
    actor, server = _swap_actor(world)
    in_flight = {("llama-swap/swap", "qwen")}
    actor.in_flight_sources.append(lambda: frozenset(in_flight))
    refused = actor.execute(UnloadModel("llama-swap/swap", "qwen", "image gate"))
    assert not refused.ok and not refused.sent and server.unloads == []
    assert has(logs, "Not unloading model qwen on llama-swap/swap: it is serving a request")
    in_flight.clear()  # the chat ended
    done = actor.execute(UnloadModel("llama-swap/swap", "qwen", "image gate"))
    assert done.ok and server.unloads == ["qwen"]


def test_a_gate_that_cannot_say_what_is_in_flight_blocks_the_unload(
    world: World, logs: list[str]
) -> None:
    """A gate whose in-flight reading fails (a bug: anything may be raised) cannot say
    whether the model serves a request through it: the unload is not sent (as when the
    server cannot tell), the failure is said at WARNING, and once the gate answers
    again the unload goes ahead."""
    actor, server = _swap_actor(world)
    broken = [True]

    def in_flight() -> frozenset[tuple[str, str]]:
        if broken[0]:
            raise KeyError("a gate bug")
        return frozenset()

    actor.in_flight_sources.append(in_flight)
    refused = actor.execute(UnloadModel("llama-swap/swap", "qwen", "image gate"))
    assert not refused.ok and not refused.sent and server.unloads == []
    assert "unknown" in refused.detail
    assert has(logs, "A gate's in-flight reading failed: 'a gate bug'")
    broken[0] = False
    done = actor.execute(UnloadModel("llama-swap/swap", "qwen", "image gate"))
    assert done.ok and server.unloads == ["qwen"]


def test_a_container_that_lost_its_role_label_is_never_acted_on(
    world: World, logs: list[str]
) -> None:
    """Found by the Docker-backed soak: a ComfyUI recreated without its role label was
    freed 0.3 s before the next listing noticed (during an event burst the listing runs
    1-2 s behind the engine). The Actor reads the label again right before acting: a
    container that opted out is never acted on, and that sends nothing."""
    docker = FakeDocker()
    actor, _ = make_actor(world, docker=docker)
    docker.containers["comfyui"].unlabelled = True
    outcome = actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "GPU over the threshold"))
    assert not outcome.ok and not outcome.sent and world.comfy.free_calls == []
    assert "no longer carries the vram-supervisor.role label" in outcome.detail
    assert actor.execute(RestartComfy(COMFY, "pinned")).sent is False
    assert docker.restarts == []
    docker.containers["comfyui"].unlabelled = False  # relabelled: acted on again
    assert actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "again")).sent
    assert world.comfy.free_calls == [(True, False)]


@pytest.mark.parametrize("listed", [True, False], ids=["still listed", "listing dropped it"])
@pytest.mark.parametrize("kind", ["comfyui free", "ollama unload"])
def test_an_action_is_not_retried_on_a_container_recreated_without_its_label(
    world: World, logs: list[str], kind: str, listed: bool
) -> None:
    """Found by the Docker-backed soak (24 h, every fault): the label was read right before
    a soft free; the free's first attempt met the container being removed (the connection
    closed unanswered) and its retry, 0.25 s later, reached the container recreated
    without its label at the same URL. The real client (its retry policy) against a
    server whose container opts out during the first attempt: the retry is not sent,
    the outcome says why, and nothing reaches the new container; also when the loop's
    listing meanwhile dropped the container (a gate's free runs beside the loop), since
    the container acted on is pinned when the action begins."""
    docker = FakeDocker()
    actor, _ = make_actor(world, docker=docker)
    name = "comfyui" if kind == "comfyui free" else "ollama"
    acting = "/free" if name == "comfyui" else "/api/generate"
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == acting:
            sent.append(acting)
            docker.containers[name].unlabelled = True  # removed, then recreated without it
            if not listed:
                actor.targets = lambda: Targets()
            raise httpx.RemoteProtocolError("closed unanswered", request=request)
        if request.url.path == "/api/ps":
            return httpx.Response(200, json={"models": []})
        return httpx.Response(200, json={"queue_running": [], "queue_pending": []})

    spec = actor.targets()
    if name == "comfyui":
        comfy = ComfyClient(world.comfy.base_url, transport=httpx.MockTransport(handler))
        targets = replace(spec, comfyuis={COMFY: (spec.comfyuis[COMFY][0], comfy)})
        action: FreeComfy | UnloadOllama = FreeComfy(COMFY, FreeStage.SOFT, "new model")
    else:
        ollama = OllamaClient(world.ollama.base_url, transport=httpx.MockTransport(handler))
        targets = replace(spec, ollamas={OLLAMA: (spec.ollamas[OLLAMA][0], ollama)})
        action = UnloadOllama(OLLAMA, "qwen3:8b", "room for ComfyUI")
    actor.targets = lambda: targets
    outcome = actor.execute(action)
    assert sent == [acting]  # one attempt; the retry would have reached the new container
    assert not outcome.ok
    assert "was not sent again: its container id-" in outcome.detail
    assert "no longer carries the vram-supervisor.role label" in outcome.detail
    assert has(logs, "not sent again")


def _guards_seen(obj: object, method: str, seen: list[str]) -> None:
    """Wrap `obj.method` to record, at each call, what the resend guard then in force
    says once the container has opted out (what a retry of that request would ask)."""
    from supervisor.clients import _http

    real = getattr(obj, method)

    def wrapped(*args: object, **kwargs: object) -> object:
        guard = _http._RESEND_GUARD.get()
        seen.append(f"{method}: " + ("no guard" if guard is None else "guarded"))
        wrapped.guards.append(guard)  # type: ignore[attr-defined]
        return real(*args, **kwargs)

    wrapped.guards = []  # type: ignore[attr-defined]
    setattr(obj, method, wrapped)


@pytest.mark.parametrize("action", ["comfyui free", "ollama unload", "heal", "tenant unload"])
def test_every_request_that_acts_is_sent_under_the_resend_guard(world: World, action: str) -> None:
    """Each state-changing request goes out inside `Actor.sending`: were it retried after
    its container opted out, the retry would be refused. (The fakes here do not retry;
    what is checked is the guard in force while each acting request is sent.)"""
    docker = FakeDocker()
    seen: list[str] = []
    if action == "tenant unload":
        actor, server = _swap_actor(world)
        docker.add("llama-swap", "swap", "http://127.0.0.1:8080")  # type: ignore[arg-type]
        actor._docker = lambda: docker
        _guards_seen(server, "unload", seen)
        actor.execute(UnloadModel("llama-swap/swap", "qwen", "image gate"))
        container, calls = "swap", [server.unload]
    else:
        world.gpu.total_bytes = 14 * GIB
        world.ollama.load("llama3.2:latest")
        actor, _ = make_actor(world, docker=docker)
        if action == "comfyui free":
            _guards_seen(world.comfy, "free", seen)
            actor.execute(FreeComfy(COMFY, FreeStage.SOFT, "new model"))
            container, calls = "comfyui", [world.comfy.free]
        elif action == "ollama unload":
            _guards_seen(world.ollama, "unload", seen)
            actor.execute(UnloadOllama(OLLAMA, "llama3.2:latest", "room"))
            container, calls = "ollama", [world.ollama.unload]
        else:
            _guards_seen(world.ollama, "unload", seen)
            _guards_seen(world.ollama, "preload", seen)
            spilled = world.ollama.models["llama3.2:latest"]
            actor.execute(
                HealOllama(OLLAMA, "llama3.2:latest", "spilled", (COMFY,), spilled.gpu_fraction)
            )
            container, calls = "ollama", [world.ollama.unload, world.ollama.preload]
    assert seen and all(entry.endswith("guarded") for entry in seen), seen
    docker.containers[container].unlabelled = True
    for call in calls:
        for guard in call.guards:  # type: ignore[attr-defined]
            assert "no longer carries the vram-supervisor.role label" in guard()
