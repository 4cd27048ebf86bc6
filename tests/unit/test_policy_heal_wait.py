"""decide()/record(): a heal whose unload waits for a busy model's request to end.

The heal leaves its keep_alive 0 unload armed (Ollama unloads the model when the request
ends, api-facts 1.6) and the policy carries the heal on: reload once the model has left
/api/ps, judge a load a request made first, withdraw the unload past the bound."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_policy_builders import (
    COMFY,
    GIB,
    NOW,
    OLLAMA,
    baseline,
    comfy,
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
    Backoff,
    ComfyObservation,
    HealOllama,
    HealWait,
    Observation,
    Outcome,
    PolicyState,
)
from supervisor.policy import FAST_WAKE_S, decide, record
from supervisor.policy.heal import HEAL_SEVERE_FRACTION, HEAL_WAIT_FACTOR, HEAL_WAIT_SEVERE_FACTOR

SPILLED = model("big:12b", 12, vram=4)
OL = ollama(SPILLED)
KEY = f"{OLLAMA}|big:12b"
BKEY = f"heal|{KEY}"
BOUND = HEAL_WAIT_FACTOR * settings().verify_timeout_s  # 100 s at the default 10 s
SEVERE_BOUND = HEAL_WAIT_SEVERE_FACTOR * settings().verify_timeout_s  # 600 s
WAIT = HealWait(KEY, OLLAMA, "big:12b", NOW - 20, 300, 4 / 12, (COMFY,), "GPU-0")
# A mild spill: 11.5 of 12 GiB on the GPU, above HEAL_SEVERE_FRACTION.
MILD = model("big:12b", 12, vram=11.5)
OL_MILD = ollama(MILD)
WAIT_MILD = replace(WAIT, before_fraction=11.5 / 12)
assert WAIT_MILD.before_fraction >= HEAL_SEVERE_FRACTION > WAIT.before_fraction
FREED = comfy(held=0.1)  # what the heal's hard free left
ROOMY = gpu(9)  # after the unload: room for the whole model


def waiting(wait: HealWait = WAIT, strikes: int | None = None, **changes: object) -> PolicyState:
    backoffs = () if strikes is None else (Backoff(BKEY, wait.since, 19 * GIB, strikes),)
    return baseline(OL, heal_waits=(wait,), backoffs=backoffs, **changes)


def gone(*services: ComfyObservation) -> Observation:
    return obs(ollama(), *services, gpus=(ROOMY,))


CASES = [
    # id, observation, state -> actions, reason in reasons_skipped, wait kept
    pytest.param(
        obs(OL, FREED, gpus=(gpu(17),)),
        waiting(),
        [],
        "waits for its request to end",
        True,
        id="still-busy-waits-no-new-heal",
    ),
    pytest.param(
        obs(OL_MILD, comfy(), gpus=(gpu(17),)),
        waiting(replace(WAIT_MILD, since=NOW - 700)),  # cooldown over, bound not ...
        ["withdraw:big:12b"],  # ... but the bound is: withdrawn
        "",
        False,
        id="mild-spill-still-listed-past-the-bound-withdraws",
    ),
    pytest.param(
        obs(OL_MILD, FREED, gpus=(gpu(17),)),
        waiting(replace(WAIT_MILD, since=NOW - BOUND + 1)),
        [],
        "waits for its request to end",
        True,
        id="mild-spill-just-inside-the-bound-waits",
    ),
    pytest.param(
        obs(OL, FREED, gpus=(gpu(17),)),
        waiting(replace(WAIT, since=NOW - BOUND - 100)),
        [],
        "waits for its request to end",
        True,
        id="severe-spill-past-the-mild-bound-keeps-the-unload-armed",
    ),
    pytest.param(
        obs(OL, comfy(), gpus=(gpu(17),)),
        waiting(replace(WAIT, since=NOW - SEVERE_BOUND)),
        ["withdraw:big:12b"],
        "",
        False,
        id="severe-spill-past-its-bound-withdraws",
    ),
    pytest.param(
        obs(ollama(model("big:12b", 12, vram=7)), FREED, gpus=(gpu(12),)),
        waiting(),  # the wait began at 4 of 12 GiB: another split is another load
        ["heal:big:12b[]"],
        "",
        False,
        id="reloaded-by-a-request-spilled-again-is-healed-afresh",
    ),
    pytest.param(gone(FREED), waiting(), ["reload:big:12b[]"], "", False, id="gone-reloads"),
    pytest.param(
        gone(comfy()),
        waiting(),
        ["reload:big:12b[comfyui]"],
        "",
        False,
        id="gone-comfy-took-memory-back-freed-again",
    ),
    pytest.param(
        gone(comfy(running=1)),
        waiting(),
        ["reload:big:12b[]"],
        "",
        False,
        id="gone-busy-comfy-not-freed",
    ),
    pytest.param(
        obs(ollama(model("big:12b", 12)), FREED, gpus=(gpu(17),)),
        waiting(),
        [],
        "",
        False,
        id="a-request-loaded-it-whole-first",
    ),
    pytest.param(
        obs(ollama(running=False), FREED), waiting(), [], "", False, id="ollama-stopped-forgets"
    ),
    pytest.param(
        obs(ollama(unreadable=True), FREED), waiting(), [], "", True, id="ps-unreadable-keeps"
    ),
    pytest.param(obs(FREED, docker_ok=False), waiting(), [], "", True, id="docker-failed-keeps"),
    pytest.param(obs(FREED), waiting(), [], "", False, id="ollama-gone-forgets"),
]


@pytest.mark.parametrize(("o", "state", "expected", "why", "kept"), CASES)
def test_a_waiting_heal_is_carried_on(
    o: Observation, state: PolicyState, expected: list[str], why: str, kept: bool
) -> None:
    d = run(o, state)
    assert summary(d) == expected
    assert why in skipped(d)
    assert d.state.heal_waits == (state.heal_waits if kept else ())


def test_the_reload_carries_the_saved_keep_alive_and_stamps_the_heal() -> None:
    d = run(gone(FREED), waiting(replace(WAIT, keep_alive=-1)))
    (reload,) = d.actions
    assert isinstance(reload, HealOllama)
    assert reload.reload_only and not reload.withdraw and reload.keep_alive == -1
    assert (reload.before_fraction, reload.gpu_uuid) == (WAIT.before_fraction, "GPU-0")
    assert d.state.heal_waits == () and d.state.heal_at(KEY) == NOW


def test_a_waiting_heal_polls_fast() -> None:
    d = run(obs(OL, FREED, gpus=(gpu(17),)), waiting(), settings(check_interval_s=30))
    assert d.wake_in_s == FAST_WAKE_S


def test_a_model_waiting_for_its_unload_is_not_unloaded_for_comfyui() -> None:
    d = run(obs(OL, comfy(running=1), gpus=(gpu(20),)), waiting())
    assert not any(s.startswith("unload:") for s in summary(d))


def test_a_request_loading_it_whole_first_ends_the_back_off() -> None:
    d = run(obs(ollama(model("big:12b", 12)), FREED, gpus=(gpu(17),)), waiting(strikes=2))
    assert d.state.backoffs == ()
    assert any("loaded again by a request" in n for n in d.notes)


def test_the_back_off_holds_while_the_model_is_reloaded() -> None:
    d = run(gone(FREED), waiting(strikes=2))
    assert [b.strikes for b in d.state.backoffs] == [2]
    (reload,) = d.actions
    after = record(d.state, Outcome(reload, NOW, False, after_fraction=0.5), NOW + 30)
    assert [b.strikes for b in after.backoffs] == [3]


def _heal() -> HealOllama:
    return HealOllama(OLLAMA, "big:12b", "r", (COMFY,), 4 / 12, "GPU-0")


def test_record_keeps_a_waiting_heal_unjudged() -> None:
    state = baseline(OL, backoffs=(Backoff(BKEY, NOW, 19 * GIB, 1),))
    out = Outcome(_heal(), NOW, False, detail="waiting: ...", awaiting_unload=True, keep_alive=300)
    done = record(state, out, NOW + 10)
    assert done.heal_waits == (
        HealWait(KEY, OLLAMA, "big:12b", NOW, 300, 4 / 12, (COMFY,), "GPU-0"),
    )
    assert [b.strikes for b in done.backoffs] == [1]  # no strike: not judged yet
    assert done.heal_at(KEY) == NOW


def test_record_of_a_dry_run_keeps_no_wait() -> None:
    out = Outcome(_heal(), NOW, True, dry_run=True, awaiting_unload=True, keep_alive=300)
    assert record(baseline(OL), out, NOW).heal_waits == ()


def test_a_busy_heal_from_start_to_healed() -> None:
    """Heal -> the request keeps it busy -> waits -> the model leaves /api/ps -> reload."""
    s = settings()
    busy = obs(OL, comfy(), gpus=(gpu(17),))
    d = decide(busy, baseline(OL), s, NOW)
    (heal,) = d.actions
    out = Outcome(heal, NOW, False, detail="waiting: ...", awaiting_unload=True, keep_alive=300)
    state = record(d.state, out, NOW + 10)
    d = decide(replace(busy, comfyuis=(FREED,)), state, s, NOW + 40)
    assert d.actions == ()
    d = decide(gone(FREED), d.state, s, NOW + 70)
    (reload,) = d.actions
    assert isinstance(reload, HealOllama) and reload.reload_only and reload.keep_alive == 300
    state = record(d.state, Outcome(reload, NOW + 70, True, after_fraction=1.0), NOW + 80)
    assert state.heal_waits == () and state.backoffs == ()
    d = decide(obs(ollama(model("big:12b", 12)), FREED, gpus=(gpu(21),)), state, s, NOW + 81)
    assert d.actions == ()


def test_the_reloaded_model_is_not_a_new_model() -> None:
    d = run(gone(FREED), waiting())
    assert ("ollama/ollama", "big:12b") in d.state.known_models
    back = run(obs(ollama(model("big:12b", 12)), FREED, gpus=(gpu(21),)), d.state, now=NOW + 5)
    assert not any("New Ollama model" in n for n in back.notes)
    assert summary(back) == []
