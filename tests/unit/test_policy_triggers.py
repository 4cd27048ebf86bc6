"""decide(): the four triggers, per-GPU targeting, priorities, rate limits, bad readings."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from test_policy_builders import (
    COMFY,
    NOW,
    OLLAMA,
    baseline,
    comfy,
    episode,
    gpu,
    model,
    obs,
    ollama,
    run,
    settings,
    skipped,
    summary,
)

from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    FreeComfy,
    FreeStage,
    Observation,
    OllamaModel,
    PolicyState,
    Priority,
    UnloadOllama,
)

LLAMA = model("llama3:8b", 5)
QWEN = model("qwen2.5:14b", 9)
OLD = ollama(LLAMA)  # what the previous pass saw
BALANCED, OLLAMA_FIRST, COMFY_FIRST = Priority.BALANCED, Priority.OLLAMA, Priority.COMFYUI
EARLY = "2026-08-21T18:00:00Z"
LATE = "2026-08-21T18:30:00.123456789-00:00"  # Go's nanosecond RFC 3339
FOREVER = "2318-01-01T00:00:00Z"  # keep_alive -1


def _p(
    id: str,
    o: Observation,
    expected: list[str],
    state: PolicyState | None = None,
    priority: Priority = BALANCED,
) -> object:
    return pytest.param(o, state or baseline(OLD), priority, expected, id=id)


CASES = [
    # --- trigger 1: a new model in /api/ps
    _p("new-model-frees-idle-comfy", obs(ollama(LLAMA, QWEN), comfy()), ["free:soft:comfyui"]),
    _p("no-new-model-no-action", obs(ollama(LLAMA), comfy()), []),
    _p("model-gone-is-not-new", obs(ollama(), comfy()), []),
    _p("new-model-comfy-holds-little", obs(ollama(LLAMA, QWEN), comfy(held=0.1)), []),
    _p("new-model-comfy-on-cpu", obs(ollama(LLAMA, QWEN), comfy(device="cpu")), []),
    _p("new-model-comfy-busy-balanced", obs(ollama(LLAMA, QWEN), comfy(running=1)), []),
    _p("new-model-comfy-pending-balanced", obs(ollama(LLAMA, QWEN), comfy(pending=2)), []),
    _p(
        "new-model-comfy-busy-comfyui-first",
        obs(ollama(LLAMA, QWEN), comfy(running=1)),
        [],
        priority=COMFY_FIRST,
    ),
    _p(
        "new-model-comfy-busy-ollama-first",
        obs(ollama(LLAMA, QWEN), comfy(running=1)),
        ["free:soft:comfyui"],
        priority=OLLAMA_FIRST,
    ),
    _p(
        "new-model-nvml-only-reading",
        obs(ollama(LLAMA, QWEN), comfy(stats=False, vram=4)),
        ["free:soft:comfyui"],
    ),
    _p(
        "new-model-no-gpu-reading-still-frees",
        obs(ollama(LLAMA, QWEN), comfy(), gpus=()),
        ["free:soft:comfyui"],
    ),
    # --- trigger 2: the GPU over the threshold
    _p("threshold-reached", obs(OLD, comfy(), gpus=(gpu(18),)), ["free:soft:comfyui"]),
    _p("below-threshold", obs(OLD, comfy(), gpus=(gpu(17.9),)), []),
    _p("threshold-comfy-holds-little", obs(OLD, comfy(held=0.2), gpus=(gpu(20),)), []),
    _p(
        "threshold-comfy-busy-balanced-no-models",
        obs(ollama(), comfy(running=1), gpus=(gpu(20),)),
        [],
        state=baseline(ollama()),
    ),
    _p(
        "threshold-comfy-busy-ollama-first",
        obs(OLD, comfy(running=1), gpus=(gpu(20),)),
        ["free:soft:comfyui"],
        priority=OLLAMA_FIRST,
    ),
    # --- trigger 4: ComfyUI has work while Ollama models hold the room
    _p(
        "busy-comfy-balanced-unloads",
        obs(OLD, comfy(running=1), gpus=(gpu(20),)),
        ["unload:llama3:8b"],
    ),
    _p(
        "busy-comfy-comfyui-first-unloads",
        obs(OLD, comfy(pending=1), gpus=(gpu(20),)),
        ["unload:llama3:8b"],
        priority=COMFY_FIRST,
    ),
    _p("busy-comfy-below-threshold-no-unload", obs(OLD, comfy(running=1), gpus=(gpu(12),)), []),
    _p(
        "idle-comfy-over-threshold-no-unload",
        obs(OLD, comfy(), gpus=(gpu(20),)),
        ["free:soft:comfyui"],
    ),
    # --- services that are down or unreadable: nothing is sent to them
    _p("comfy-stopped", obs(ollama(LLAMA, QWEN), comfy(is_running=False), gpus=(gpu(22),)), []),
    _p(
        "comfy-unreachable",
        obs(ollama(LLAMA, QWEN), comfy(reachable=False, failed=1), gpus=(gpu(22),)),
        [],
    ),
    _p("comfy-queue-unknown", obs(ollama(LLAMA, QWEN), comfy(queue=False), gpus=(gpu(22),)), []),
    _p(
        "ollama-stopped-not-unloaded",
        obs(ollama(running=False), comfy(running=1), gpus=(gpu(22),)),
        [],
    ),
    _p(
        "ollama-unreachable-not-unloaded",
        obs(ollama(reachable=False), comfy(running=1), gpus=(gpu(22),)),
        [],
    ),
    _p("ps-unreadable-is-not-new", obs(ollama(unreadable=True), comfy()), []),
    # --- garbage readings
    _p("no-gpu-reading-no-threshold", obs(OLD, comfy(), gpus=()), []),
    _p("gpu-used-above-total", obs(OLD, comfy(), gpus=(gpu(30, 24),)), []),
    _p("gpu-zero-total", obs(OLD, comfy(), gpus=(gpu(0, 0),)), []),
]


@pytest.mark.parametrize(("o", "state", "priority", "expected"), CASES)
def test_triggers(
    o: Observation, state: PolicyState, priority: Priority, expected: list[str]
) -> None:
    assert summary(run(o, state, settings(priority=priority))) == expected


def test_new_models_are_noted_with_the_stable_log_line() -> None:
    d = run(obs(ollama(LLAMA, QWEN, model("phi3:mini", 2)), comfy()), baseline(OLD))
    assert d.notes == ("New Ollama model(s) detected: qwen2.5:14b, phi3:mini",)
    assert ("ollama/ollama", "phi3:mini") in d.state.known_models


def test_first_pass_reports_no_new_model_and_records_a_baseline() -> None:
    d = run(obs(ollama(LLAMA, QWEN), comfy()), PolicyState())
    assert (summary(d), d.notes) == ([], ())
    assert d.state.is_initialised
    assert d.state.known_models == {(OLLAMA, "llama3:8b"), (OLLAMA, "qwen2.5:14b")}
    again = run(obs(ollama(LLAMA, QWEN), comfy()), d.state, now=NOW + 5)
    assert (summary(again), again.notes) == ([], ())


def test_an_ollama_read_for_the_first_time_later_is_a_baseline() -> None:
    """An Ollama that did not answer on the first pass: its first good read is not 'new'."""
    first = run(obs(ollama(unreadable=True), comfy()), PolicyState())
    second = run(obs(ollama(LLAMA), comfy()), first.state, now=NOW + 5)
    assert (summary(second), second.notes) == ([], ())
    third = run(obs(ollama(LLAMA, QWEN), comfy()), second.state, now=NOW + 10)
    assert summary(third) == ["free:soft:comfyui"]


def test_unreadable_ps_keeps_known_models_so_nothing_is_new_afterwards() -> None:
    d = run(obs(ollama(unreadable=True), comfy()), baseline(OLD))
    assert d.state.known_models == {(OLLAMA, "llama3:8b")}
    back = run(obs(ollama(LLAMA), comfy()), d.state, now=NOW + 5)
    assert back.notes == ()


def test_a_stopped_ollama_forgets_its_models_so_a_reload_is_new() -> None:
    d = run(obs(ollama(running=False), comfy()), baseline(OLD))
    assert d.state.known_models == frozenset()
    back = run(obs(ollama(LLAMA), comfy()), d.state, now=NOW + 5)
    assert back.notes == ("New Ollama model(s) detected: llama3:8b",)


def test_docker_outage_keeps_models_of_ollamas_missing_from_the_listing() -> None:
    d = run(obs(comfy(), docker_ok=False), baseline(OLD))
    assert d.state.known_models == {(OLLAMA, "llama3:8b")}
    gone = run(obs(comfy(), docker_ok=True), baseline(OLD))
    assert gone.state.known_models == frozenset()


def test_two_ollamas_are_named_in_their_notes() -> None:
    other = ollama(name="ollama2")
    state = baseline(OLD, other)
    d = run(obs(ollama(LLAMA, QWEN), ollama(QWEN, name="ollama2"), comfy()), state)
    assert d.notes == (
        "New Ollama model(s) detected: qwen2.5:14b on ollama/ollama",
        "New Ollama model(s) detected: qwen2.5:14b on ollama/ollama2",
    )
    assert summary(d) == ["free:soft:comfyui"]  # one free, not one per trigger


def test_a_free_names_its_gpu_and_reason() -> None:
    d = run(obs(OLD, comfy(), gpus=(gpu(20),)), baseline(OLD))
    assert d.actions == (FreeComfy(COMFY, FreeStage.SOFT, "GPU 0 at 83% (threshold 75%)", "GPU-0"),)


def test_one_trigger_blocked_says_why() -> None:
    d = run(obs(ollama(LLAMA, QWEN), comfy(running=1)), baseline(OLD))
    assert "has work (1 running, 0 pending) and priority balanced" in skipped(d)
    d = run(obs(ollama(LLAMA, QWEN), comfy(held=0.1)), baseline(OLD))
    assert "holds only 102 MiB" in skipped(d)


# --------------------------------------------------------------------------- two GPUs

G0, G1 = gpu(10, uuid="GPU-0", index=0), gpu(10, uuid="GPU-1", index=1)
HOT0, HOT1 = gpu(20, uuid="GPU-0", index=0), gpu(20, uuid="GPU-1", index=1)
A = comfy("comfy-a", gpus=("GPU-0",))
B = comfy("comfy-b", gpus=("GPU-1",))
ANY = comfy("comfy-any")  # no GPU list: shares every GPU
O1 = ollama(LLAMA, gpus=("GPU-1",))
O1_NEW = ollama(LLAMA, QWEN, gpus=("GPU-1",))

GPU_CASES = [
    pytest.param(obs(O1_NEW, A, B, gpus=(G0, G1)), ["free:soft:comfy-b"], id="new-model-gpu1"),
    pytest.param(
        obs(O1_NEW, A, ANY, gpus=(G0, G1)), ["free:soft:comfy-any"], id="unknown-gpus-share-all"
    ),
    pytest.param(
        obs(ollama(LLAMA, QWEN), A, B, gpus=(G0, G1)),
        ["free:soft:comfy-a", "free:soft:comfy-b"],
        id="ollama-gpus-unknown",
    ),
    pytest.param(obs(O1, A, B, gpus=(HOT0, G1)), ["free:soft:comfy-a"], id="gpu0-hot"),
    pytest.param(
        obs(O1, A, B, gpus=(HOT0, HOT1)),
        ["free:soft:comfy-a", "free:soft:comfy-b"],
        id="both-hot-one-pass",
    ),
    pytest.param(
        obs(O1, comfy("comfy-a", running=1, gpus=("GPU-0",)), B, gpus=(HOT0, G1)),
        [],
        id="busy-comfy-on-gpu0-ollama-on-gpu1-no-unload",
    ),
    pytest.param(
        obs(O1, A, comfy("comfy-b", running=1, gpus=("GPU-1",)), gpus=(G0, HOT1)),
        ["unload:llama3:8b"],
        id="busy-comfy-on-gpu1-unloads",
    ),
]


@pytest.mark.parametrize(("o", "expected"), GPU_CASES)
def test_two_gpus(o: Observation, expected: list[str]) -> None:
    assert summary(run(o, baseline(O1, ollama(LLAMA)))) == expected


def test_a_free_on_two_gpus_records_each_gpu() -> None:
    d = run(obs(O1_NEW, A, B, gpus=(G0, G1)), baseline(O1))
    (free,) = d.actions
    assert isinstance(free, FreeComfy) and free.gpu_uuid == "GPU-1"
    d = run(obs(O1, A, B, gpus=(HOT0, HOT1)), baseline(O1))
    assert {(a.target, a.gpu_uuid) for a in d.actions if isinstance(a, FreeComfy)} == {
        ("comfyui/comfy-a", "GPU-0"),
        ("comfyui/comfy-b", "GPU-1"),
    }


# --------------------------------------------------------------------------- unloads

# The time of the pass (Observation.wall_at), between EARLY and LATE: a model still listed
# after its expires_at is in a long request (api-facts gotcha 6).
WALL = datetime(2026, 8, 21, 18, 10, tzinfo=UTC).timestamp()

UNLOAD_CASES = [
    # 20 GiB used of 24; 18 GiB is the threshold. Each model's VRAM counts once.
    pytest.param(
        [model("a:1", 3, expires=LATE), model("b:1", 3, expires=EARLY)],
        20,
        None,
        ["unload:b:1"],
        id="soonest-expiry-first",
    ),
    pytest.param(
        [model("a:1", 1, expires=EARLY), model("b:1", 1.5, expires=LATE)],
        20,
        None,
        ["unload:a:1", "unload:b:1"],
        id="until-below-threshold",
    ),
    pytest.param(
        [
            model("a:1", 1, expires=FOREVER),
            model("b:1", 1, expires=EARLY),
            model("c:1", 1, expires="garbage"),
        ],
        23,
        None,
        ["unload:b:1", "unload:c:1", "unload:a:1"],
        id="unknown-expiry-then-keep-alive-forever-last",
    ),
    pytest.param([model("a:1", 2, vram=0)], 23, None, [], id="cpu-only-model-not-unloaded"),
    pytest.param([model("a:1", 3)], 20, None, ["unload:a:1"], id="no-expiry-still-candidate"),
    pytest.param(
        [model("z:1", 0), model("n:1", 2, vram=-1)], 23, None, [], id="garbage-model-sizes"
    ),
    # --- with the time of the pass known: a past expires_at means "in use"
    pytest.param(
        [model("chat:1", 8, expires=EARLY), model("embed:1", 6, expires=LATE)],
        22,
        WALL,
        ["unload:embed:1"],
        id="expiry-passed-means-in-use-goes-last",
    ),
    pytest.param(
        [model("chat:1", 3, expires=EARLY), model("embed:1", 1, expires=LATE)],
        20,
        WALL,
        ["unload:embed:1", "unload:chat:1"],
        id="in-use-unloaded-only-when-nothing-else-frees-enough",
    ),
    pytest.param(
        [
            model("a:1", 1, expires=FOREVER),
            model("b:1", 1, expires=EARLY),
            model("c:1", 1, expires=LATE),
            model("d:1", 1, expires="garbage"),
        ],
        23,
        WALL,
        ["unload:c:1", "unload:d:1", "unload:a:1", "unload:b:1"],
        id="order-expiring-unknown-forever-in-use",
    ),
    pytest.param(
        [model("a:1", 3, expires="2026-08-21T18:00:00"), model("b:1", 3, expires=LATE)],
        20,
        WALL,
        ["unload:b:1"],
        id="offset-less-expiry-read-as-utc",
    ),
    pytest.param(
        [model("chat:1", 8, expires=EARLY), model("embed:1", 6, expires=LATE)],
        22,
        None,
        ["unload:chat:1"],
        id="without-wall-time-a-past-expiry-cannot-be-told",
    ),
]


@pytest.mark.parametrize(("models", "used", "wall", "expected"), UNLOAD_CASES)
def test_unload_order(
    models: list[OllamaModel], used: float, wall: float | None, expected: list[str]
) -> None:
    o = ollama(*models)
    d = run(obs(o, comfy(running=1), gpus=(gpu(used),), wall_at=wall), baseline(o))
    assert summary(d) == expected
    if expected:
        assert d.state.last_unload_at == NOW
        assert all(isinstance(a, UnloadOllama) and a.target == OLLAMA for a in d.actions)


def test_an_in_use_model_unloaded_as_a_last_resort_says_so() -> None:
    o = ollama(model("chat:1", 3, expires=EARLY), model("embed:1", 1, expires=LATE))
    d = run(obs(o, comfy(running=1), gpus=(gpu(20),), wall_at=WALL), baseline(o))
    reasons = {a.model: a.reason for a in d.actions if isinstance(a, UnloadOllama)}
    assert "seems in use (expires_at passed)" in reasons["chat:1"]
    assert "in use" not in reasons["embed:1"]


def test_ollama_priority_never_unloads_and_says_so() -> None:
    d = run(
        obs(OLD, comfy(running=1, held=0.1), gpus=(gpu(20),)),
        baseline(OLD),
        settings(priority=Priority.OLLAMA),
    )
    assert summary(d) == []
    assert "priority ollama never unloads them" in skipped(d)


# --------------------------------------------------------------------------- rate limits

RATE_CASES = [
    pytest.param(None, ["free:soft:comfyui"], id="never-freed"),
    pytest.param(NOW - 10, [], id="inside-interval"),
    pytest.param(NOW - 29.9, [], id="just-inside"),
    pytest.param(NOW - 30, ["free:soft:comfyui"], id="interval-passed"),
]


@pytest.mark.parametrize(("last", "expected"), RATE_CASES)
def test_free_rate_limit(last: float | None, expected: list[str]) -> None:
    state = baseline(OLD, last_episode_at=last)
    d = run(obs(OLD, comfy(), gpus=(gpu(20),)), state)
    assert summary(d) == expected
    assert d.state.last_episode_at == (NOW if expected else last)
    if not expected:
        assert "rate limit" in skipped(d)
        left = 30 - (NOW - (last or 0))
        assert d.wake_in_s == pytest.approx(min(5.0, max(left, 0.5)))


@pytest.mark.parametrize(
    ("last", "expected"),
    [(NOW - 10, []), (NOW - 30, ["unload:llama3:8b"])],
    ids=["inside-interval", "interval-passed"],
)
def test_unload_rate_limit(last: float, expected: list[str]) -> None:
    d = run(obs(OLD, comfy(running=1), gpus=(gpu(20),)), baseline(OLD, last_unload_at=last))
    assert summary(d) == expected


def test_rate_limit_is_per_pass_not_per_comfyui() -> None:
    """Two GPUs over the threshold in the same pass both get their free; the next pass none."""
    d = run(obs(O1, A, B, gpus=(HOT0, HOT1)), baseline(O1))
    assert len(d.actions) == 2
    later = run(obs(O1, comfy("comfy-c", gpus=("GPU-1",)), gpus=(HOT0, HOT1)), d.state, now=NOW + 5)
    assert summary(later) == []


# --------------------------------------------------------------------------- wake-up

WAKE_CASES = [
    pytest.param(obs(OLD, comfy()), baseline(OLD), 5.0, 5.0, id="quiet"),
    # A busy ComfyUI alone: min(interval, 2 s), not 0.5 s for a whole generation.
    pytest.param(obs(OLD, comfy(running=1)), baseline(OLD), 5.0, 2.0, id="comfy-busy"),
    pytest.param(obs(OLD, comfy(running=1)), baseline(OLD), 30.0, 2.0, id="comfy-busy-long"),
    pytest.param(obs(OLD, comfy(pending=2)), baseline(OLD), 30.0, 2.0, id="comfy-queued"),
    pytest.param(obs(OLD, comfy(running=1)), baseline(OLD), 1.0, 1.0, id="comfy-busy-short"),
    pytest.param(
        obs(OLD, comfy(running=1)),
        baseline(OLD, episodes=(episode(result=None),)),
        30.0,
        0.5,
        id="comfy-busy-with-open-episode",
    ),
    pytest.param(
        obs(ollama(LLAMA, QWEN), comfy(held=0.1)), baseline(OLD), 5.0, 0.5, id="models-changed"
    ),
    pytest.param(obs(ollama(), comfy()), baseline(OLD), 5.0, 0.5, id="model-gone"),
    pytest.param(obs(OLD, comfy(), gpus=(gpu(20),)), baseline(OLD), 5.0, 0.5, id="episode-opened"),
    pytest.param(obs(OLD, comfy(running=1)), baseline(OLD), 0.2, 0.2, id="short-interval"),
    pytest.param(
        obs(OLD, comfy(), gpus=(gpu(20),)),
        baseline(OLD, last_episode_at=NOW - 28),
        60.0,
        2.0,
        id="until-rate-limit-opens",
    ),
]


@pytest.mark.parametrize(("o", "state", "interval", "expected"), WAKE_CASES)
def test_wake(o: Observation, state: PolicyState, interval: float, expected: float) -> None:
    d = run(o, state, settings(check_interval_s=interval))
    assert d.wake_in_s == pytest.approx(expected)


def test_state_is_replaced_not_mutated() -> None:
    state = baseline(OLD)
    d = run(obs(ollama(LLAMA, QWEN), comfy()), state)
    assert state == baseline(OLD)
    assert d.state.episodes[0].target == COMFY
    assert d.state.last_episode_at == NOW


# --- trigger 4 under Dynamic VRAM: without the gate, idle Ollama models stay loaded
DYN = ComfyMode.DYNAMIC
GATE = 11435
# (busy ComfyUIs, VRAM_GATE_PORT, whether the Ollama gate serves, priority, expected)
T4_DYNAMIC = [
    pytest.param(
        [comfy(running=1, mode=DYN)], None, False, BALANCED, [], id="dynamic-busy-no-gate-keeps"
    ),
    pytest.param(
        [comfy(pending=1, mode=DYN)],
        None,
        False,
        BALANCED,
        [],
        id="dynamic-pending-no-gate-keeps",
    ),
    pytest.param(
        [comfy(running=1, mode=DYN)],
        GATE,
        True,
        BALANCED,
        ["unload:llama3:8b"],
        id="dynamic-busy-gate-holds-the-reload-unloads",
    ),
    pytest.param(
        [comfy(running=1, mode=DYN)],
        GATE,
        False,
        BALANCED,
        [],
        id="dynamic-busy-gate-port-set-but-no-gate-serves-keeps",
    ),
    pytest.param(
        [comfy(running=1)], None, False, BALANCED, ["unload:llama3:8b"], id="classic-busy-unloads"
    ),
    pytest.param(
        [comfy(running=1)],
        GATE,
        False,
        BALANCED,
        ["unload:llama3:8b"],
        id="classic-busy-gate-not-serving-unloads",
    ),
    pytest.param(
        [comfy(running=1, mode=DYN), comfy("comfy2", running=1)],
        None,
        False,
        BALANCED,
        ["unload:llama3:8b"],
        id="a-busy-classic-beside-unloads",
    ),
    pytest.param(
        [comfy(running=1, mode=DYN)],
        None,
        False,
        COMFY_FIRST,
        ["unload:llama3:8b"],
        id="dynamic-busy-comfyui-ranks-above-unloads",
    ),
    pytest.param(
        [comfy(running=1, mode=DYN)],
        None,
        False,
        OLLAMA_FIRST,
        ["free:soft:comfyui"],
        id="dynamic-busy-ollama-first",
    ),
]


@pytest.mark.parametrize(("comfys", "gate_port", "gated", "priority", "expected"), T4_DYNAMIC)
def test_trigger_4_with_dynamic_vram(
    comfys: list[ComfyObservation],
    gate_port: int | None,
    gated: bool,
    priority: Priority,
    expected: list[str],
) -> None:
    d = run(
        replace(obs(OLD, *comfys, gpus=(gpu(20),)), ollama_gated=gated),
        baseline(OLD),
        settings(priority=priority, gate_port=gate_port),
    )
    assert summary(d) == expected


def test_trigger_4_says_why_a_dynamic_vram_job_leaves_ollama_models_loaded() -> None:
    d = run(obs(OLD, comfy(running=1, mode=DYN), gpus=(gpu(20),)), baseline(OLD), settings())
    assert summary(d) == []
    assert "Not unloading Ollama models (llama3:8b)" in skipped(d)
    assert "Dynamic VRAM" in skipped(d) and "VRAM_GATE_PORT" in skipped(d)


def test_trigger_4_says_when_vram_gate_port_is_set_but_no_gate_serves() -> None:
    d = run(
        obs(OLD, comfy(running=1, mode=DYN), gpus=(gpu(20),)),
        baseline(OLD),
        settings(gate_port=GATE),
    )
    assert summary(d) == []
    assert "VRAM_GATE_PORT is set, but the gate is not serving" in skipped(d)
