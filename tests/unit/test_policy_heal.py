"""decide(): spilled Ollama models, the heal and its guards (fit, room, cooldown, switch)."""

from __future__ import annotations

import pytest
from test_policy_builders import (
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
from supervisor.model import (
    Backoff,
    HealOllama,
    Observation,
    OllamaObservation,
    Outcome,
    PolicyState,
    Priority,
    VramSource,
)
from supervisor.policy import SAFETY_MARGIN_BYTES, decide, fits_gpu, record, room_needed

# 12 GiB model with 4 GiB on the GPU (33 %); GPU 17 of 24 GiB used (below the 75 % mark).
SPILLED = model("big:12b", 12, vram=4)
OL = ollama(SPILLED)
HEAL_KEY = f"{OLLAMA}|big:12b"
QUIET = gpu(17)
HUGE = ollama(model("huge:70b", 40, vram=20))


def _p(
    id: str,
    o: Observation,
    expected: list[str],
    state: PolicyState | None = None,
    s: Settings | None = None,
    why: str = "",
) -> object:
    """One row; `why` must appear in reasons_skipped when given."""
    return pytest.param(o, state or baseline(OL), s or settings(), expected, why, id=id)


CASES = [
    _p("heal-frees-idle-comfy-first", obs(OL, comfy(), gpus=(QUIET,)), ["heal:big:12b[comfyui]"]),
    _p("heal-needs-no-free", obs(OL, comfy(held=0.1), gpus=(gpu(4),)), ["heal:big:12b[]"]),
    _p(
        "heal-on-first-pass",
        obs(OL, comfy(), gpus=(QUIET,)),
        ["heal:big:12b[comfyui]"],
        state=PolicyState(),
    ),
    _p("cannot-fit-at-all", obs(HUGE, comfy(), gpus=(QUIET,)), [], state=baseline(HUGE)),
    _p(
        "heal-disabled-frees-for-next-load",
        obs(OL, comfy(), gpus=(QUIET,)),
        ["free:soft:comfyui"],
        s=settings(heal=False),
        why="healing is off (VRAM_HEAL=false)",
    ),
    _p(
        "heal-cooldown-frees-meanwhile",
        obs(OL, comfy(), gpus=(QUIET,)),
        ["free:soft:comfyui"],
        state=baseline(OL, last_heal_at=((HEAL_KEY, NOW - 100),)),
        why="heal cooldown, 500 s left",
    ),
    _p(
        "heal-cooldown-over",
        obs(OL, comfy(), gpus=(QUIET,)),
        ["heal:big:12b[comfyui]"],
        state=baseline(OL, last_heal_at=((HEAL_KEY, NOW - 600),)),
    ),
    _p(
        "cooldown-is-per-model",
        obs(OL, comfy(), gpus=(QUIET,)),
        ["heal:big:12b[comfyui]"],
        state=baseline(OL, last_heal_at=((f"{OLLAMA}|other:1b", NOW - 100),)),
    ),
    _p(
        "no-room-even-after-freeing",
        obs(ollama(model("big:12b", 12, vram=2)), comfy(held=1), gpus=(gpu(23),)),
        [],
        s=settings(threshold_percent=99, aggressive_threshold_percent=99),
        why="4.0 GiB could be made free, 12.5 GiB needed",
    ),
    # Found by the 24-hour soak: the room Ollama makes itself for the reload, by evicting
    # its other models, counts (as the gate counts it), for both generations' rules.
    *(
        _p(
            f"room-counts-what-ollama-evicts-itself-{gen}",
            obs(
                ollama(model("big:12b", 12, vram=2), model("qwen:14b", 10), llama_server=ls),
                comfy(held=1),
                gpus=(gpu(23),),
            ),
            ["heal:big:12b[comfyui]"],
            state=baseline(
                ollama(model("big:12b", 12, vram=2), model("qwen:14b", 10), llama_server=ls)
            ),
            s=settings(threshold_percent=99, aggressive_threshold_percent=99),
        )
        for gen, ls in (("2025", False), ("2026", True))
    ),
    _p(
        "what-ollama-evicts-is-not-enough",
        obs(
            ollama(model("big:12b", 12, vram=2), model("tiny:1b", 1), llama_server=False),
            comfy(held=1),
            gpus=(gpu(23),),
        ),
        [],
        state=baseline(
            ollama(model("big:12b", 12, vram=2), model("tiny:1b", 1), llama_server=False)
        ),
        s=settings(threshold_percent=99, aggressive_threshold_percent=99),
        why="5.0 GiB could be made free, 12.5 GiB needed",
    ),
    _p(
        "busy-comfy-needed-balanced-waits",
        obs(OL, comfy(running=1), gpus=(QUIET,)),
        [],
        why="comfyui/comfyui has work (priority balanced)",
    ),
    _p(
        "busy-comfy-needed-comfyui-first-waits",
        obs(OL, comfy(pending=1), gpus=(QUIET,)),
        [],
        s=settings(priority=Priority.COMFYUI),
        why="comfyui/comfyui has work (priority comfyui)",
    ),
    _p(
        "busy-comfy-needed-ollama-first-frees",
        obs(OL, comfy(running=1), gpus=(QUIET,)),
        ["free:soft:comfyui"],
        s=settings(priority=Priority.OLLAMA),
    ),
    _p(
        "busy-comfy-not-needed-heals", obs(OL, comfy(running=1), gpus=(gpu(4),)), ["heal:big:12b[]"]
    ),
    _p(
        "open-episode-on-gpu-waits",
        obs(OL, comfy(), gpus=(QUIET,)),
        [],
        state=baseline(OL, episodes=(episode(result=None),)),
        why="waiting for the free of comfyui/comfyui",
    ),
    _p("no-gpu-reading", obs(OL, comfy(), gpus=()), [], why="no GPU reading says where"),
    _p("ollama-unreachable", obs(ollama(reachable=False), comfy(), gpus=(QUIET,)), []),
    _p(
        "spilled-and-new-heals-once",
        obs(ollama(SPILLED), comfy(), gpus=(QUIET,)),
        ["heal:big:12b[comfyui]"],
        state=baseline(ollama()),
    ),
    _p(
        "two-spilled-one-heal-per-gpu",
        obs(ollama(SPILLED, model("mid:7b", 6, vram=5)), comfy(), gpus=(gpu(4),)),
        ["heal:big:12b[comfyui]"],
        state=baseline(ollama(SPILLED, model("mid:7b", 6, vram=5))),
        why="another heal on GPU 0 goes first",
    ),
    _p(
        "comfy-stopped-not-in-free-first",
        obs(OL, comfy(is_running=False), gpus=(gpu(4),)),
        ["heal:big:12b[]"],
    ),
]


@pytest.mark.parametrize(("o", "state", "s", "expected", "why"), CASES)
def test_spilled_models(
    o: Observation, state: PolicyState, s: Settings, expected: list[str], why: str
) -> None:
    d = run(o, state, s)
    assert summary(d) == expected
    assert why in skipped(d)


def test_heal_action_carries_what_actions_need_and_stamps_the_state() -> None:
    d = run(obs(OL, comfy(), gpus=(QUIET,)), baseline(OL))
    (heal,) = d.actions
    assert isinstance(heal, HealOllama)
    assert (heal.target, heal.model, heal.free_first) == (OLLAMA, "big:12b", ("comfyui/comfyui",))
    assert heal.before_fraction == pytest.approx(4 / 12)
    assert "spilled to the CPU (33% on GPU 0)" in heal.reason
    assert d.state.heal_at(HEAL_KEY) == NOW
    assert d.state.last_episode_at == NOW  # its free counts for the rate limit


def test_heal_without_free_leaves_the_free_rate_limit_alone() -> None:
    d = run(obs(OL, comfy(held=0.1), gpus=(gpu(4),)), baseline(OL))
    assert summary(d) == ["heal:big:12b[]"]
    assert d.state.last_episode_at is None


def test_a_heal_is_not_repeated_next_pass_even_without_an_outcome() -> None:
    """A dry run (or a lost outcome) must not heal every pass: decide stamps the cooldown."""
    d = run(obs(OL, comfy(), gpus=(QUIET,)), baseline(OL))
    again = run(obs(OL, comfy(), gpus=(QUIET,)), d.state, now=NOW + 5)
    assert "heal:big:12b[comfyui]" not in summary(again)
    assert "heal cooldown" in skipped(again)


def test_a_new_load_of_a_healed_model_is_healed_again_within_the_cooldown() -> None:
    """The cooldown was for the earlier load: the model left /api/ps (keep-alive ran out),
    a client loaded it again and it spilled again (frequent with Ollama >= 0.30)."""
    healed = run(obs(OL, comfy(), gpus=(QUIET,)), baseline(OL))
    assert summary(healed) == ["heal:big:12b[comfyui]"]
    gone = run(obs(ollama(), comfy(), gpus=(QUIET,)), healed.state, now=NOW + 60)
    assert gone.state.heal_at(HEAL_KEY) == NOW  # still in its cooldown
    back = run(obs(OL, comfy(), gpus=(QUIET,)), gone.state, now=NOW + 120)
    assert "heal:big:12b[comfyui]" in summary(back)
    # ...while the same load stays in its cooldown.
    again = run(obs(OL, comfy(), gpus=(QUIET,)), back.state, now=NOW + 125)
    assert "heal cooldown" in skipped(again)


def test_a_heal_ignores_the_free_rate_limit() -> None:
    state = baseline(OL, last_episode_at=NOW - 5)
    assert summary(run(obs(OL, comfy(), gpus=(QUIET,)), state)) == ["heal:big:12b[comfyui]"]


def test_cannot_fit_is_noted_once_until_the_model_goes() -> None:
    huge = HUGE
    first = run(obs(huge, comfy(), gpus=(QUIET,)), baseline(huge))
    assert len(first.notes) == 1
    assert (
        "huge:70b (40.0 GiB) cannot fit on the GPU (24.0 GiB less a 512 MiB margin)"
        in (first.notes[0])
    )
    second = run(obs(huge, comfy(), gpus=(QUIET,)), first.state, now=NOW + 5)
    assert (second.notes, summary(second)) == ((), [])
    flaky = run(obs(ollama(unreadable=True), comfy(), gpus=(QUIET,)), second.state, now=NOW + 10)
    assert flaky.state.noted == second.state.noted  # a bad read does not reset it
    gone = run(obs(ollama(), comfy(), gpus=(QUIET,)), flaky.state, now=NOW + 15)
    back = run(obs(huge, comfy(), gpus=(QUIET,)), gone.state, now=NOW + 20)
    assert len(back.notes) == 2  # "new model" and the fit note again


def test_heal_targets_the_comfyui_on_the_models_gpu() -> None:
    o = ollama(SPILLED, gpus=("GPU-1",))
    a, b = comfy("comfy-a", gpus=("GPU-0",)), comfy("comfy-b", gpus=("GPU-1",))
    gpus = (gpu(17, uuid="GPU-0", index=0), gpu(17, uuid="GPU-1", index=1))
    assert summary(run(obs(o, a, b, gpus=gpus), baseline(o))) == ["heal:big:12b[comfy-b]"]


def test_fit_is_judged_on_the_biggest_gpu_the_ollama_uses() -> None:
    o = ollama(model("big:20b", 20, vram=8))
    small, large = gpu(4, 16, "GPU-0", 0), gpu(4, 48, "GPU-1", 1)
    d = run(obs(o, comfy(held=0.1), gpus=(small, large)), baseline(o))
    assert summary(d) == ["heal:big:20b[]"]
    assert "GPU 1" in d.actions[0].reason


def test_waiting_heal_polls_fast() -> None:
    d = run(obs(OL, comfy(running=1), gpus=(QUIET,)), baseline(OL), settings(check_interval_s=30))
    assert d.wake_in_s == 0.5
    assert "has work" in skipped(d)


@pytest.mark.parametrize(
    ("size", "total", "fits"),
    [(23.5, 24, True), (23.6, 24, False), (8, 8, False), (7.5, 8, True)],
)
def test_fits_gpu_keeps_the_margin(size: float, total: float, fits: bool) -> None:
    assert fits_gpu(int(size * GIB), gpu(0, total)) is fits


@pytest.mark.parametrize(("used", "need", "expected"), [(10, 4, 0), (20, 4, 0.5), (24, 1, 1.5)])
def test_room_needed(used: float, need: float, expected: float) -> None:
    assert room_needed(int(need * GIB), gpu(used)) == int(expected * GIB)
    assert SAFETY_MARGIN_BYTES == GIB // 2


# --------------------------------------------------------------------------- heal back-off
# A heal that left the model spilled is not repeated every VRAM_HEAL_COOLDOWN (600 s):
# after n such heals the wait is 600 x 2^n s, at most x 8, unless the room that could be
# made (GPU free + the model's VRAM + idle ComfyUIs' memory) grew by more than 1 GiB.
# With QUIET and comfy() that room is 7 + 4 + 8 = 19 GiB.
BACKOFF_KEY = f"heal|{HEAL_KEY}"


def _backoff(strikes: int, ago: float, room_then: float = 19) -> PolicyState:
    return baseline(OL, backoffs=(Backoff(BACKOFF_KEY, NOW - ago, int(room_then * GIB), strikes),))


HEAL = ["heal:big:12b[comfyui]"]
BACKOFF_CASES = [
    # (strikes, seconds since that heal, room then in GiB) -> actions now
    pytest.param(0, 600, 19, HEAL, id="outcome-not-judged-plain-cooldown"),
    pytest.param(1, 600, 19, [], id="one-miss-waits-2x"),
    pytest.param(1, 1200, 19, HEAL, id="one-miss-2x-over"),
    pytest.param(2, 1200, 19, [], id="two-misses-wait-4x"),
    pytest.param(2, 2400, 19, HEAL, id="two-misses-4x-over"),
    pytest.param(5, 4799, 19, [], id="capped-at-8x-still-waiting"),
    pytest.param(5, 4800, 19, HEAL, id="capped-at-8x-over"),
    pytest.param(3, 600, 18.5, [], id="room-grew-half-a-gib-still-waits"),
    pytest.param(3, 600, 17.9, HEAL, id="room-grew-over-a-gib-plain-cooldown"),
    pytest.param(3, 100, 10, ["free:soft:comfyui"], id="room-grew-plain-cooldown-frees-meanwhile"),
]


@pytest.mark.parametrize(("strikes", "ago", "room_then", "expected"), BACKOFF_CASES)
def test_heal_backs_off_after_heals_that_did_not_help(
    strikes: int, ago: float, room_then: float, expected: list[str]
) -> None:
    d = run(obs(OL, comfy(), gpus=(QUIET,)), _backoff(strikes, ago, room_then))
    assert summary(d) == expected
    if not expected:
        assert f"{strikes} heal(s) in a row left it spilled; backing off" in skipped(d)
    if expected == HEAL:  # the room now is remembered, the strikes kept for the outcome
        assert d.state.backoffs == (Backoff(BACKOFF_KEY, NOW, 19 * GIB, strikes),)


RECORD_HEAL_CASES = [
    # (strikes before, outcome ok, after_fraction, dry run) -> strikes after (None: cleared)
    pytest.param(0, True, 1.0, False, None, id="reached-100-clears"),
    pytest.param(3, True, 1.0, False, None, id="success-resets"),
    pytest.param(0, True, 0.8, False, 1, id="improved-but-still-spilled-is-a-strike"),
    pytest.param(2, False, 0.33, False, 3, id="no-better-adds-a-strike"),
    pytest.param(1, False, None, False, 2, id="failed-before-the-reload-is-a-strike"),
    pytest.param(1, True, None, True, 1, id="dry-run-changes-nothing"),
    pytest.param(None, False, None, False, 1, id="heal-not-decided-here-starts-at-one"),
]


@pytest.mark.parametrize(("before", "ok", "fraction", "dry", "after"), RECORD_HEAL_CASES)
def test_record_counts_heals_that_left_the_model_spilled(
    before: int | None, ok: bool, fraction: float | None, dry: bool, after: int | None
) -> None:
    state = baseline(OL) if before is None else _backoff(before, 5)
    heal = HealOllama(OLLAMA, "big:12b", "r", ("comfyui/comfyui",), 0.33)
    done = record(state, Outcome(heal, NOW, ok, dry_run=dry, after_fraction=fraction), NOW + 9)
    strikes = [b.strikes for b in done.backoffs if b.key == BACKOFF_KEY]
    assert strikes == ([] if after is None else [after])


def test_a_heal_that_never_helps_backs_off_exponentially() -> None:
    """Passes every 100 s for about 4 hours; every heal reloads the model at 33 %."""
    state, heals_at = baseline(OL), list[float]()
    for t in range(0, 14_000, 100):
        now = NOW + t
        d = decide(obs(OL, comfy(), gpus=(QUIET,)), state, settings(), now)
        state = d.state
        for action in d.actions:
            if isinstance(action, HealOllama):
                heals_at.append(t)
            state = record(state, Outcome(action, now, False, after_fraction=0.33), now)
    assert heals_at == [0, 1200, 3600, 8400, 13200]


@pytest.mark.parametrize(
    ("now_seen", "kept"),
    [
        (ollama(model("big:12b", 12)), False),
        (ollama(), False),
        (ollama(running=False), False),
        (ollama(unreadable=True), True),
        (OL, True),
    ],
    ids=["no-longer-spilled", "unloaded", "ollama-stopped", "ps-unreadable", "still-spilled"],
)
def test_heal_backoff_is_forgotten_once_the_model_is_not_spilled(
    now_seen: OllamaObservation, kept: bool
) -> None:
    d = run(obs(now_seen, comfy(), gpus=(QUIET,)), _backoff(2, 100))
    assert (d.state.backoffs != ()) is kept


# --------------------------------------------------------------------------- per-GPU heals
# HealOllama.gpu_uuid: the GPU the model should land on, None when the readings cannot say.
TWO = (gpu(17, uuid="GPU-0", index=0), gpu(10, uuid="GPU-1", index=1))  # GPU-1 has more room
ON_0, ON_1 = comfy("comfy-a", gpus=("GPU-0",)), comfy("comfy-b", gpus=("GPU-1",))

LANDING_CASES = [
    # (Observation) -> HealOllama.gpu_uuid
    pytest.param(obs(OL, comfy(), gpus=(QUIET,)), "GPU-0", id="one-gpu"),
    pytest.param(
        obs(OL, comfy(), gpus=(gpu(17, uuid="api-0"),), source=VramSource.API),
        None,
        id="api-source-pseudo-gpu",
    ),
    pytest.param(obs(ollama(SPILLED, on=("GPU-0",)), ON_0, ON_1, gpus=TWO), "GPU-0", id="holds-on"),
    pytest.param(
        obs(ollama(SPILLED, gpus=("GPU-0",)), ON_0, ON_1, gpus=TWO), "GPU-0", id="docker-granted"
    ),
    pytest.param(obs(OL, ON_0, ON_1, gpus=TWO), "GPU-1", id="gpu-of-the-freed-comfyui"),
    pytest.param(obs(OL, comfy(held=0.1), gpus=TWO), None, id="any-gpu-nothing-freed"),
    pytest.param(obs(OL, comfy(), gpus=TWO), None, id="any-gpu-comfyui-gpus-unknown"),
]


@pytest.mark.parametrize(("o", "landing"), LANDING_CASES)
def test_heal_names_the_gpu_the_model_should_land_on(o: Observation, landing: str | None) -> None:
    d = run(o, baseline(OL))
    heals = [a for a in d.actions if isinstance(a, HealOllama)]
    assert len(heals) == 1, summary(d)
    assert heals[0].gpu_uuid == landing


@pytest.mark.parametrize(
    ("fit", "used", "expected", "why"),
    [
        # room = free + the model's 4 GiB; need = 12 GiB + 512 MiB margin + fit target
        (0, 15.25, ["heal:big:12b[]"], ""),  # 12.75 GiB of room >= 12.5
        (1, 15.25, [], "12.8 GiB could be made free, 13.5 GiB needed"),  # llama-server
        (1, 14.25, ["heal:big:12b[]"], ""),
    ],
)
def test_the_fit_target_of_ollama_0_30_is_part_of_the_heal_margin(
    fit: float, used: float, expected: list[str], why: str
) -> None:
    o = ollama(SPILLED, fit=fit)
    d = run(obs(o, gpus=(gpu(used),)), baseline(o))
    assert summary(d) == expected
    assert why in skipped(d)


def test_a_model_that_fits_only_without_the_fit_target_is_not_healed() -> None:
    o = ollama(model("big:23b", 23, vram=20), fit=1)
    d = run(obs(o, gpus=(QUIET,)), baseline(o))
    assert summary(d) == []
    assert "cannot fit on the GPU (24.0 GiB less a 1.5 GiB margin)" in d.notes[0]
