"""The daemon loop with the real policy and hand-written fakes of every adapter."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from supervisor import policy
from supervisor.actions import MAX_ACTIONS_PER_SERVICE_PER_MIN
from supervisor.config import Settings
from supervisor.daemon import Daemon
from supervisor.errors import DockerUnavailable, ServiceError
from supervisor.model import (
    ComfyQueue,
    Decision,
    FreeComfy,
    FreeResult,
    FreeStage,
    Observation,
    Outcome,
    PolicyState,
    Role,
    UnloadOllama,
    VramSource,
)
from supervisor.reads import noisy
from tests.daemon.conftest import World, comfy_api_figure, has
from tests.daemon.fakes import GIB, NVML_DOWN, FakeComfy, FakeEvents


def test_new_ollama_model_frees_comfyui_and_verifies(world: World, logs: list[str]) -> None:
    daemon = world.daemon()
    daemon.run_once()  # the first /api/ps read is a baseline
    assert world.comfy.free_calls == []
    world.ollama.load("llama3.2:latest")
    world.clock.sleep(1)
    daemon.run_once()
    assert world.comfy.free_calls == [(True, False)]
    assert has(logs, "New Ollama model(s) detected")
    assert has(logs, "Freed ComfyUI memory (soft): 11.3 GiB -> 300 MiB")
    recent = daemon.snapshot()["recent_actions"]
    assert recent[-1]["action"] == "FreeComfy" and recent[-1]["result"] == "freed"


def test_discovery_is_logged_and_vram_is_attributed_by_pid(world: World, logs: list[str]) -> None:
    world.ollama.load("llama3.2:latest")
    daemon = world.daemon()
    obs = daemon.observe()
    assert has(logs, "Discovered comfyui container comfyui at http://comfyui:8188")
    assert has(logs, "Discovered ollama container ollama at http://ollama:11434")
    assert has(logs, "VRAM source: nvml")
    assert obs.source is VramSource.NVML
    assert obs.comfyuis[0].vram_bytes == FakeComfy.CONTEXT_BYTES + 11 * GIB
    assert obs.ollamas[0].vram_bytes == 4 * GIB
    assert obs.comfyuis[0].gpu_uuids == (world.gpu.uuid,)


def test_without_nvml_the_api_source_is_used(world: World, logs: list[str]) -> None:
    daemon = world.daemon(nvml=False)
    obs = daemon.observe()
    assert obs.source is VramSource.API and len(obs.gpus) == 1
    # torch reserved from /system_stats (classic); the device bound under Dynamic VRAM.
    low, high = comfy_api_figure(world, 11 * GIB)
    assert low <= (obs.comfyuis[0].vram_bytes or 0) <= high
    assert has(logs, "VRAM source: api")


def test_vram_source_change_is_logged_once_each_way(world: World, logs: list[str]) -> None:
    daemon = world.daemon()
    daemon.observe()
    world.reader.fail = NVML_DOWN
    daemon.observe()
    daemon.observe()
    world.reader.fail = None
    daemon.observe()
    sources = [line for line in logs if line.startswith("VRAM source:")]
    assert sources == ["VRAM source: nvml", "VRAM source: api", "VRAM source: nvml"]


def test_no_request_goes_to_a_stopped_container(world: World, logs: list[str]) -> None:
    daemon = world.daemon()
    daemon.observe()
    world.docker.containers["comfyui"].status = "exited"
    daemon.on_docker_event("die comfyui")  # as the events stream does
    calls = world.comfy.queue_calls
    obs = daemon.observe()
    assert world.comfy.queue_calls == calls
    assert not obs.comfyuis[0].status.is_running
    assert has(logs, "Lost comfyui container comfyui (not running)")
    del world.docker.containers["comfyui"]
    world.docker.containers["ollama"].status = "running"
    daemon.on_docker_event("destroy")
    daemon.observe()
    assert daemon.snapshot()["comfyui"] == []


def test_removed_running_container_is_lost(world: World, logs: list[str]) -> None:
    daemon = world.daemon()
    daemon.observe()
    del world.docker.containers["ollama"]
    daemon.on_docker_event("destroy")
    daemon.observe()
    assert has(logs, "Lost ollama container ollama (removed)")


@pytest.mark.parametrize(
    "breakage",
    ["docker", "comfy", "ollama", "nvml", "docker-bug", "comfy-bug", "ollama-bug", "nvml-bug"],
)
def test_the_loop_survives_every_adapter_failing(
    world: World, logs: list[str], breakage: str
) -> None:
    daemon = world.daemon()
    daemon.run_once()
    bug = "bug" in breakage
    if breakage.startswith("docker"):
        world.docker.fail = RuntimeError("bug") if bug else DockerUnavailable("socket gone")
    elif breakage.startswith("comfy"):
        world.comfy.fail = RuntimeError("bug") if bug else ServiceError("comfyui", "timed out")
    elif breakage.startswith("ollama"):
        world.ollama.fail = RuntimeError("bug") if bug else ServiceError("ollama", "refused")
    else:
        world.reader.fail = RuntimeError("bug") if bug else NVML_DOWN
    world.ollama.load("llama3.2:latest")
    for _ in range(3):
        world.clock.sleep(6)
        daemon.run_once()  # must not raise
    # A typed failure is an expected outage; anything else is a bug, said loudly (with
    # its traceback) but once, not every pass.
    loud = [line for line in logs if "outside its contract (a bug" in line]
    if bug:
        assert loud and len(loud) == len(set(loud)), loud
    else:
        assert not loud
    snap = daemon.snapshot()
    json.dumps(snap)
    world.docker.fail = world.comfy.fail = world.ollama.fail = world.reader.fail = None
    world.clock.sleep(6)
    daemon.run_once()
    assert daemon.health()[0]


def test_docker_down_at_start_is_retried_and_services_appear_later(
    world: World, logs: list[str]
) -> None:
    world.docker.fail = DockerUnavailable("Cannot connect to the Docker daemon")
    daemon = world.daemon()
    obs = daemon.observe()
    assert obs.docker_ok is False and obs.comfyuis == ()
    assert has(logs, "Docker is unreachable")
    world.docker.fail = None
    obs = daemon.observe()
    assert obs.docker_ok is True and len(obs.comfyuis) == 1
    assert has(logs, "Docker is reachable again")


def test_docker_lost_keeps_the_last_known_services(world: World) -> None:
    daemon = world.daemon()
    daemon.observe()
    world.docker.fail = DockerUnavailable("socket gone")
    world.clock.sleep(6)  # Docker is re-listed once per VRAM_CHECK_INTERVAL
    obs = daemon.observe()
    assert obs.docker_ok is False
    assert [c.status.is_running for c in obs.comfyuis] == [True]


def test_failure_logs_back_off_but_the_loop_does_not(world: World, logs: list[str]) -> None:
    world.comfy.fail = ServiceError("comfyui at http://comfyui:8188", "GET /queue: refused")
    daemon = world.daemon()
    for _ in range(9):
        daemon.observe()
    warnings = [line for line in logs if line.startswith("Cannot read comfyui")]
    assert len(warnings) == 4  # failures 1, 2, 4 and 8
    assert [noisy(n) for n in range(1, 9)] == [True, True, False, True, False, False, False, True]
    world.comfy.fail = None
    daemon.observe()
    assert has(logs, "answers again after 9 failed checks")


def test_a_flapping_comfyui_causes_no_action_storm(world: World) -> None:
    # The GPU sits over the threshold all the time; ComfyUI answers every other pass and
    # its VRAM never comes back, whatever is tried.
    world.comfy.stuck = True
    world.ollama.load("llama3.2:latest", size_bytes=8 * GIB)
    settings = Settings(restart_fallback=True)
    daemon = world.daemon(settings=settings)
    start = world.clock.now
    for i in range(120):  # 120 passes, 5 s apart (plus the time spent verifying)
        world.comfy.fail = ServiceError("comfyui", "refused") if i % 2 else None
        daemon.run_once()
        world.clock.sleep(5)
    elapsed = world.clock.now - start
    frees = len(world.comfy.free_calls)
    restarts = len(world.docker.restarts)
    print(f"{elapsed:.0f} s: frees={frees} restarts={restarts}")
    assert frees >= 2  # it did try: the GPU really was over the threshold
    # One episode (a soft and a hard free) per VRAM_MIN_FREE_INTERVAL (30 s), and one
    # restart per VRAM_RESTART_COOLDOWN (600 s): a flapping service changes neither.
    assert frees <= 2 * (elapsed // settings.min_free_interval_s + 1)
    assert restarts <= elapsed // settings.restart_cooldown_s + 1


def test_the_safety_limit_caps_actions_per_service(world: World, logs: list[str]) -> None:
    def decide_always(
        obs: Observation, state: PolicyState, settings: Settings, now: float
    ) -> Decision:
        return Decision((FreeComfy("comfyui/comfyui", FreeStage.SOFT, "buggy policy"),), state)

    daemon = world.daemon(decide=decide_always, record=lambda s, o, n: s)
    for _ in range(MAX_ACTIONS_PER_SERVICE_PER_MIN + 4):
        daemon.run_once()
    assert len(world.comfy.free_calls) == MAX_ACTIONS_PER_SERVICE_PER_MIN
    assert has(logs, "safety limit")


def test_an_action_skipped_by_the_safety_limit_closes_its_episode(world: World) -> None:
    """The policy hears about a refused action at once (a FAILED "skipped" outcome), so
    the free episode it opened does not stay open until it goes stale (300 s)."""
    states: list[PolicyState] = []
    outcomes: list[Outcome] = []

    def decide_always(
        obs: Observation, state: PolicyState, settings: Settings, now: float
    ) -> Decision:
        states.append(state)
        return Decision((FreeComfy("comfyui/comfyui", FreeStage.SOFT, "buggy policy"),), state)

    def record(state: PolicyState, outcome: Outcome, now: float) -> PolicyState:
        outcomes.append(outcome)
        return policy.record(state, outcome, now)

    daemon = world.daemon(decide=decide_always, record=record)
    for _ in range(MAX_ACTIONS_PER_SERVICE_PER_MIN + 2):
        world.clock.sleep(1)
        daemon.run_once()
    done, skipped = outcomes[:-2], outcomes[-2:]
    assert len(done) == MAX_ACTIONS_PER_SERVICE_PER_MIN
    assert all(o.result is not FreeResult.FAILED for o in done)
    for o in skipped:
        assert not o.ok and o.result is FreeResult.FAILED
        assert o.detail == (
            f"skipped: already {MAX_ACTIONS_PER_SERVICE_PER_MIN} actions on it in the last "
            "minute (safety limit)"
        )
    # Open after the executed frees, closed right after the first skipped one.
    assert [e.target for e in states[MAX_ACTIONS_PER_SERVICE_PER_MIN].episodes] == [
        "comfyui/comfyui"
    ]
    assert states[MAX_ACTIONS_PER_SERVICE_PER_MIN + 1].episodes == ()


def test_actions_left_when_stopping_are_recorded_as_skipped(world: World) -> None:
    outcomes: list[Outcome] = []
    actions = (
        FreeComfy("comfyui/comfyui", FreeStage.SOFT, "test"),
        UnloadOllama("ollama/ollama", "llama3.2:latest", "test"),
    )
    world.ollama.load("llama3.2:latest")

    def record(state: PolicyState, outcome: Outcome, now: float) -> PolicyState:
        outcomes.append(outcome)
        daemon.stop()  # a SIGTERM while the first action ran
        return policy.record(state, outcome, now)

    daemon = world.daemon(decide=lambda o, s, st, n: Decision(actions, s), record=record)
    daemon.run_once()
    assert world.comfy.free_calls and world.ollama.unload_calls == []
    assert [o.action for o in outcomes] == list(actions)
    assert outcomes[1].detail == "skipped: the supervisor is stopping"
    assert outcomes[1].result is FreeResult.FAILED and not outcomes[1].ok


def test_dry_run_sends_nothing(world: World, logs: list[str]) -> None:
    daemon = world.daemon(settings=Settings(dry_run=True))
    daemon.run_once()
    world.ollama.load("llama3.2:latest")
    world.clock.sleep(1)
    daemon.run_once()
    assert world.comfy.free_calls == []
    assert has(logs, "DRY RUN: would free ComfyUI comfyui")
    assert daemon.snapshot()["recent_actions"][-1]["dry_run"] is True


def test_spilled_model_is_healed(world: World, logs: list[str]) -> None:
    world.gpu.total_bytes = 14 * GIB
    # ComfyUI alone uses 81% of this GPU: thresholds high enough not to free it for that.
    daemon = world.daemon(settings=Settings(threshold_percent=95, aggressive_threshold_percent=99))
    daemon.run_once()
    world.ollama.load("llama3.2:latest")  # only part of it fits next to ComfyUI
    assert world.ollama.models["llama3.2:latest"].is_spilled
    for _ in range(4):
        world.clock.sleep(1)
        daemon.run_once()
    assert world.ollama.preload_calls == ["llama3.2:latest"]
    assert not world.ollama.models["llama3.2:latest"].is_spilled
    assert has(logs, "Healed Ollama model llama3.2:latest")


def test_a_busy_spilled_model_is_reloaded_once_its_request_ends(
    world: World, logs: list[str]
) -> None:
    """A chat decodes on the spilled model for 60 s: the heal leaves its unload armed
    instead of withdrawing it, the loop goes on, and once Ollama unloads the model at the
    end of the request the loop reloads it, whole on the GPU, with its keep-alive."""
    world.gpu.total_bytes = 14 * GIB
    daemon = world.daemon(settings=Settings(threshold_percent=95, aggressive_threshold_percent=99))
    daemon.run_once()
    world.ollama.load("llama3.2:latest", keep_alive_s=-1)
    world.ollama.busy_until["llama3.2:latest"] = world.clock.now + 60
    for _ in range(4):
        world.clock.sleep(1)
        daemon.run_once()
    assert has(logs, "Heal of Ollama model llama3.2:latest waits for its request to end")
    assert world.ollama.preload_calls == []  # the unload was not withdrawn
    assert world.ollama.keep_alive_s["llama3.2:latest"] == 0  # armed
    busy_until = world.ollama.busy_until["llama3.2:latest"]
    while not world.ollama.preload_calls:
        world.clock.sleep(1)
        daemon.run_once()
        assert world.clock.now < 2000, "the model was never reloaded"
    assert world.clock.now >= busy_until  # the reload waited for the request to end
    assert world.ollama.unload_calls == ["llama3.2:latest"]  # one heal, one unload
    frees = len(world.comfy.free_calls)
    assert world.ollama.preload_calls == ["llama3.2:latest"]
    assert world.ollama.preload_keep_alives == [-1]  # kept forever, as before
    assert not world.ollama.models["llama3.2:latest"].is_spilled
    assert has(logs, "Healed Ollama model llama3.2:latest")
    world.clock.sleep(1)
    daemon.run_once()
    # Its own reload is not a new model: no note, no free for it.
    assert sum("New Ollama model(s) detected" in line for line in logs) == 1
    assert len(world.comfy.free_calls) == frees


def test_fixed_urls_need_no_docker(world: World, logs: list[str]) -> None:
    world.docker.fail = RuntimeError("Docker must not be touched")
    daemon = world.daemon(with_docker=False)
    obs = daemon.observe()
    assert obs.docker_ok is None
    assert {c.status.spec.key for c in obs.comfyuis} == {"comfyui/comfyui"}
    assert world.docker.list_calls == 0
    assert has(logs, "Using comfyui at http://comfyui:8188 (fixed URL)")


def test_a_failing_policy_does_not_stop_the_loop(world: World, logs: list[str]) -> None:
    calls: list[int] = []

    def flaky(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Decision:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("policy bug")
        return Decision((), state, wake_in_s=0.05)

    daemon = world.daemon(
        decide=flaky, record=lambda s, o, n: s, settings=Settings(check_interval_s=0.05)
    )
    t = threading.Thread(target=daemon.run)
    t.start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.stop()
    t.join(2)
    assert len(calls) >= 3 and not t.is_alive()
    assert has(logs, "A pass of the loop failed: policy bug")


def test_stop_ends_the_loop_quickly_and_stops_events(world: World) -> None:
    daemon = world.daemon(settings=Settings(check_interval_s=3600))
    t = threading.Thread(target=daemon.run)
    t.start()
    while daemon.last_pass_at is None:
        time.sleep(0.01)
    start = time.monotonic()
    daemon.stop()
    t.join(2)
    assert not t.is_alive() and time.monotonic() - start < 2
    assert world.events.stopped


def test_docker_events_that_fail_to_start_or_stop_leave_the_loop_polling(
    world: World, logs: list[str]
) -> None:
    """Following Docker events is optional: the loop lists containers every pass anyway.
    An event source that raises (even outside any contract) when started is said and the
    loop polls; one that raises when stopped does not make the shutdown raise."""

    class Broken(FakeEvents):
        def start(self, on_event: Callable[[str], None]) -> None:
            raise RuntimeError("events bug")

        def stop(self) -> None:
            self.stopped = True
            raise RuntimeError("stop bug")

    passes: list[int] = []

    def counted(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Decision:
        passes.append(1)
        return Decision((), state, wake_in_s=0.05)

    world.events = Broken()
    daemon = world.daemon(
        decide=counted, record=lambda s, o, n: s, settings=Settings(check_interval_s=0.05)
    )
    failures: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 - whatever run() raises fails the test
            failures.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 5
    while len(passes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.stop()
    t.join(2)
    assert len(passes) >= 3 and not t.is_alive() and failures == []
    assert has(logs, "Docker events are not followed (events bug); polling only")
    assert world.events.stopped and has(logs, "Stopping Docker events: stop bug")


def test_stop_interrupts_a_verify_wait(world: World) -> None:
    """A free being verified (real sleeps) ends at once on stop, not after the timeout."""
    world.comfy.highvram = True  # the soft free would be watched for VRAM_VERIFY_TIMEOUT
    settings = Settings(verify_timeout_s=60)
    daemon = Daemon(
        settings,
        ollama_client=lambda url: world.ollama,
        comfy_client=lambda url: world.comfy,
        docker=lambda: world.docker,
        gpu=world.reader,
        decide=lambda o, s, st, n: Decision(
            (FreeComfy("comfyui/comfyui", FreeStage.SOFT, "test"),), s
        ),
        record=lambda s, o, n: s,
    )
    t = threading.Thread(target=daemon.run_once)
    t.start()
    while not world.comfy.free_calls:
        time.sleep(0.01)
    assert daemon.busy_since is not None and daemon.health()[0]  # busy counts as alive
    start = time.monotonic()
    daemon.stop()
    t.join(2)
    assert not t.is_alive() and time.monotonic() - start < 2


def test_stop_does_not_wait_for_a_hung_service_read(world: World) -> None:
    """A ComfyUI that accepts and never answers holds a read for VRAM_REQUEST_TIMEOUT (a
    client retries once, too): the loop must not wait it out on SIGTERM (2 s contract)."""
    entered, release = threading.Event(), threading.Event()

    class HungComfy(FakeComfy):
        def queue(self) -> ComfyQueue:
            entered.set()
            release.wait(30)
            return super().queue()

    hung = HungComfy(world.gpu, world.clock)
    daemon = world.daemon(comfy_client=lambda url: hung)
    t = threading.Thread(target=daemon.run)
    t.start()
    try:
        assert entered.wait(5)
        daemon.stop()
        t.join(2)
        assert not t.is_alive(), "the loop still waits for the hung read"
    finally:
        release.set()
        t.join(5)


def test_docker_event_wakes_the_loop_at_once(world: World) -> None:
    passes: list[float] = []

    def counting(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Decision:
        passes.append(time.monotonic())
        return Decision((), state, wake_in_s=3600)

    daemon = world.daemon(
        decide=counting, record=lambda s, o, n: s, settings=Settings(check_interval_s=3600)
    )
    t = threading.Thread(target=daemon.run)
    t.start()
    while not passes:
        time.sleep(0.01)
    world.events.emit("start comfyui")
    deadline = time.monotonic() + 5
    while len(passes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.stop()
    t.join(2)
    assert len(passes) >= 2 and passes[1] - passes[0] < 2


def test_gate_outcomes_are_recorded_by_the_loop(world: World) -> None:
    recorded: list[Outcome] = []

    def record(state: PolicyState, outcome: Outcome, now: float) -> PolicyState:
        recorded.append(outcome)
        return state

    daemon = world.daemon(decide=lambda o, s, st, n: Decision((), s), record=record)
    daemon.run_once()
    assert daemon.room_maker.make_room(world.gpu.free_bytes + GIB, reason="gate", deadline_s=10)
    daemon.run_once()
    assert [type(o.action) for o in recorded] == [FreeComfy]
    assert daemon.snapshot()["recent_actions"][-1]["reason"] == "gate"


def test_health_and_snapshot(world: World) -> None:
    world.ollama.load("llama3.2:latest")
    settings = Settings(check_interval_s=5)
    daemon = world.daemon(settings=settings)
    ok, body = daemon.health()
    assert not ok and body["last_pass_age_s"] is None  # no pass yet: starting
    daemon.run_once()
    ok, body = daemon.health()
    assert ok and body["docker"] == "ok" and body["vram_source"] == "nvml"
    assert body["services"] == {"comfyui/comfyui": "ok", "ollama/ollama": "ok"}
    world.clock.sleep(16)  # more than 3 x VRAM_CHECK_INTERVAL without a pass
    assert not daemon.health()[0]
    snap = json.loads(json.dumps(daemon.snapshot()))
    assert snap["gpus"][0]["total_bytes"] == 24 * GIB
    model = snap["ollama"][0]["models"][0]
    assert model["name"] == "llama3.2:latest" and model["gpu_percent"] == 100.0
    assert snap["comfyui"][0]["queue"] == {"running": 0, "pending": 0}
    assert snap["docker"]["state"] == "ok"


@pytest.mark.parametrize(
    ("gate_port", "serving"),
    [(None, False), (11435, True), (11435, False)],
    ids=["no-gate", "gate", "gate-port-set-but-the-gate-did-not-start"],
)
def test_unload_for_a_busy_comfyui(
    world: World, logs: list[str], gate_port: int | None, serving: bool
) -> None:
    """ComfyUI has work and the GPU is full: idle Ollama models are unloaded, except for a
    Dynamic VRAM ComfyUI without a serving gate (its job pages; a reload during it would
    spill). VRAM_GATE_PORT alone is not a gate: one that did not start holds no reload."""
    world.gpu.total_bytes = 20 * GIB
    world.ollama.load("llama3.2:latest")
    world.ollama.load("qwen:latest", size_bytes=3 * GIB)
    world.comfy.start_prompt(120)
    daemon = world.daemon(settings=replace(Settings(), gate_port=gate_port))
    if serving:
        daemon.ollama_gate_serving = lambda: True  # as the assembly sets it once started
    daemon.run_once()
    world.clock.sleep(1)
    daemon.run_once()
    if world.comfy.dynamic_vram and not serving:
        assert world.ollama.unload_calls == [], logs
        assert any("under Dynamic VRAM the job pages its weights" in line for line in logs)
    else:
        assert world.ollama.unload_calls, logs
    assert world.comfy.free_calls == []  # a busy ComfyUI is not freed under balanced
    said = sum("the Ollama gate is not serving: trigger 4 acts as" in line for line in logs)
    assert said == (1 if gate_port is not None and not serving else 0)  # once, not per pass
    assert Role.OLLAMA  # (keeps the import meaningful for readers of the scenario)


def test_docker_top_is_read_again_only_when_a_new_gpu_process_appears(world: World) -> None:
    daemon = world.daemon()
    daemon.observe()
    assert world.docker.top_calls == 2  # one per container
    daemon.observe()
    assert world.docker.top_calls == 2
    world.gpu.held[99999] = GIB  # a CUDA process outside every container
    daemon.observe()
    daemon.observe()
    assert world.docker.top_calls == 4  # looked once, then remembered as foreign
    world.ollama.load("llama3.2:latest")  # Ollama starts a runner: a new PID
    obs = daemon.observe()
    assert world.docker.top_calls == 6
    assert obs.ollamas[0].vram_bytes == 4 * GIB


def test_a_pass_waiting_on_a_hung_service_still_counts_as_alive(world: World) -> None:
    """/healthz must not call the supervisor dead because ComfyUI hangs, yet a pass that
    never ends is caught."""
    seen: list[bool] = []
    daemon: Daemon

    def slow(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Decision:
        for waited in (20, 20):  # 20 s: past 3 x 5 s, within the reads' grace; 40 s: not
            world.clock.sleep(waited)
            seen.append(daemon.health()[0])
        return Decision((), state)

    daemon = world.daemon(decide=slow, record=lambda s, o, n: s)
    daemon.run_once()
    assert seen == [True, False]
    assert daemon.health()[0]  # the pass ended: fresh again


def test_without_nvml_a_dynamic_vram_estimate_that_is_right_is_freed_by_a_soft_free(
    world: World, logs: list[str]
) -> None:
    """The device bound is only an estimate, but when ComfyUI really holds its weights a soft
    free (unload_models) releases them (api-facts-2026 section 2): freed and verified, no
    hard free."""
    world.comfy.dynamic_vram = True
    daemon = world.daemon(nvml=False)
    daemon.run_once()
    world.ollama.load("llama3.2:latest")
    world.clock.sleep(1)
    daemon.run_once()
    assert world.comfy.free_calls == [(True, False)]
    assert has(logs, "Freed ComfyUI memory (soft)")
    recent = daemon.snapshot()["recent_actions"]
    assert recent[-1]["action"] == "FreeComfy" and recent[-1]["result"] == "freed"
    world.clock.sleep(1)
    daemon.run_once()
    assert world.comfy.free_calls == [(True, False)]  # no hard free after it
