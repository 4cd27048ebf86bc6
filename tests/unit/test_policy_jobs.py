"""The view of every job server that triggers 1, 2 and 4 loop over (policy/jobs.py):
whether a job server has work (trigger 4 unloads idle models for it), whether its jobs
page rather than fail, which GPU a free for a model server's load names, in which order
the triggers meet the job servers, and what asking one for a free does: ComfyUI's staged
episode and the other kinds' one free while idle alike."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_policy_builders import (
    COMFY,
    NOW,
    baseline,
    comfy,
    gpu,
    model,
    obs,
    ollama,
    run,
    summary,
)

from supervisor.config import Settings
from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    FreeJobs,
    JobServerObservation,
    JobState,
    Observation,
    PolicyState,
    ServiceSpec,
    ServiceStatus,
    VramSource,
)
from supervisor.policy.jobs import (
    JobServerView,
    comfy_job_server,
    job_servers,
    job_servers_on,
    other_job_server,
)
from supervisor.policy.scratch import Pass, Want, start_pass
from supervisor.units import GIB

WEBUI = "sd-webui/webui"


def job_server(
    busy: bool | None = False,
    *,
    name: str = "webui",
    running: bool = True,
    reachable: bool = True,
    readable: bool = True,
    can_free: bool = True,
    vram: float | None = 6,
    gpus: tuple[str, ...] = (),
    priority: int = 0,
) -> JobServerObservation:
    spec = ServiceSpec(
        "sd-webui",
        name,
        "http://127.0.0.1:7860",
        f"id-{name}",
        gpu_uuids=gpus,
        priority=priority,
    )
    status = ServiceStatus(spec, is_running=running, is_reachable=running and reachable)
    state = JobState(busy, can_free) if readable else None
    vram_bytes = int(vram * GIB) if vram is not None else None
    return JobServerObservation(status, "SD web UI", state, vram_bytes)


def a_pass(
    *services: ComfyObservation | JobServerObservation,
    gpus: tuple[float, ...] = (80,),
    state: PolicyState | None = None,
    s: Settings | None = None,
) -> Pass:
    """A pass over GPUs used to these percentages of 24 GiB ("GPU-0", "GPU-1" ...)."""
    observation = Observation(
        at=NOW,
        source=VramSource.NVML,
        gpus=tuple(
            gpu(used=24 * pct / 100, uuid=f"GPU-{i}", index=i) for i, pct in enumerate(gpus)
        ),
        comfyuis=tuple(x for x in services if isinstance(x, ComfyObservation)),
        job_servers=tuple(x for x in services if isinstance(x, JobServerObservation)),
        docker_ok=True,
    )
    return start_pass(observation, state or PolicyState(is_initialised=True), s or Settings(), NOW)


# --------------------------------------------------------------------------- the view

VIEW_CASES = [
    pytest.param(comfy(), ("ComfyUI", (), False, False, True), id="comfy-idle"),
    pytest.param(comfy(running=1), ("ComfyUI", (), True, False, True), id="comfy-running"),
    pytest.param(comfy(pending=2), ("ComfyUI", (), True, False, True), id="comfy-waiting"),
    pytest.param(
        comfy(running=1, queue=False), ("ComfyUI", (), False, False, True), id="comfy-queue-unread"
    ),
    pytest.param(
        comfy(running=1, reachable=False),
        ("ComfyUI", (), False, False, True),
        id="comfy-unreachable",
    ),
    pytest.param(
        comfy(running=1, is_running=False), ("ComfyUI", (), False, False, True), id="comfy-stopped"
    ),
    pytest.param(
        comfy(running=1, mode=ComfyMode.DYNAMIC),
        ("ComfyUI", (), True, True, True),
        id="comfy-dynamic-vram-pages",
    ),
    pytest.param(
        comfy(gpus=("GPU-1",)), ("ComfyUI", ("GPU-1",), False, False, True), id="comfy-granted"
    ),
    pytest.param(job_server(), ("SD web UI", (), False, False, False), id="job-idle"),
    pytest.param(job_server(True), ("SD web UI", (), True, False, False), id="job-busy"),
    pytest.param(job_server(None), ("SD web UI", (), False, False, False), id="job-unknown"),
    pytest.param(
        job_server(True, reachable=False),
        ("SD web UI", (), False, False, False),
        id="job-unreachable",
    ),
    pytest.param(
        job_server(True, running=False), ("SD web UI", (), False, False, False), id="job-stopped"
    ),
    pytest.param(
        job_server(readable=False), ("SD web UI", (), False, False, False), id="job-unread"
    ),
    pytest.param(
        job_server(gpus=("GPU-0",)),
        ("SD web UI", ("GPU-0",), False, False, False),
        id="job-granted",
    ),
]


def view_of(x: ComfyObservation | JobServerObservation) -> JobServerView:
    return comfy_job_server(x) if isinstance(x, ComfyObservation) else other_job_server(x)


@pytest.mark.parametrize(("service", "expected"), VIEW_CASES)
def test_view_of_one_job_server(
    service: ComfyObservation | JobServerObservation,
    expected: tuple[str, tuple[str, ...], bool, bool, bool],
) -> None:
    v = view_of(service)
    assert v.key == service.status.spec.key
    assert (v.title, v.gpus, v.has_work, v.pages_when_short, v.names_gpu) == expected


def test_job_servers_lists_the_comfyuis_first_in_reading_order() -> None:
    p = a_pass(
        job_server(name="j1"),
        comfy("c1"),
        job_server(name="j2"),
        comfy("c2"),
    )
    keys = [v.key for v in job_servers(p)]
    assert keys == ["comfyui/c1", "comfyui/c2", "sd-webui/j1", "sd-webui/j2"]


@pytest.mark.parametrize(
    ("gpu_index", "expected"),
    [
        pytest.param(0, ["comfyui/all", "comfyui/g0", "sd-webui/g0", "sd-webui/all"], id="gpu-0"),
        pytest.param(1, ["comfyui/all", "comfyui/g1", "sd-webui/all"], id="gpu-1"),
    ],
)
def test_job_servers_on_a_gpu(gpu_index: int, expected: list[str]) -> None:
    p = a_pass(
        job_server(name="g0", gpus=("GPU-0",)),
        comfy("all"),
        comfy("g1", gpus=("GPU-1",)),
        job_server(name="all"),
        comfy("g0", gpus=("GPU-0",)),
        gpus=(50, 50),
    )
    assert [v.key for v in job_servers_on(p, p.gpus[gpu_index])] == expected


# GPU-0 at 50 %, GPU-1 at 90 %, GPU-2 at 90 % (a tie with GPU-1).
GPU_FOR_CASES = [
    pytest.param(comfy(), (), "GPU-1", id="comfy-any-gpu-hottest-first-on-a-tie"),
    pytest.param(comfy(), ("GPU-0",), "GPU-0", id="comfy-the-servers-gpu"),
    pytest.param(comfy(), ("GPU-0", "GPU-2"), "GPU-2", id="comfy-hottest-the-server-uses"),
    pytest.param(comfy(gpus=("GPU-0", "GPU-2")), (), "GPU-2", id="comfy-hottest-it-uses"),
    pytest.param(comfy(gpus=("GPU-0",)), ("GPU-0", "GPU-1"), "GPU-0", id="comfy-the-one-shared"),
    pytest.param(comfy(gpus=("GPU-0",)), ("GPU-1",), None, id="comfy-none-shared"),
    pytest.param(comfy(gpus=("GPU-9",)), (), None, id="comfy-gpu-not-read"),
    pytest.param(job_server(), (), None, id="job-names-none"),
    pytest.param(job_server(gpus=("GPU-1",)), ("GPU-1",), None, id="job-names-none-even-shared"),
]


@pytest.mark.parametrize(("service", "near", "expected"), GPU_FOR_CASES)
def test_the_gpu_a_free_for_a_model_server_names(
    service: ComfyObservation | JobServerObservation, near: tuple[str, ...], expected: str | None
) -> None:
    p = a_pass(service, gpus=(50, 90, 90))
    assert view_of(service).gpu_for(p.gpus, near) == expected


# --------------------------------------------------------------------------- its free


def test_a_comfyuis_free_is_a_want_that_opens_a_staged_episode_later() -> None:
    c = comfy()
    p = a_pass(c)
    comfy_job_server(c).free(p, "GPU 0 at 80%", "GPU-0")
    assert p.wants == {COMFY: Want("GPU 0 at 80%", "GPU-0")}
    assert (p.actions, p.skipped) == ([], [])


def test_a_busy_comfyuis_free_is_refused_with_why() -> None:
    c = comfy(running=1)
    p = a_pass(c)
    comfy_job_server(c).free(p, "GPU 0 at 80%", "GPU-0")
    assert p.wants == {}
    assert p.skipped == [
        f"Not freeing {COMFY} (GPU 0 at 80%): {COMFY} has work (1 running, 0 pending) "
        "and priority balanced frees it only when idle"
    ]


FREE_CASES = [
    pytest.param(job_server(), None, [FreeJobs(WEBUI, "why", "GPU-0")], [], id="idle-freed"),
    pytest.param(
        job_server(True),
        None,
        [],
        [f"Not freeing {WEBUI} (why): it has work; it is freed only when idle"],
        id="busy",
    ),
    pytest.param(
        job_server(None),
        None,
        [],
        [
            f"Not freeing {WEBUI} (why): it may have work (its queue is unknown); "
            "it is freed only when idle"
        ],
        id="queue-unknown",
    ),
    pytest.param(
        job_server(can_free=False),
        None,
        [],
        [f"Not freeing {WEBUI} (why): SD web UI has no free call"],
        id="no-free-call",
    ),
    pytest.param(job_server(vram=0.1), None, [], [], id="holds-too-little"),
    pytest.param(job_server(reachable=False), None, [], [], id="unreachable"),
    pytest.param(job_server(readable=False), None, [], [], id="unread"),
    pytest.param(
        job_server(),
        NOW - 10,
        [],
        [f"Not freeing {WEBUI} yet (why): rate limit, 20 s left"],
        id="rate-limited",
    ),
    pytest.param(job_server(), NOW - 30, [FreeJobs(WEBUI, "why", "GPU-0")], [], id="interval-over"),
]


@pytest.mark.parametrize(("service", "last_free", "actions", "skipped"), FREE_CASES)
def test_another_kinds_free_is_one_free_while_idle(
    service: JobServerObservation,
    last_free: float | None,
    actions: list[FreeJobs],
    skipped: list[str],
) -> None:
    state = PolicyState(is_initialised=True)
    if last_free is not None:
        state = replace(state, last_job_free_at=((WEBUI, last_free),))
    p = a_pass(service, state=state)
    other_job_server(service).free(p, "why", "GPU-0")
    assert (p.actions, p.skipped, p.wants) == (actions, skipped, {})
    assert (p.job_free_at.get(WEBUI) == NOW) is bool(actions)


def test_a_free_without_a_gpu_names_none() -> None:
    j = job_server()
    p = a_pass(j)
    other_job_server(j).free(p, "why")
    assert p.actions == [FreeJobs(WEBUI, "why", None)]


# --------------------------------------------------------------------------- trigger 4


@pytest.mark.parametrize(
    ("busy", "unloads"),
    [
        pytest.param(
            [comfy(running=1, mode=ComfyMode.DYNAMIC, vram=6, measured=True)],
            False,
            id="dynamic-pages",
        ),
        pytest.param([comfy(running=1)], True, id="classic"),
        pytest.param([job_server(True)], True, id="other-kind"),
        pytest.param(
            [comfy(running=1, mode=ComfyMode.DYNAMIC, vram=6, measured=True), job_server(True)],
            True,
            id="dynamic-and-other-kind",
        ),
    ],
)
def test_idle_models_stay_loaded_only_when_every_busy_job_server_pages(
    busy: list[ComfyObservation | JobServerObservation], unloads: bool
) -> None:
    # No gate in front of Ollama (VRAM_GATE_PORT unset), GPU 0 at 83 %.
    o = ollama(model("llama3:8b"))
    observation = replace(
        obs(o, *(x for x in busy if isinstance(x, ComfyObservation)), gpus=(gpu(used=20),)),
        job_servers=tuple(x for x in busy if isinstance(x, JobServerObservation)),
    )
    d = run(observation, baseline(o))
    assert (summary(d) == ["unload:llama3:8b"]) is unloads
    paging = [r for r in d.reasons_skipped if "under Dynamic VRAM the job pages" in r]
    assert bool(paging) is not unloads
