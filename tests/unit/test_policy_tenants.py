"""decide() with model servers of the registry's other kinds (llama-server, llama-swap):
their new models free idle ComfyUIs, their idle models are unloaded for a ComfyUI with work
and never a busy one or one of a server without an unload, and VRAM_PRIORITY ranks any
pair of roles (plus the vram-supervisor.priority label)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_policy_builders import NOW, baseline, comfy, gpu, model, ollama, run, skipped, summary

from supervisor.config import Settings
from supervisor.model import (
    ComfyObservation,
    FreeJobs,
    JobServerObservation,
    JobState,
    ModelServerObservation,
    Observation,
    OllamaObservation,
    Outcome,
    PolicyState,
    ServedModel,
    ServedState,
    ServiceSpec,
    ServiceStatus,
    UnloadModel,
    VramSource,
    WakeModel,
)
from supervisor.policy import record
from supervisor.units import GIB

SWAP = "llama-swap/swap"


def server(
    *models: ServedModel,
    role: str = "llama-swap",
    name: str = "swap",
    can_unload: bool = True,
    reachable: bool = True,
    vram: float | None = None,
    priority: int = 0,
    gpus: tuple[str, ...] = (),
) -> ModelServerObservation:
    spec = ServiceSpec(
        role, name, "http://127.0.0.1:8080", f"id-{name}", gpu_uuids=gpus, priority=priority
    )
    status = ServiceStatus(spec, is_running=True, is_reachable=reachable)
    state = ServedState(tuple(models), can_unload=can_unload) if reachable else None
    return ModelServerObservation(
        status, role, state, int(vram * GIB) if vram is not None else None
    )


def served(
    name: str, state: str = "ready", busy: bool | None = None, size: float | None = None
) -> ServedModel:
    return ServedModel(name, state, busy, int(size * GIB) if size else None)


def observe(*services: object, used: float = 20) -> Observation:
    return Observation(
        at=NOW,
        source=VramSource.NVML,
        gpus=(gpu(used=used),),
        ollamas=tuple(s for s in services if isinstance(s, OllamaObservation)),
        comfyuis=tuple(s for s in services if isinstance(s, ComfyObservation)),
        model_servers=tuple(s for s in services if isinstance(s, ModelServerObservation)),
        docker_ok=True,
    )


def knowing(*servers: ModelServerObservation) -> PolicyState:
    """The state after a pass that saw these servers and their resident models."""
    known = frozenset(
        (s.status.spec.key, m.name) for s in servers for m in s.models if m.is_resident
    )
    return replace(
        baseline(), known_models=known, seen_ollamas=frozenset(s.status.spec.key for s in servers)
    )


QWEN, GEMMA = served("qwen", size=9), served("gemma", size=5)
BUSY_QWEN = served("qwen", busy=True, size=9)


@pytest.mark.parametrize(
    ("observation", "state", "settings", "expected"),
    [
        pytest.param(
            observe(server(QWEN, GEMMA), comfy(running=1)),
            knowing(server(QWEN, GEMMA)),
            Settings(),
            [f"unload:{SWAP}:qwen"],  # the larger first: 9 GiB brings 20 below 18
            id="comfy-with-work-unloads-the-largest-idle-model",
        ),
        pytest.param(
            observe(server(BUSY_QWEN, GEMMA), comfy(running=1)),
            knowing(server(BUSY_QWEN, GEMMA)),
            Settings(),
            [f"unload:{SWAP}:gemma"],
            id="never-a-busy-model",
        ),
        pytest.param(
            observe(server(served("qwen"), served("gemma")), comfy(running=1)),
            knowing(server(served("qwen"), served("gemma"))),
            Settings(),
            [f"unload:{SWAP}:gemma"],  # sizes unknown: one per round (by name)
            id="unknown-sizes-one-per-round",
        ),
        pytest.param(
            observe(server(QWEN, can_unload=False, role="llama-server"), comfy(running=1)),
            knowing(server(QWEN, can_unload=False, role="llama-server")),
            Settings(),
            [],
            id="single-model-llama-server-has-no-unload",
        ),
        pytest.param(
            observe(server(served("qwen", state="starting")), comfy(running=1)),
            knowing(server(served("qwen", state="starting"))),
            Settings(),
            [],
            id="a-loading-model-is-not-unloaded",
        ),
        pytest.param(
            observe(server(QWEN), comfy(running=1), used=10),
            knowing(server(QWEN)),
            Settings(),
            [],
            id="below-the-threshold-nothing",
        ),
        pytest.param(
            observe(server(QWEN), comfy()),
            knowing(server(QWEN)),
            Settings(),
            ["free:soft:comfyui"],  # over the threshold: the idle ComfyUI is freed instead
            id="idle-comfy-is-freed-not-the-model",
        ),
        pytest.param(
            observe(server(QWEN), comfy(running=1)),
            knowing(server(QWEN)),
            Settings(priority="llama-swap"),
            ["free:soft:comfyui"],  # and its work does not protect the ComfyUI (flags wait)
            id="priority-llama-swap-keeps-its-models",
        ),
        pytest.param(
            observe(server(QWEN), comfy(running=1)),
            knowing(server(QWEN)),
            Settings(priority="comfyui,llama-swap"),
            [f"unload:{SWAP}:qwen"],
            id="priority-list-comfyui-first",
        ),
        pytest.param(
            observe(server(QWEN, priority=5), comfy(running=1)),
            knowing(server(QWEN, priority=5)),
            Settings(),
            ["free:soft:comfyui"],
            id="label-priority-breaks-the-balanced-tie",
        ),
        pytest.param(
            observe(server(QWEN, GEMMA, served("phi", size=2)), comfy()),
            knowing(server(QWEN, GEMMA)),
            Settings(),
            ["free:soft:comfyui"],
            id="a-new-model-frees-the-idle-comfy",
        ),
        pytest.param(
            observe(server(QWEN, served("phi", state="starting")), comfy(), used=10),
            knowing(server(QWEN)),
            Settings(),
            ["free:soft:comfyui"],
            id="a-model-starting-to-load-frees-the-idle-comfy",
        ),
        pytest.param(
            observe(
                server(QWEN, served("phi", state="starting"), priority=3), comfy(running=1), used=10
            ),
            knowing(server(QWEN)),
            Settings(),
            ["free:soft:comfyui"],  # it ranks above the ComfyUI: its work does not protect it
            id="a-higher-ranked-load-frees-a-busy-comfy",
        ),
        pytest.param(
            observe(server(QWEN, served("phi", state="starting")), comfy(running=1), used=10),
            knowing(server(QWEN)),
            Settings(),
            [],
            id="balanced-never-frees-a-busy-comfy-for-a-load",
        ),
        pytest.param(
            observe(server(QWEN, reachable=False), comfy(running=1)),
            knowing(server(QWEN)),
            Settings(),
            [],
            id="an-unreadable-server-is-left-alone",
        ),
    ],
)
def test_model_servers(
    observation: Observation, state: PolicyState, settings: Settings, expected: list[str]
) -> None:
    assert summary(run(observation, state, settings)) == expected


def test_ollama_and_a_model_server_both_yield_ollama_first() -> None:
    swap = server(QWEN)
    o = ollama(model("llama3:8b", 4))
    observation = observe(o, swap, comfy(running=1), used=23)
    state = replace(
        knowing(swap),
        known_models=knowing(swap).known_models | {("ollama/ollama", "llama3:8b")},
        seen_ollamas=frozenset({SWAP, "ollama/ollama"}),
    )
    # 23 GiB used, target 18: Ollama's 4 GiB first (its order is by expiry), then qwen.
    assert summary(run(observation, state, Settings())) == [
        "unload:llama3:8b",
        f"unload:{SWAP}:qwen",
    ]


def test_the_unload_round_is_rate_limited_like_ollama_s() -> None:
    swap = server(QWEN)
    state = replace(knowing(swap), last_unload_at=NOW - 5)
    d = run(observe(swap, comfy(running=1)), state, Settings())
    assert summary(d) == []
    assert "Not unloading models yet" in skipped(d) and "rate limit" in skipped(d)


def test_new_model_note_names_the_server() -> None:
    d = run(observe(server(QWEN, GEMMA), comfy(held=0.1)), knowing(server(QWEN)), Settings())
    assert "New llama-swap model(s) detected: gemma on llama-swap/swap" in d.notes


def test_the_unload_names_the_situation() -> None:
    d = run(observe(server(QWEN), comfy(running=1)), knowing(server(QWEN)), Settings())
    (action,) = d.actions
    assert isinstance(action, UnloadModel)
    assert action.reason == "comfyui/comfyui has work and GPU 0 is at 83% (threshold 75%)"


# --------------------------------------------------------------------------- job servers
WEBUI = "sd-webui/webui"


def job_server(
    busy: bool | None = False,
    *,
    can_free: bool = True,
    vram: float | None = 6,
    reachable: bool = True,
    name: str = "webui",
) -> JobServerObservation:
    spec = ServiceSpec("sd-webui", name, "http://127.0.0.1:7860", f"id-{name}")
    status = ServiceStatus(spec, is_running=True, is_reachable=reachable)
    state = JobState(busy, can_free) if reachable else None
    return JobServerObservation(
        status, "sd-webui", state, int(vram * GIB) if vram is not None else None
    )


def jobs_summary(d: object) -> list[str]:
    return [
        f"freejobs:{a.target}" if isinstance(a, FreeJobs) else f"{type(a).__name__}:{a.target}"
        for a in d.actions  # type: ignore[attr-defined]
    ]


@pytest.mark.parametrize(
    ("services", "state", "expected"),
    [
        pytest.param(
            (job_server(),), baseline(), [f"freejobs:{WEBUI}"], id="over-threshold-idle-is-freed"
        ),
        pytest.param((job_server(True),), baseline(), [], id="busy-is-never-freed"),
        pytest.param((job_server(None),), baseline(), [], id="unknown-work-is-never-freed"),
        pytest.param((job_server(can_free=False),), baseline(), [], id="no-free-call"),
        pytest.param((job_server(vram=0.1),), baseline(), [], id="holds-too-little"),
        pytest.param((job_server(reachable=False),), baseline(), [], id="unreadable"),
        pytest.param(
            (job_server(),),
            replace(baseline(), last_job_free_at=((WEBUI, NOW - 5),)),
            [],
            id="rate-limited-per-server",
        ),
        pytest.param(
            (job_server(),),
            replace(baseline(), last_job_free_at=((WEBUI, NOW - 31),)),
            [f"freejobs:{WEBUI}"],
            id="after-the-interval-again",
        ),
        pytest.param(
            (job_server(True), server(QWEN)),
            knowing(server(QWEN)),
            [f"UnloadModel:{SWAP}"],
            id="a-busy-job-server-makes-idle-models-unload",
        ),
    ],
)
def test_job_servers(services: tuple[object, ...], state: PolicyState, expected: list[str]) -> None:
    observation = replace(
        observe(*services),
        job_servers=tuple(s for s in services if isinstance(s, JobServerObservation)),
    )
    assert jobs_summary(run(observation, state, Settings())) == expected


def test_a_new_model_frees_an_idle_job_server_below_the_threshold() -> None:
    observation = replace(observe(server(QWEN, GEMMA), used=10), job_servers=(job_server(),))
    d = run(observation, knowing(server(QWEN)), Settings())
    assert jobs_summary(d) == [f"freejobs:{WEBUI}"]
    assert d.actions[0].reason == "new llama-swap model(s) gemma on llama-swap/swap"  # type: ignore[union-attr]


def test_a_sleeping_model_with_waiting_requests_is_woken_after_room_is_made() -> None:
    vllm = ModelServerObservation(
        ServiceStatus(
            ServiceSpec("vllm", "vllm", "http://127.0.0.1:8000", "id-v"), True, is_reachable=True
        ),
        "vLLM",
        ServedState((served("qwen", state="sleeping"),), can_unload=True, waiting=2, can_wake=True),
    )
    observation = replace(observe(vllm, comfy(), used=10), job_servers=(job_server(),))
    d = run(observation, knowing(vllm), Settings())
    kinds = sorted(type(a).__name__ for a in d.actions)
    assert kinds == ["FreeComfy", "FreeJobs", "WakeModel"]
    wake = next(a for a in d.actions if isinstance(a, WakeModel))
    assert wake.reason == "2 request(s) wait for sleeping model qwen on vllm/vllm"


def test_no_wake_without_waiting_requests() -> None:
    vllm = ModelServerObservation(
        ServiceStatus(
            ServiceSpec("vllm", "vllm", "http://127.0.0.1:8000", "id-v"), True, is_reachable=True
        ),
        "vLLM",
        ServedState((served("qwen", state="sleeping"),), can_unload=True, waiting=0, can_wake=True),
    )
    assert run(observe(vllm, used=10), knowing(vllm), Settings()).actions == ()


def parked_server(
    busy: bool | None = False, parked: float | None = 6.5, *, name: str = "webui"
) -> JobServerObservation:
    """A job server whose last free parked its weights in CPU RAM (A1111)."""
    spec = ServiceSpec("sd-webui", name, "http://127.0.0.1:7860", f"id-{name}")
    status = ServiceStatus(spec, is_running=True, is_reachable=True)
    parked_bytes = int(parked * GIB) if parked is not None else None
    state = JobState(busy, True, mode="a1111", parked_bytes=parked_bytes)
    return JobServerObservation(status, "SD web UI", state, int(0.4 * GIB))


@pytest.mark.parametrize(
    ("job", "used", "state", "expected"),
    [
        pytest.param(parked_server(), 8, baseline(), ["ReloadJobs"], id="room-again-reloads"),
        pytest.param(parked_server(), 12.5, baseline(), [], id="no-room-under-the-threshold"),
        pytest.param(parked_server(parked=0), 12.5, baseline(), ["ReloadJobs"], id="size-unknown"),
        pytest.param(parked_server(True), 8, baseline(), [], id="busy-is-never-reloaded"),
        pytest.param(parked_server(None), 8, baseline(), [], id="unknown-work-not-reloaded"),
        pytest.param(parked_server(parked=None), 8, baseline(), [], id="nothing-parked"),
        pytest.param(
            parked_server(),
            8,
            replace(baseline(), last_job_free_at=((WEBUI, NOW - 5),)),
            [],
            id="not-right-after-its-free",
        ),
        pytest.param(
            parked_server(),
            8,
            replace(baseline(), last_job_free_at=((WEBUI, NOW - 31),)),
            ["ReloadJobs"],
            id="after-the-interval",
        ),
    ],
)
def test_parked_weights_are_reloaded_once_there_is_room(
    job: JobServerObservation, used: float, state: PolicyState, expected: list[str]
) -> None:
    """A1111's free parks its weights in CPU RAM and its next job does not move them back:
    the policy reloads them (ReloadJobs) while the server is idle, once its GPU has room
    for them under VRAM_THRESHOLD (75 % of 24 GiB = 18 GiB), one action on it per
    VRAM_MIN_FREE_INTERVAL."""
    observation = replace(observe(used=used), job_servers=(job,))
    d = run(observation, state, Settings())
    assert [type(a).__name__ for a in d.actions] == expected
    if expected:
        assert d.state.last_job_free_at == ((WEBUI, NOW),)
    elif used == 12.5 and job.state and job.state.parked_bytes:
        assert any("no room for 6.5 GiB" in s for s in d.reasons_skipped), d.reasons_skipped


def test_a_new_model_frees_and_does_not_reload_in_the_same_pass() -> None:
    observation = replace(
        observe(server(QWEN, GEMMA), used=8), job_servers=(parked_server(parked=6.5),)
    )
    d = run(observation, knowing(server(QWEN)), Settings())
    assert [type(a).__name__ for a in d.actions] == ["FreeJobs"]  # its context, no reload


def sleeping_vllm(waiting: int = 1, state: str = "sleeping") -> ModelServerObservation:
    return ModelServerObservation(
        ServiceStatus(
            ServiceSpec("vllm", "vllm", "http://127.0.0.1:8000", "id-v"), True, is_reachable=True
        ),
        "vLLM",
        ServedState(
            (served("qwen", state=state),), can_unload=True, waiting=waiting, can_wake=True
        ),
    )


@pytest.mark.parametrize(
    "slept_gib, used_gib, expected",
    [
        (None, 20, ["FreeComfy", "WakeModel"]),  # never measured (slept by someone else)
        (14, 20, ["FreeComfy"]),  # 4 GiB free, 14 needed: room is made, no wake yet
        (14, 10, ["FreeComfy", "WakeModel"]),  # 14 GiB free: woken
    ],
)
def test_a_sleeping_model_is_woken_only_when_what_its_sleep_gave_back_is_free(
    slept_gib: int | None, used_gib: float, expected: list[str]
) -> None:
    vllm = sleeping_vllm()
    state = knowing(vllm)
    if slept_gib is not None:
        state = replace(state, slept_bytes=(("vllm/vllm|qwen", slept_gib * GIB),))
    d = run(observe(vllm, comfy(), used=used_gib), state, Settings())
    assert sorted(type(a).__name__ for a in d.actions) == expected
    if "WakeModel" not in expected:
        assert any("Not waking qwen on vllm/vllm yet: its sleep gave back 14.0 GiB" in n
                   for n in d.notes), d.notes  # fmt: skip
        assert d.state.slept_bytes == (("vllm/vllm|qwen", 14 * GIB),)
        # Said once while it lasts.
        again = run(observe(vllm, comfy(), used=used_gib), d.state, Settings())
        assert not any("Not waking" in n for n in again.notes)


def test_what_a_sleep_gave_back_is_recorded_and_forgotten_once_awake() -> None:
    unload = UnloadModel("vllm/vllm", "qwen", "room for a job")
    slept = record(
        baseline(),
        Outcome(unload, NOW, ok=True, before_bytes=2 * GIB, after_bytes=16 * GIB),
        NOW,
    )
    assert slept.slept_bytes == (("vllm/vllm|qwen", 14 * GIB),)
    # A failed sleep, or one that gave nothing back, is not recorded.
    for outcome in (
        Outcome(unload, NOW, ok=False, before_bytes=2 * GIB, after_bytes=16 * GIB),
        Outcome(unload, NOW, ok=True, before_bytes=2 * GIB, after_bytes=2 * GIB),
    ):
        assert record(baseline(), outcome, NOW).slept_bytes == ()
    woken = record(slept, Outcome(WakeModel("vllm/vllm", "qwen", "x"), NOW, ok=True), NOW)
    assert woken.slept_bytes == ()
    # Woken by someone else: the next pass that reads it awake forgets the figure.
    awake = sleeping_vllm(waiting=0, state="loaded")
    d = run(observe(awake, used=20), replace(knowing(awake), slept_bytes=slept.slept_bytes))
    assert d.state.slept_bytes == ()


@pytest.mark.parametrize(
    ("models", "vram", "spilled"),
    [
        ((served("qwen", state="loaded", size=9),), 10.5, None),  # weights + KV: on the GPU
        ((served("qwen", state="loaded", size=9),), 6.0, ("qwen", 6 / 9)),  # --fit offloaded
        ((served("qwen", state="loaded", size=9),), None, None),  # no NVML: cannot judge
        ((served("qwen", state="loaded"),), 2.0, None),  # size unknown
        (
            (served("qwen", state="loaded", size=9), served("phi", state="loaded", size=2)),
            3.0,
            None,
        ),
        ((served("qwen", state="loading", size=9),), 1.0, None),  # still loading
    ],
)
def test_a_model_that_runs_partly_on_the_cpu_is_seen(
    models: tuple[ServedModel, ...], vram: float | None, spilled: tuple[str, float] | None
) -> None:
    m = server(*models, role="llama-server", vram=vram)
    found = m.spilled
    assert (None if found is None else (found[0].name, pytest.approx(found[1]))) == spilled


def test_a_spilled_model_is_said_once_and_not_acted_on() -> None:
    m = server(served("qwen", state="loaded", size=9), role="llama-server", name="llama", vram=6)
    state = knowing(m)
    first = run(observe(m, used=10), state, Settings())
    assert first.actions == ()
    (note,) = [n for n in first.notes if "runs partly on the CPU" in n]
    assert note.startswith("llama-server model qwen on llama-server/llama runs partly on the CPU")
    assert "67% of its 9.0 GiB" in note
    again = run(observe(m, used=10), first.state, Settings())
    assert not [n for n in again.notes if "runs partly on the CPU" in n]
