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
    HealOllama,
    Observation,
    PolicyState,
    Priority,
)
from supervisor.policy import SAFETY_MARGIN_BYTES, fits_gpu, room_needed

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
