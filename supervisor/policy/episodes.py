"""Free episodes: opening them from the triggers' wants, advancing them pass by pass (pure).

A ComfyUI is freed only if it runs, answered this pass, its queue is known, the priority
allows (`balanced`/`comfyui`: only while idle; `ollama`: also while busy, the flags then
wait for the prompt) and it holds more than MIN_RECLAIMABLE_BYTES that /free could return.
A trigger calls `want_free`; `open_episodes` turns the wants into actions at the end.

Episodes (one per ComfyUI, in `PolicyState.episodes`): a new one starts soft. At most one
pass per VRAM_MIN_FREE_INTERVAL starts new episodes (several ComfyUIs on several GPUs may
start in that same pass); escalation inside an open episode is not rate-limited. After
`record()`: FREED -> closed next pass, unless the GPU is still at/above the aggressive
threshold after a soft free and the ComfyUI still holds something (-> hard). PENDING ->
wait while the queue is busy, then judge it like FREED. PINNED -> soft goes hard; hard goes
to a restart. FAILED or dry run -> closed (a dry run still counted for the rate limit, so
a dry-run supervisor says "would free" once per interval). Episodes close after a restart,
when their ComfyUI stops or disappears, and after EPISODE_STALE_S.

Restarts (`try_restart`, guards in `guards.py`): a dead API is a restart candidate only
when a trigger wants room from that ComfyUI (a VRAM supervisor does not restart services
that nobody needs room from). A failed guard is named in `reasons_skipped`; a transient one
(busy, queue unknown) keeps the episode waiting, a lasting one closes it. A restart
attempt counts for the cooldown even if refused when acted on: no restart loops.

Estimates: a Dynamic-VRAM ComfyUI without NVML has only a figure bounded from the whole
device (`vram_is_estimate`: other GPU users count in it). It may get a soft free (which
releases Dynamic VRAM weights), never a hard free or a restart on that figure: a soft free
that left it PINNED, or the GPU still high, closes the episode as "cannot tell".

Pinned hold: a ComfyUI that kept its memory after a hard free (PINNED) and may not be
restarted (a lasting refusal: not allowed, not a container, restart cooldown) would
otherwise get a soft and a hard free every VRAM_MIN_FREE_INTERVAL, each hard free dropping
its execution cache. It is held back instead (a `Backoff` "free|<key>", said once as a
note): no new episode for it until what it holds changes by more than
MIN_RECLAIMABLE_BYTES, its container changes or stops, a restart becomes possible, or
VRAM_RESTART_COOLDOWN passes. A heal does not count on its memory meanwhile.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.model import (
    Backoff,
    ComfyObservation,
    Episode,
    FreeComfy,
    FreeResult,
    FreeStage,
    GpuMemory,
    RestartComfy,
)
from supervisor.policy.guards import (
    EPISODE_STALE_S,
    MIN_RECLAIMABLE_BYTES,
    estimate_reclaimable,
    free_blocker,
    is_api_dead,
    restart_guards,
    service_gpus,
)
from supervisor.policy.scratch import Pass, Want
from supervisor.units import format_bytes

_CANNOT_TELL = (
    "cannot tell whether it holds more: without NVML its figure is an estimate from the "
    "whole GPU (other GPU users count in it), so no hard free or restart follows"
)


def close_episode(p: Pass, key: str, why: str) -> None:
    p.episodes.pop(key, None)
    p.skip(f"Free episode on {key} closed: {why}")


def advance_episodes(p: Pass) -> None:
    for ep in p.state.episodes:
        key = ep.target
        c = p.comfys.get(key)
        if p.now - ep.started_at > EPISODE_STALE_S:
            close_episode(p, key, f"stale after {p.now - ep.started_at:.0f} s")
        elif c is None:
            if p.obs.docker_ok is not False:
                close_episode(p, key, "the service is gone")
        elif not c.status.is_running:
            close_episode(p, key, "its container is not running")
        elif ep.last_result is None:
            pass  # the action is in flight or its outcome was not recorded yet
        elif not c.status.is_reachable:
            if is_api_dead(c):
                why = f"its API has not answered for {c.status.failed_checks} checks"
                try_restart(p, c, ep, why)
            else:
                blocker = free_blocker(c, p.cuts_work(c), p.settings.priority)
                p.skip(f"Free episode on {key} waits: {blocker}")
        elif ep.stage is FreeStage.RESTART:
            close_episode(p, key, "restarted")
        elif ep.last_result is FreeResult.PENDING:
            if c.queue is None or c.queue.is_busy:
                p.skip(f"Free episode on {key} waits for the running prompt to end")
            else:
                _settle_freed(p, c, ep)
        elif ep.last_result is FreeResult.FREED:
            _settle_freed(p, c, ep)
        elif ep.last_result is FreeResult.PINNED:
            if c.vram_is_estimate:
                close_episode(p, key, _CANNOT_TELL)
            elif ep.stage is FreeStage.SOFT:
                _escalate(p, c, ep, "the soft free released nothing", keep_if_blocked=True)
            elif not try_restart(p, c, ep, "the hard free released nothing") and (
                key not in p.episodes  # closed: the refusal lasts
            ):
                _hold_pinned(p, c)
        else:
            close_episode(p, key, "the free failed")


def _episode_gpu(p: Pass, c: ComfyObservation, ep: Episode) -> GpuMemory | None:
    exact = [g for g in p.gpus if g.uuid == ep.gpu_uuid]
    pool = exact or p.gpus_of(service_gpus(c))
    return max(pool, key=lambda g: g.used_percent, default=None)


def _settle_freed(p: Pass, c: ComfyObservation, ep: Episode) -> None:
    key = ep.target
    g = _episode_gpu(p, c, ep)
    if g is None:
        close_episode(p, key, "freed (no GPU reading to judge further)")
        return
    pct, aggressive = g.used_percent, p.settings.aggressive_threshold_percent
    if ep.stage is not FreeStage.SOFT or pct < aggressive:
        close_episode(p, key, f"freed, GPU {g.index} at {pct:.0f}%")
    elif estimate_reclaimable(c) <= MIN_RECLAIMABLE_BYTES:
        close_episode(p, key, f"GPU {g.index} still at {pct:.0f}% but {key} holds nothing more")
    elif c.vram_is_estimate:
        close_episode(p, key, f"GPU {g.index} still at {pct:.0f}%; {_CANNOT_TELL}")
    else:
        why = f"GPU {g.index} still at {pct:.0f}% (aggressive {aggressive:g}%) after the soft free"
        _escalate(p, c, ep, why, keep_if_blocked=False)


def _escalate(
    p: Pass, c: ComfyObservation, ep: Episode, why: str, *, keep_if_blocked: bool
) -> None:
    key = ep.target
    blocker = free_blocker(c, p.cuts_work(c), p.settings.priority)
    if blocker is not None:
        if keep_if_blocked:
            p.skip(f"Free episode on {key} waits before the hard free: {blocker}")
        else:  # it took the room back for its own work, which the priority allows
            close_episode(p, key, blocker)
        return
    p.emit(FreeComfy(key, FreeStage.HARD, f"{ep.reason}; {why}", ep.gpu_uuid))
    p.episodes[key] = replace(ep, stage=FreeStage.HARD, last_result=None, last_at=p.now)
    p.claimed.add(key)


def try_restart(p: Pass, c: ComfyObservation, ep: Episode | None, why: str) -> bool:
    key = c.status.spec.key
    failed = restart_guards(c, p.restart_at.get(key), p.settings, p.now)
    if failed:
        p.skip(f"Not restarting {key} ({why}): " + "; ".join(m for _, m in failed))
        if is_api_dead(c):
            p.note_once(
                f"dead|{key}",
                f"ComfyUI {key} has not answered for "
                f"{c.status.failed_checks} checks and cannot be restarted: "
                + "; ".join(m for _, m in failed),
            )
        if ep is not None and not all(t for t, _ in failed):
            close_episode(p, key, "restart not possible")
        return False
    reason = f"{ep.reason}; {why}" if ep is not None else why
    p.emit(RestartComfy(key, reason))
    base = ep or Episode(key, FreeStage.RESTART, p.now, reason)
    p.episodes[key] = replace(base, stage=FreeStage.RESTART, last_result=None, last_at=p.now)
    p.restart_at[key] = p.now
    p.claimed.add(key)
    return True


def _hold_pinned(p: Pass, c: ComfyObservation) -> None:
    key, held = c.status.spec.key, estimate_reclaimable(c)
    bkey = f"free|{key}"
    p.backoffs[bkey] = Backoff(bkey, p.now, held, container_id=c.status.spec.container_id)
    p.notes.append(
        f"ComfyUI {key} keeps {format_bytes(held)} after a hard free and may not be "
        f"restarted; not freeing it again until what it holds changes by more than "
        f"{format_bytes(MIN_RECLAIMABLE_BYTES)}, its container restarts, a restart becomes "
        f"possible or {p.settings.restart_cooldown_s:.0f} s pass"
    )


def pinned_hold(p: Pass, c: ComfyObservation) -> str | None:
    """Why this ComfyUI is held back after a hard free that released nothing (None: it is
    not, or no longer; an ended hold is dropped). Judge it only on a reading that answered."""
    key = c.status.spec.key
    bo = p.backoffs.get(f"free|{key}")
    if bo is None:
        return None
    held = estimate_reclaimable(c)
    lasting = [m for t, m in restart_guards(c, p.restart_at.get(key), p.settings, p.now) if not t]
    left = p.settings.restart_cooldown_s - (p.now - bo.at)
    ended = None
    if c.status.spec.container_id != bo.container_id:
        ended = "its container changed"
    elif abs(held - bo.bytes_then) > MIN_RECLAIMABLE_BYTES:
        ended = f"it held {format_bytes(bo.bytes_then)}, now {format_bytes(held)}"
    elif left <= 0:
        ended = f"{p.settings.restart_cooldown_s:.0f} s passed"
    elif not lasting:
        ended = "a restart is possible now"
    if ended is not None:
        del p.backoffs[bo.key]
        p.skip(f"{key} is no longer held back after its hard free: {ended}")
        return None
    return (
        f"it kept {format_bytes(bo.bytes_then)} after a hard free and may not be restarted "
        f"({'; '.join(lasting)}); held back {left:.0f} s more unless that changes"
    )


def want_free(p: Pass, c: ComfyObservation, reason: str, gpu_uuid: str | None) -> None:
    key = c.status.spec.key
    if key in p.claimed or key in p.wants or key in p.episodes:
        return
    if is_api_dead(c) and (c.vram_bytes is None or c.vram_bytes > MIN_RECLAIMABLE_BYTES):
        p.wants[key] = Want(reason, gpu_uuid, dead=True)
        return
    blocker = free_blocker(c, p.cuts_work(c), p.settings.priority)
    if blocker is not None:
        p.skip(f"Not freeing {key} ({reason}): {blocker}")
        return
    hold = pinned_hold(p, c)
    if hold is not None:
        p.skip(f"Not freeing {key} ({reason}): {hold}")
        return
    held = estimate_reclaimable(c)
    if held <= MIN_RECLAIMABLE_BYTES:
        p.skip(
            f"Not freeing {key} ({reason}): it holds only {format_bytes(held)} a free could return"
        )
        return
    p.wants[key] = Want(reason, gpu_uuid)


def open_episodes(p: Pass) -> None:
    if not p.wants:
        return
    last, interval = p.state.last_episode_at, p.settings.min_free_interval_s
    if last is not None and p.now - last < interval:
        left = interval - (p.now - last)
        for key, want in p.wants.items():
            p.skip(f"Not freeing {key} ({want.reason}) yet: rate limit, {left:.0f} s left")
        p.soon(left)
        return
    for key, want in p.wants.items():
        c = p.comfys[key]
        if want.dead:
            why = f"its API has not answered for {c.status.failed_checks} checks"
            if not try_restart(p, c, None, f"{want.reason}; {why}"):
                continue
        else:
            p.emit(FreeComfy(key, FreeStage.SOFT, want.reason, want.gpu_uuid))
            p.episodes[key] = Episode(
                key, FreeStage.SOFT, p.now, want.reason, want.gpu_uuid, last_at=p.now
            )
            p.claimed.add(key)
        p.last_episode_at = p.now
