"""record() and the staged episode: soft -> hard -> restart, its guards, dry run, closing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from test_policy_builders import (
    COMFY,
    GIB,
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

from supervisor.config import Settings
from supervisor.docker.discovery import SWARM_TASK_BLOCK
from supervisor.model import (
    Backoff,
    ComfyObservation,
    Episode,
    FreeComfy,
    FreeResult,
    FreeStage,
    GpuMemory,
    HealOllama,
    Outcome,
    PolicyState,
    Priority,
    RestartComfy,
    ServiceHealth,
    UnloadOllama,
)
from supervisor.policy import decide, record

SOFT, HARD, RESTART = FreeStage.SOFT, FreeStage.HARD, FreeStage.RESTART
FREED, PENDING, PINNED, FAILED = (
    FreeResult.FREED,
    FreeResult.PENDING,
    FreeResult.PINNED,
    FreeResult.FAILED,
)
OL = ollama(model("llama3:8b", 5))
HOT = gpu(21)  # 87.5 %: above both thresholds
WARM = gpu(19)  # 79 %: above 75, below 85
COOL = gpu(10)
ALLOW = settings(restart_fallback=True)


def _state(ep: Episode | None = None, **changes: object) -> PolicyState:
    return baseline(OL, episodes=(ep,) if ep else (), last_episode_at=NOW - 6, **changes)


def _free(stage: FreeStage = SOFT) -> FreeComfy:
    return FreeComfy(COMFY, stage, "GPU 0 at 80% (threshold 75%)", "GPU-0")


# --------------------------------------------------------------------------- record()

RECORD_CASES = [
    # (stage, result, ok, dry_run) -> the episode left open (stage, result) or None
    pytest.param(SOFT, FREED, True, False, (SOFT, FREED), id="soft-freed-stays-to-judge"),
    pytest.param(SOFT, PENDING, True, False, (SOFT, PENDING), id="soft-pending-waits"),
    pytest.param(SOFT, PINNED, False, False, (SOFT, PINNED), id="soft-pinned-escalates"),
    pytest.param(SOFT, FAILED, False, False, None, id="soft-failed-closes"),
    pytest.param(HARD, PINNED, False, False, (HARD, PINNED), id="hard-pinned-to-restart"),
    pytest.param(HARD, FREED, True, False, (HARD, FREED), id="hard-freed"),
    pytest.param(SOFT, None, True, True, None, id="dry-run-closes"),
    pytest.param(SOFT, None, False, False, None, id="no-result-not-ok-is-failed"),
    pytest.param(SOFT, None, True, False, (SOFT, FREED), id="no-result-ok-is-freed"),
]


@pytest.mark.parametrize(("stage", "result", "ok", "dry", "left_open"), RECORD_CASES)
def test_record_free_outcomes(
    stage: FreeStage,
    result: FreeResult | None,
    ok: bool,
    dry: bool,
    left_open: tuple[FreeStage, FreeResult] | None,
) -> None:
    state = _state(episode(stage, None, started=NOW))
    after = record(state, Outcome(_free(stage), NOW + 2, ok, result, dry_run=dry), NOW + 3)
    ep = after.episode_for(COMFY)
    assert (None if ep is None else (ep.stage, ep.last_result)) == left_open
    if ep is not None:
        assert (ep.started_at, ep.last_at) == (NOW, NOW + 2)
    assert after.last_episode_at == NOW - 6  # a dry run still counted when it started


def test_record_a_free_the_policy_did_not_start_opens_an_episode() -> None:
    """The gate's frees count for the rate limit and can escalate."""
    state = baseline(OL)
    after = record(state, Outcome(_free(HARD), NOW, False, PINNED), NOW)
    ep = after.episode_for(COMFY)
    assert ep is not None and (ep.stage, ep.last_result, ep.started_at) == (HARD, PINNED, NOW)
    assert after.last_episode_at == NOW


def test_record_restart_closes_the_episode_and_starts_the_cooldown() -> None:
    state = _state(episode(RESTART, None))
    after = record(state, Outcome(RestartComfy(COMFY, "why"), NOW + 1, True, FREED), NOW + 1)
    assert after.episodes == ()
    assert after.restart_at(COMFY) == NOW + 1


def test_record_refused_restart_still_counts_for_the_cooldown() -> None:
    state = _state(episode(RESTART, None))
    refused = Outcome(RestartComfy(COMFY, "why"), NOW, False, PENDING, detail="busy")
    after = record(state, refused, NOW)
    assert after.episodes == () and after.restart_at(COMFY) == NOW


def test_record_unload_and_heal_stamps() -> None:
    state = baseline(OL, last_unload_at=NOW - 50)
    after = record(state, Outcome(UnloadOllama(OLLAMA, "llama3:8b", "r"), NOW, True), NOW)
    assert after.last_unload_at == NOW
    heal = HealOllama(OLLAMA, "llama3:8b", "r", ("comfyui/comfyui",), 0.4)
    after = record(after, Outcome(heal, NOW + 9, False, detail="no room"), NOW + 9)
    assert after.heal_at(f"{OLLAMA}|llama3:8b") == NOW + 9
    assert after.last_unload_at == NOW


def test_record_drops_stale_episodes() -> None:
    state = _state(episode(started=NOW - 400))
    after = record(state, Outcome(UnloadOllama(OLLAMA, "m", "r"), NOW, True), NOW)
    assert after.episodes == ()


# --------------------------------------------------------------------------- next pass

NEXT_CASES = [
    # (episode stage, last result, ComfyUI now, GPU now, settings) -> actions, episode open?
    pytest.param(
        SOFT,
        FREED,
        comfy(held=2),
        HOT,
        None,
        ["free:hard:comfyui"],
        True,
        id="freed-still-above-aggressive-goes-hard",
    ),
    pytest.param(
        SOFT, FREED, comfy(held=2), WARM, None, [], False, id="freed-below-aggressive-closes"
    ),
    pytest.param(
        SOFT, FREED, comfy(held=0.1), HOT, None, [], False, id="freed-nothing-left-to-free-closes"
    ),
    pytest.param(
        SOFT,
        FREED,
        comfy(held=2, running=1),
        HOT,
        None,
        ["unload:llama3:8b"],
        False,
        id="freed-then-busy-balanced-closes-and-unloads",
    ),
    pytest.param(
        SOFT,
        FREED,
        comfy(held=2, running=1),
        HOT,
        settings(priority=Priority.OLLAMA),
        ["free:hard:comfyui"],
        True,
        id="freed-then-busy-ollama-first-goes-hard",
    ),
    pytest.param(
        SOFT, FREED, comfy(held=2), None, None, [], False, id="freed-no-gpu-reading-closes"
    ),
    pytest.param(HARD, FREED, comfy(held=2), HOT, None, [], False, id="hard-freed-closes"),
    pytest.param(
        SOFT,
        PENDING,
        comfy(running=1),
        WARM,
        settings(priority=Priority.OLLAMA),
        [],
        True,
        id="pending-waits-while-busy",
    ),
    pytest.param(
        SOFT, PENDING, comfy(queue=False), HOT, None, [], True, id="pending-waits-queue-unknown"
    ),
    pytest.param(
        SOFT,
        PENDING,
        comfy(held=2),
        HOT,
        None,
        ["free:hard:comfyui"],
        True,
        id="pending-done-still-above-goes-hard",
    ),
    pytest.param(
        SOFT, PENDING, comfy(held=2), COOL, None, [], False, id="pending-done-below-closes"
    ),
    pytest.param(
        SOFT, PINNED, comfy(), COOL, None, ["free:hard:comfyui"], True, id="soft-pinned-goes-hard"
    ),
    pytest.param(SOFT, PINNED, comfy(running=1), COOL, None, [], True, id="soft-pinned-busy-waits"),
    pytest.param(
        HARD, PINNED, comfy(), COOL, ALLOW, ["restart:comfyui"], True, id="hard-pinned-restarts"
    ),
    pytest.param(SOFT, None, comfy(), HOT, None, [], True, id="in-flight-waits"),
    pytest.param(SOFT, PINNED, comfy(is_running=False), COOL, None, [], False, id="stopped-closes"),
    pytest.param(
        SOFT, PINNED, comfy(reachable=False, failed=1), COOL, None, [], True, id="unreachable-waits"
    ),
    pytest.param(RESTART, FREED, comfy(), COOL, None, [], False, id="restarted-closes"),
]


@pytest.mark.parametrize(("stage", "result", "c", "g", "s", "expected", "open_"), NEXT_CASES)
def test_next_pass_of_an_episode(
    stage: FreeStage,
    result: FreeResult | None,
    c: ComfyObservation,
    g: GpuMemory | None,
    s: Settings | None,
    expected: list[str],
    open_: bool,
) -> None:
    gpus = () if g is None else (g,)
    # The rate limit is not open (last episode 6 s ago): escalation ignores it.
    d = run(obs(OL, c, gpus=gpus), _state(episode(stage, result)), s or settings())
    assert summary(d) == expected
    assert (d.state.episode_for(COMFY) is not None) is open_
    if open_:
        assert d.wake_in_s == 0.5


def test_hard_free_keeps_the_episode_and_its_reason() -> None:
    d = run(obs(OL, comfy(), gpus=(COOL,)), _state(episode(SOFT, PINNED)))
    (hard,) = d.actions
    assert isinstance(hard, FreeComfy) and hard.gpu_uuid == "GPU-0"
    assert hard.reason == "GPU 0 at 80% (threshold 75%); the soft free released nothing"
    ep = d.state.episode_for(COMFY)
    assert ep is not None and (ep.stage, ep.last_result, ep.started_at) == (HARD, None, NOW - 6)


def test_stale_episode_is_closed_and_a_new_one_may_start() -> None:
    old = episode(SOFT, PENDING, started=NOW - 301)
    d = run(obs(OL, comfy(), gpus=(HOT,)), baseline(OL, episodes=(old,), last_episode_at=NOW - 301))
    assert summary(d) == ["free:soft:comfyui"]
    assert "stale" in skipped(d)
    ep = d.state.episode_for(COMFY)
    assert ep is not None and ep.started_at == NOW


def test_episode_of_a_vanished_comfyui_closes_unless_docker_is_down() -> None:
    state = _state(episode(SOFT, PINNED))
    assert run(obs(OL, gpus=(HOT,)), state).state.episodes == ()
    assert run(obs(OL, gpus=(HOT,), docker_ok=False), state).state.episodes == state.episodes


# --------------------------------------------------------------------------- restart guards

_PLAIN = comfy()
# What discovery makes of a Swarm task's container (no restart label set).
SWARM_TASK = replace(
    _PLAIN,
    status=replace(
        _PLAIN.status,
        spec=replace(_PLAIN.status.spec, restart_allowed=False, restart_block=SWARM_TASK_BLOCK),
    ),
)

GUARD_CASES = [
    # (ComfyUI, settings, state changes) -> restart?, the guard named in reasons_skipped
    pytest.param(comfy(), ALLOW, {}, True, "", id="all-guards-hold"),
    pytest.param(
        comfy(), settings(), {}, False, "VRAM_RESTART_FALLBACK=false", id="env-default-forbids"
    ),
    pytest.param(comfy(restart=True), settings(), {}, True, "", id="label-true-overrides-env"),
    pytest.param(
        comfy(restart=False),
        ALLOW,
        {},
        False,
        "vram-supervisor.restart=false",
        id="label-false-overrides-env",
    ),
    pytest.param(
        comfy(running=1),
        ALLOW,
        {},
        False,
        "a generation is running or queued",
        id="running-generation",
    ),
    pytest.param(comfy(pending=3), ALLOW, {}, False, "0 running, 3 pending", id="pending-prompt"),
    pytest.param(comfy(queue=False), ALLOW, {}, False, "queue is unknown", id="queue-unknown"),
    pytest.param(
        comfy(),
        ALLOW,
        {"last_restart_at": ((COMFY, NOW - 100),)},
        False,
        "restart cooldown, 500 s left",
        id="cooldown",
    ),
    pytest.param(
        comfy(), ALLOW, {"last_restart_at": ((COMFY, NOW - 600),)}, True, "", id="cooldown-over"
    ),
    pytest.param(comfy(container=False), ALLOW, {}, False, "not a container", id="fixed-url"),
    pytest.param(
        SWARM_TASK,
        ALLOW,
        {},
        False,
        "restart is not allowed: it is a Swarm task",
        id="swarm-task-with-fallback-on",
    ),
]


def test_a_swarm_task_guard_cites_no_label_the_user_never_set() -> None:
    d = run(obs(OL, SWARM_TASK, gpus=(COOL,)), _state(episode(HARD, PINNED)), ALLOW)
    assert "Swarm task" in skipped(d)
    assert "vram-supervisor.restart" not in skipped(d)


@pytest.mark.parametrize(("c", "s", "changes", "restarts", "guard"), GUARD_CASES)
def test_restart_guards_after_hard_pinned(
    c: ComfyObservation, s: Settings, changes: dict[str, Any], restarts: bool, guard: str
) -> None:
    d = run(obs(OL, c, gpus=(COOL,)), _state(episode(HARD, PINNED), **changes), s)
    assert summary(d) == (["restart:comfyui"] if restarts else [])
    if restarts:
        assert d.state.restart_at(COMFY) == NOW
        ep = d.state.episode_for(COMFY)
        assert ep is not None and ep.stage is RESTART
    else:
        assert guard in skipped(d)


@pytest.mark.parametrize(
    ("c", "open_"),
    [(comfy(running=1), True), (comfy(queue=False), True), (comfy(restart=False), False)],
    ids=["busy-keeps-waiting", "queue-unknown-keeps-waiting", "forbidden-closes"],
)
def test_failed_guard_keeps_or_closes_the_episode(c: ComfyObservation, open_: bool) -> None:
    d = run(obs(OL, c, gpus=(COOL,)), _state(episode(HARD, PINNED)), ALLOW)
    assert (d.state.episode_for(COMFY) is not None) is open_


def test_never_restarts_during_a_generation_whatever_the_settings() -> None:
    for s in (ALLOW, settings(restart_fallback=True, priority=Priority.OLLAMA)):
        d = run(
            obs(OL, comfy(running=1, restart=True), gpus=(HOT,)), _state(episode(HARD, PINNED)), s
        )
        assert not any(isinstance(a, RestartComfy) for a in d.actions)


# --------------------------------------------------------------------------- dead API

DEAD = comfy(reachable=False, failed=3)

DEAD_CASES = [
    # (ComfyUI, GPU, state, settings) -> actions
    pytest.param(
        DEAD,
        HOT,
        _state(episode(SOFT, PINNED)),
        ALLOW,
        ["restart:comfyui"],
        id="dead-in-episode-restarts",
    ),
    pytest.param(
        DEAD, HOT, baseline(OL), ALLOW, ["restart:comfyui"], id="dead-and-room-needed-restarts"
    ),
    pytest.param(
        comfy(reachable=False, failed=3, vram=6),
        HOT,
        baseline(OL),
        ALLOW,
        ["restart:comfyui"],
        id="dead-holding-vram",
    ),
    pytest.param(
        comfy(reachable=False, failed=3, vram=0.2),
        HOT,
        baseline(OL),
        ALLOW,
        [],
        id="dead-holding-nothing",
    ),
    pytest.param(DEAD, COOL, baseline(OL), ALLOW, [], id="dead-but-no-room-needed"),
    pytest.param(
        comfy(reachable=False, failed=2),
        HOT,
        baseline(OL),
        ALLOW,
        [],
        id="two-failed-checks-not-dead-yet",
    ),
    pytest.param(
        comfy(reachable=False, failed=5, health=ServiceHealth.STARTING),
        HOT,
        baseline(OL),
        ALLOW,
        [],
        id="still-starting",
    ),
    pytest.param(
        comfy(reachable=False, failed=3, is_running=False),
        HOT,
        baseline(OL),
        ALLOW,
        [],
        id="stopped-container",
    ),
    pytest.param(DEAD, HOT, baseline(OL), settings(), [], id="restart-not-allowed"),
    pytest.param(
        comfy(reachable=False, failed=3, container=False),
        HOT,
        baseline(OL),
        ALLOW,
        [],
        id="fixed-url",
    ),
    pytest.param(DEAD, HOT, baseline(OL, last_episode_at=NOW - 5), ALLOW, [], id="rate-limited"),
    pytest.param(
        DEAD, HOT, baseline(OL, last_restart_at=((COMFY, NOW - 60),)), ALLOW, [], id="cooldown"
    ),
]


@pytest.mark.parametrize(("c", "g", "state", "s", "expected"), DEAD_CASES)
def test_dead_api(
    c: ComfyObservation, g: GpuMemory, state: PolicyState, s: Settings, expected: list[str]
) -> None:
    assert summary(run(obs(OL, c, gpus=(g,)), state, s)) == expected


def test_dead_api_that_cannot_be_restarted_is_noted_once() -> None:
    d = run(obs(OL, DEAD, gpus=(HOT,)), baseline(OL))
    assert len(d.notes) == 1 and "has not answered for 3 checks" in d.notes[0]
    again = run(obs(OL, comfy(reachable=False, failed=4), gpus=(HOT,)), d.state, now=NOW + 31)
    assert again.notes == ()
    alive = run(obs(OL, comfy(held=0.1), gpus=(HOT,)), again.state, now=NOW + 62)
    assert alive.state.noted == frozenset()


# --------------------------------------------------------------------------- whole loops


def _loop(
    passes: Sequence[tuple[float, ComfyObservation, GpuMemory]],
    outcome: dict[str, tuple[bool, FreeResult | None, bool]],
    s: Settings,
) -> list[list[str]]:
    """decide -> record each action with a scripted outcome, pass after pass."""
    state, seen = baseline(OL), list[list[str]]()
    for now, c, g in passes:
        d = decide(obs(OL, c, gpus=(g,)), state, s, now)
        state = d.state
        words = summary(d)
        seen.append(words)
        for action, word in zip(d.actions, words, strict=True):
            ok, result, dry = outcome.get(word.rsplit(":", 1)[0], (True, FREED, False))
            state = record(state, Outcome(action, now, ok, result, dry_run=dry), now)
    return seen


def test_dry_run_says_would_free_once_per_interval() -> None:
    passes = [(NOW + t, comfy(), HOT) for t in (0, 5, 10, 29, 30, 35)]
    seen = _loop(passes, {"free:soft": (True, None, True)}, settings(dry_run=True))
    assert seen == [["free:soft:comfyui"], [], [], [], ["free:soft:comfyui"], []]


def test_full_escalation_soft_hard_restart_then_cooldown() -> None:
    pinned = (False, PINNED, False)
    passes = [(NOW + t, comfy(), HOT) for t in (0, 1, 2, 3, 40, 41, 42)]
    seen = _loop(passes, {"free:soft": pinned, "free:hard": pinned}, ALLOW)
    assert seen == [
        ["free:soft:comfyui"],
        ["free:hard:comfyui"],
        ["restart:comfyui"],
        [],  # restarted; the rate limit holds new episodes
        ["free:soft:comfyui"],
        ["free:hard:comfyui"],
        [],  # hard pinned again, but the restart cooldown holds
    ]


def test_failed_free_waits_for_the_rate_limit() -> None:
    passes = [(NOW + t, comfy(), HOT) for t in (0, 1, 29, 30)]
    seen = _loop(passes, {"free:soft": (False, FAILED, False)}, settings())
    assert seen == [["free:soft:comfyui"], [], [], ["free:soft:comfyui"]]


def test_pending_free_waits_for_the_prompt_then_escalates() -> None:
    passes = [
        (NOW, comfy(running=1), HOT),
        (NOW + 1, comfy(running=1), HOT),
        (NOW + 2, comfy(held=3), HOT),
        (NOW + 3, comfy(held=0.1), COOL),
    ]
    seen = _loop(passes, {"free:soft": (True, PENDING, False)}, settings(priority=Priority.OLLAMA))
    assert seen == [["free:soft:comfyui"], [], ["free:hard:comfyui"], []]


def test_a_flapping_comfyui_cannot_cause_an_action_storm() -> None:
    """90 one-second passes; the API answers every other pass and keeps refilling its VRAM.
    Frees stay bounded by the rate limit: one episode (soft, maybe hard) per 30 s."""
    passes = [
        (NOW + t, comfy() if t % 2 == 0 else comfy(reachable=False, failed=1), HOT)
        for t in range(90)
    ]
    seen = _loop(passes, {}, settings())
    flat = [word for words in seen for word in words]
    assert flat.count("free:soft:comfyui") == 3
    assert flat.count("free:hard:comfyui") <= 3
    assert not any(word.startswith("restart") for word in flat)


# --------------------------------------------------------------------------- pinned hold
# A ComfyUI that kept its memory after a hard free and may not be restarted is not freed
# again (soft + hard every 30 s would drop its execution cache every time) until its
# reading changes, its container changes, a restart becomes possible or the restart
# cooldown (600 s) passes.


def test_pinned_comfyui_that_may_not_be_restarted_is_not_freed_every_interval() -> None:
    times = (0, 1, 2, 31, 61, 300, 601, 602, 603, 604)
    passes = [(NOW + t, comfy(), HOT) for t in times]
    state, seen, notes = baseline(OL), list[list[str]](), list[str]()
    for now, c, g in passes:
        d = decide(obs(OL, c, gpus=(g,)), state, settings(), now)
        state, words = d.state, summary(d)
        seen.append(words)
        notes += [n for n in d.notes if "hard free" in n]
        for action in d.actions:
            state = record(state, Outcome(action, now, False, PINNED), now)
    assert seen == [
        ["free:soft:comfyui"],
        ["free:hard:comfyui"],
        [],  # the restart is not allowed: held back from here on
        [],
        [],
        [],
        [],
        ["free:soft:comfyui"],  # 600 s after the hold began (at +2): one more try
        ["free:hard:comfyui"],
        [],
    ]
    assert (
        notes
        == [
            "ComfyUI comfyui/comfyui keeps 8.0 GiB after a hard free and may not be restarted; "
            "not freeing it again until what it holds changes by more than 256 MiB, its "
            "container restarts, a restart becomes possible or 600 s pass",
        ]
        * 2
    )


def _held(at: float = NOW - 40, held: float = 8, cid: str = "id-comfyui") -> PolicyState:
    hold = Backoff(f"free|{COMFY}", at, int(held * GIB), container_id=cid)
    return baseline(OL, backoffs=(hold,), last_episode_at=NOW - 40)


HOLD_CASES = [
    # (ComfyUI now, state, settings) -> actions, still held?
    pytest.param(comfy(), _held(), settings(), [], True, id="same-reading-held"),
    pytest.param(comfy(held=8.2), _held(), settings(), [], True, id="small-change-held"),
    pytest.param(comfy(held=9), _held(), settings(), ["free:soft:comfyui"], False, id="grew"),
    pytest.param(comfy(held=6), _held(), settings(), ["free:soft:comfyui"], False, id="shrank"),
    pytest.param(
        comfy(cid="id-new"), _held(), settings(), ["free:soft:comfyui"], False, id="recreated"
    ),
    pytest.param(
        comfy(), _held(at=NOW - 600), settings(), ["free:soft:comfyui"], False, id="cooldown-over"
    ),
    pytest.param(
        comfy(restart=True), _held(), settings(), ["free:soft:comfyui"], False, id="now-allowed"
    ),
    pytest.param(
        comfy(),
        _held(at=NOW - 40),
        ALLOW,
        ["free:soft:comfyui"],
        False,
        id="restart-possible-now",
    ),
    pytest.param(
        comfy(running=1), _held(), settings(), ["unload:llama3:8b"], True, id="busy-keeps-hold"
    ),
    pytest.param(comfy(reachable=False, failed=1), _held(), settings(), [], True, id="no-answer"),
    pytest.param(comfy(is_running=False), _held(), settings(), [], False, id="stopped-drops"),
]


@pytest.mark.parametrize(("c", "state", "s", "expected", "held"), HOLD_CASES)
def test_pinned_hold_ends_when_something_changes(
    c: ComfyObservation, state: PolicyState, s: Settings, expected: list[str], held: bool
) -> None:
    d = run(obs(OL, c, gpus=(HOT,)), state, s)
    assert summary(d) == expected
    assert bool(d.state.backoffs) is held
    if held and c.status.is_reachable and c.queue and not c.queue.is_busy:
        assert "kept 8.0 GiB after a hard free and may not be restarted" in skipped(d)


def test_pinned_hold_waits_for_a_restart_cooldown_then_restart_follows() -> None:
    """Refused only by the restart cooldown: held until the cooldown ends, then escalated."""
    state = replace(_held(), last_restart_at=((COMFY, NOW - 100),))
    assert summary(run(obs(OL, comfy(), gpus=(HOT,)), state, ALLOW)) == []
    state = replace(_held(), last_restart_at=((COMFY, NOW - 600),))
    assert summary(run(obs(OL, comfy(), gpus=(HOT,)), state, ALLOW)) == ["free:soft:comfyui"]


def test_pinned_hold_survives_a_docker_outage_and_ends_when_the_comfyui_is_gone() -> None:
    assert run(obs(OL, gpus=(HOT,), docker_ok=False), _held()).state.backoffs != ()
    assert run(obs(OL, gpus=(HOT,)), _held()).state.backoffs == ()


def test_a_heal_does_not_count_on_the_memory_of_a_held_comfyui() -> None:
    spilled = ollama(model("big:12b", 12, vram=4))
    state = replace(_held(), known_models=frozenset({(OLLAMA, "big:12b")}))
    d = run(obs(spilled, comfy(), gpus=(gpu(17),)), state)
    assert summary(d) == []
    assert "could be made free" in skipped(d)
