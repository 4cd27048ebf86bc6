"""The policy's two entry points: `decide()` runs the rules of one pass, `record()` folds
an action's measured outcome back into the state (pure; see `supervisor.policy`).

Wake-up (`Decision.wake_in_s`): VRAM_CHECK_INTERVAL, shorter while something is in motion.
FAST_WAKE_S (0.5 s) while a free episode is open, a heal waits, or the model list just
changed: their next step depends on the next reading. A ComfyUI with work and nothing else
pending wakes at min(VRAM_CHECK_INTERVAL, BUSY_WAKE_S): a generation lasts minutes, and
0.5 s passes for all of it would be waste, yet its end (when room may be taken back or
an unload judged) should not wait a long check interval. A rate limit or cooldown wakes
when it ends. Never faster than min(VRAM_CHECK_INTERVAL, FAST_WAKE_S).
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.config import Settings
from supervisor.model import (
    Backoff,
    Decision,
    Episode,
    FreeComfy,
    FreeJobs,
    FreeResult,
    HealWait,
    Observation,
    Outcome,
    PolicyState,
    ReloadJobs,
    RestartComfy,
    UnloadModel,
    UnloadOllama,
    WakeModel,
)
from supervisor.policy.episodes import advance_episodes, open_episodes
from supervisor.policy.guards import (
    EPISODE_STALE_S,
    MIN_RECLAIMABLE_BYTES,
    has_work,
    is_api_dead,
    model_ok,
)
from supervisor.policy.heal import follow_heal_waits, heal_spilled
from supervisor.policy.scratch import Pass, start_pass, usable_ollama
from supervisor.policy.triggers import (
    free_for_new_models,
    free_over_threshold,
    note_server_spills,
    reload_parked,
    track_models,
    unload_for_comfy,
    wake_sleeping,
)

FAST_WAKE_S = 0.5
BUSY_WAKE_S = 2.0


def decide(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Decision:
    """One pass: the actions to take now, the next state, notes and the next wake-up."""
    p = start_pass(obs, state, settings, now)
    known, seen = track_models(p)
    advance_episodes(p)
    follow_heal_waits(p)
    heal_spilled(p)
    free_for_new_models(p)
    free_over_threshold(p)
    unload_for_comfy(p)
    note_server_spills(p)
    wake_sleeping(p)
    reload_parked(p)
    open_episodes(p)

    # Forget what a sleep gave back once its model is read and no longer sleeps.
    for key in list(p.slept):
        server, _, name = key.partition("|")
        m = p.servers.get(server)
        if m is None or (
            m.state is not None
            and not any(x.name == name and x.state == "sleeping" for x in m.models)
        ):
            del p.slept[key]

    # Keep "said once" notes only while their condition holds.
    for key in p.noted - p.keep_noted:
        if key.startswith("dead|") and key[5:] in p.comfys and not is_api_dead(p.comfys[key[5:]]):
            p.noted.discard(key)
        elif key.startswith("nofit|"):
            okey = key.split("|")[1]
            if okey not in p.ollamas or usable_ollama(p.ollamas[okey]):
                p.noted.discard(key)
        elif key.startswith("wakeroom|"):
            p.noted.discard(key)  # woken, or no longer waited for: say it again next time

    if p.episodes or p.new_models:
        p.soon()
    if any(has_work(c) for c in p.comfys.values()) or any(j.has_work for j in p.jobs.values()):
        p.soon(BUSY_WAKE_S)
    fast = min(settings.check_interval_s, FAST_WAKE_S)
    wake = settings.check_interval_s
    for seconds in p.wake:
        wake = min(wake, max(seconds, fast))

    restart_at = {k: t for k, t in p.restart_at.items() if now - t < settings.restart_cooldown_s}
    heal_at = {k: t for k, t in p.heal_at.items() if now - t < settings.heal_cooldown_s}
    backoffs = tuple(b for b in p.backoffs.values() if _backoff_holds(p, b))
    next_state = PolicyState(
        is_initialised=True,
        known_models=known,
        last_episode_at=p.last_episode_at,
        last_unload_at=p.last_unload_at,
        episodes=tuple(p.episodes.values()),
        last_restart_at=tuple(sorted(restart_at.items())),
        last_heal_at=tuple(sorted(heal_at.items())),
        seen_ollamas=seen,
        noted=frozenset(p.noted),
        backoffs=backoffs,
        heal_waits=tuple(p.heal_waits.values()),
        last_job_free_at=tuple(
            sorted(
                (k, t) for k, t in p.job_free_at.items() if now - t < settings.min_free_interval_s
            )
        ),
        slept_bytes=tuple(sorted(p.slept.items())),
    )
    return Decision(tuple(p.actions), next_state, tuple(p.notes), wake, tuple(p.skipped))


def _backoff_holds(p: Pass, b: Backoff) -> bool:
    """Keep a back-off while its target is still there (or unknown: Docker failed)."""
    kind, _, key = b.key.partition("|")
    if kind == "free":
        c = p.comfys.get(key)
        if c is None:
            return p.obs.docker_ok is False and p.now - b.at < p.settings.restart_cooldown_s
        return c.status.is_running and p.now - b.at < p.settings.restart_cooldown_s
    okey, _, name = key.partition("|")
    o = p.ollamas.get(okey)
    if o is None:
        return p.obs.docker_ok is False
    if not o.status.is_running:
        return False
    if (okey, name) in p.healed or key in p.heal_waits:
        return True  # its heal goes on (a reload of a model not listed now): judged then
    if not usable_ollama(o) or o.models is None:
        return True  # unread: keep what is known
    return any(m.name == name and model_ok(m) and m.is_spilled for m in o.models)


def record(state: PolicyState, outcome: Outcome, now: float) -> PolicyState:
    """Fold one action's measured outcome into the state (see the module doc for stages).

    A free the policy did not start (the gate's) opens an episode and counts for the rate
    limit, so it can escalate and is not repeated at once. A heal that left its model below
    100 % on the GPU adds a strike to its back-off (see `heal`); one that reached 100 %
    clears it; a dry run does neither. A heal that reports its unload waiting for a busy
    model (`awaiting_unload`) is not judged yet: it is remembered as a `HealWait`, which
    decide() carries on. `now` drops stale episodes."""
    action, at = outcome.action, outcome.at
    episodes = {e.target: e for e in state.episodes if now - e.started_at <= EPISODE_STALE_S}
    last_episode_at, last_unload_at = state.last_episode_at, state.last_unload_at
    restarts, heals = dict(state.last_restart_at), dict(state.last_heal_at)
    backoffs = {b.key: b for b in state.backoffs}
    waits = {w.key: w for w in state.heal_waits}
    job_frees = dict(state.last_job_free_at)
    slept = dict(state.slept_bytes)
    if isinstance(action, FreeComfy):
        ep = episodes.get(action.target)
        if ep is None:
            ep = Episode(action.target, action.stage, at, action.reason, action.gpu_uuid)
            last_episode_at = max(at, last_episode_at if last_episode_at is not None else at)
        result = outcome.result or (FreeResult.FREED if outcome.ok else FreeResult.FAILED)
        if outcome.dry_run or result is FreeResult.FAILED:
            episodes.pop(action.target, None)
        else:
            episodes[action.target] = replace(
                ep, stage=action.stage, last_result=result, last_at=at
            )
    elif isinstance(action, RestartComfy):
        episodes.pop(action.target, None)
        restarts[action.target] = max(at, restarts.get(action.target, at))
    elif isinstance(action, UnloadOllama | UnloadModel):
        last_unload_at = max(at, last_unload_at if last_unload_at is not None else at)
        gave = (
            outcome.after_bytes - outcome.before_bytes
            if outcome.after_bytes is not None and outcome.before_bytes is not None
            else 0
        )
        if isinstance(action, UnloadModel) and outcome.ok and gave >= MIN_RECLAIMABLE_BYTES:
            slept[f"{action.target}|{action.model}"] = gave  # kept only while it sleeps
    elif isinstance(action, FreeJobs | ReloadJobs):
        job_frees[action.target] = max(at, job_frees.get(action.target, at))
    elif isinstance(action, WakeModel):
        # Judged by the next reading: still sleeping with requests waiting -> again.
        if outcome.ok:
            slept.pop(f"{action.target}|{action.model}", None)
    else:
        key = f"{action.target}|{action.model}"
        heals[key] = max(at, heals.get(key, at))
        waits.pop(key, None)
        if outcome.awaiting_unload and not outcome.dry_run:
            # Not judged yet: the unload waits in Ollama for a request to end; decide()
            # reloads the model once it leaves /api/ps (see `heal`).
            waits[key] = HealWait(
                key,
                action.target,
                action.model,
                at,
                outcome.keep_alive,
                action.before_fraction,
                action.free_first,
                action.gpu_uuid,
            )
        elif not outcome.dry_run:
            bkey = f"heal|{key}"
            if outcome.after_fraction is not None and outcome.after_fraction >= 1.0:
                backoffs.pop(bkey, None)  # healed: the plain cooldown again
            else:  # it stayed spilled (or the heal failed): back off further
                old = backoffs.get(bkey) or Backoff(bkey, at)
                backoffs[bkey] = replace(old, strikes=old.strikes + 1)
    return replace(
        state,
        episodes=tuple(episodes.values()),
        last_episode_at=last_episode_at,
        last_unload_at=last_unload_at,
        last_restart_at=tuple(sorted(restarts.items())),
        last_heal_at=tuple(sorted(heals.items())),
        backoffs=tuple(backoffs.values()),
        heal_waits=tuple(waits.values()),
        last_job_free_at=tuple(sorted(job_frees.items())),
        slept_bytes=tuple(sorted(slept.items())),
    )
