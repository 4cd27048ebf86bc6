"""The pure decision core: what to do about GPU memory this pass, and what to remember.

`decide(obs, state, settings, now)` reads one `Observation` and the previous `PolicyState`
and returns a `Decision`: actions with reasons, the next state, INFO notes, DEBUG reasons
why a trigger did not act, and when to look again. `record(state, outcome, now)` folds the
measured `Outcome` of one action back into the state. Nothing here performs I/O or reads
the clock: both functions are deterministic in their arguments (imports: stdlib, model,
config only; a test checks it in a fresh interpreter).

Triggers, evaluated per GPU (a service with no GPU list shares every GPU):
1. New model(s) in an Ollama's /api/ps since its previous read (an Ollama's first read is a
   baseline, so nothing is "new" on the first pass) -> note "New Ollama model(s)
   detected: ..." and free (soft) each ComfyUI sharing a GPU with that Ollama.
2. A GPU at or above VRAM_THRESHOLD -> free (soft) the ComfyUIs on it.
3. A spilled model (size_vram < size). A model that could not fit the GPU anyway is
   noted once and left alone. Otherwise, with VRAM_HEAL, its cooldown passed, no free
   episode open on that GPU and room that can be made (GPU free + the model's own VRAM
   + what idle ComfyUIs could give back >= size + SAFETY_MARGIN_BYTES), it is healed:
   HealOllama frees those idle ComfyUIs itself (one heal per GPU per pass). While the heal
   must wait (healing off, cooldown, a busy ComfyUI) its ComfyUIs are freed so the room
   exists for the heal or the next load. When even freeing everything cannot make the room,
   nothing is done.
4. A ComfyUI with work on a GPU at or above the threshold while Ollama models hold VRAM
   there -> unload Ollama models, soonest `expires_at` first (the least recently used when
   keep_alive is uniform; Ollama has no busy flag, and it defers an unload until in-flight
   requests finish), until the estimate is below the threshold. At most one unload round
   per VRAM_MIN_FREE_INTERVAL (`last_unload_at`). Never under priority `ollama`.

A ComfyUI is freed only if it runs, answered this pass, its queue is known, the priority
allows (`balanced`/`comfyui`: only while idle; `ollama`: also while busy, the flags then
wait for the prompt) and it holds more than MIN_RECLAIMABLE_BYTES that /free could return.

Episodes (one per ComfyUI, in `PolicyState.episodes`): a new one starts soft. At most one
pass per VRAM_MIN_FREE_INTERVAL starts new episodes (several ComfyUIs on several GPUs may
start in that same pass); escalation inside an open episode is not rate-limited. After
`record()`: FREED -> closed next pass, unless the GPU is still at/above the aggressive
threshold after a soft free and the ComfyUI still holds something (-> hard). PENDING ->
wait while the queue is busy, then judge it like FREED. PINNED -> soft goes hard; hard goes
to a restart. FAILED or dry run -> closed (a dry run still counted for the rate limit, so
a dry-run supervisor says "would free" once per interval). Episodes close after a restart,
when their ComfyUI stops or disappears, and after EPISODE_STALE_S.

Restart (RestartComfy) only when every guard holds: allowed (label, else
VRAM_RESTART_FALLBACK), a container, running, cooldown passed, and either its queue is
known and empty or its API has been dead for DEAD_API_CHECKS passes (and Docker's health
is not "starting": slow starters are not restarted). A dead API is a restart candidate only
when a trigger wants room from that ComfyUI (a VRAM supervisor does not restart services
that nobody needs room from). A failed guard is named in `reasons_skipped`; a transient one
(busy, queue unknown) keeps the episode waiting, a lasting one closes it. A restart
attempt counts for the cooldown even if refused when acted on: no restart loops.

Never: an action on a stopped or unreachable service (other than the dead-API restart),
an action from a missing or garbage reading (models/queue None, a GPU with impossible
figures: that trigger does nothing this pass), or the same action twice in one decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from supervisor.config import Settings
from supervisor.model import (
    Action,
    ComfyObservation,
    Decision,
    Episode,
    FreeComfy,
    FreeResult,
    FreeStage,
    GpuMemory,
    HealOllama,
    Observation,
    OllamaModel,
    OllamaObservation,
    Outcome,
    PolicyState,
    Priority,
    RestartComfy,
    ServiceHealth,
    UnloadOllama,
)

MIB = 1024**2
GIB = 1024**3
# Below this a free gives back nothing worth a ComfyUI reload (mGPUmanager's cushion).
MIN_RECLAIMABLE_BYTES = 256 * MIB
# What a CUDA process keeps after /free (its context), when only an NVML figure is known.
CUDA_CONTEXT_BYTES = 384 * MIB
# Head room kept on top of a model's size when judging fit and room.
SAFETY_MARGIN_BYTES = 512 * MIB
DEAD_API_CHECKS = 3
EPISODE_STALE_S = 300.0
FAST_WAKE_S = 0.5


# --------------------------------------------------------------------------- helpers


def _size(value: int | None) -> str:
    if value is None:
        return "unknown"
    return f"{value / GIB:.1f} GiB" if abs(value) >= GIB else f"{value / MIB:.0f} MiB"


def estimate_reclaimable(comfy: ComfyObservation) -> int:
    """Bytes a /free could give back: torch's reserved memory from /system_stats (models
    plus allocator cache; the CUDA context is not in it). Without stats, the attributed
    VRAM less a CUDA context. 0 for a CPU device or when nothing is known."""
    stats = comfy.stats
    if stats is not None:
        if stats.device_type == "cpu":  # the vram fields then report system RAM
            return 0
        return max(0, stats.torch_reserved_bytes)
    if comfy.vram_bytes is not None:
        return max(0, comfy.vram_bytes - CUDA_CONTEXT_BYTES)
    return 0


def service_gpus(svc: ComfyObservation | OllamaObservation) -> tuple[str, ...]:
    """GPUs the service uses: where it holds memory, else what Docker granted; () = all."""
    return svc.gpu_uuids or svc.status.spec.gpu_uuids


def shares_gpu(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when two GPU lists overlap; an empty list (unknown) overlaps everything."""
    return not a or not b or bool(set(a) & set(b))


def room_needed(need_bytes: int, gpu: GpuMemory, margin_bytes: int = SAFETY_MARGIN_BYTES) -> int:
    """Bytes that must be freed on `gpu` before a load of `need_bytes` fits with the margin."""
    return max(0, need_bytes + margin_bytes - gpu.free_bytes)


def fits_gpu(size_bytes: int, gpu: GpuMemory, margin_bytes: int = SAFETY_MARGIN_BYTES) -> bool:
    """Could a model of `size_bytes` sit wholly on `gpu` if nothing else were there?"""
    return size_bytes <= gpu.total_bytes - margin_bytes


def is_api_dead(comfy: ComfyObservation) -> bool:
    """Its container runs but its API has not answered for DEAD_API_CHECKS passes."""
    st = comfy.status
    return st.is_running and not st.is_reachable and st.failed_checks >= DEAD_API_CHECKS


def free_blocker(comfy: ComfyObservation, priority: Priority) -> str | None:
    """Why this ComfyUI may not be sent a /free now (None: it may)."""
    st, key = comfy.status, comfy.status.spec.key
    if not st.is_running:
        return f"{key} is not running"
    if not st.is_reachable:
        return f"{key} did not answer ({st.failed_checks} failed checks)"
    if comfy.queue is None:
        return f"the queue of {key} is unknown"
    if comfy.queue.is_busy and priority is not Priority.OLLAMA:
        return (
            f"{key} has work ({comfy.queue.running} running, {comfy.queue.pending} "
            f"pending) and priority {priority.value} frees it only when idle"
        )
    return None


def _restart_guards(
    comfy: ComfyObservation, state: PolicyState, settings: Settings, now: float
) -> list[tuple[bool, str]]:
    """Failed guards as (is_transient, sentence)."""
    st, spec = comfy.status, comfy.status.spec
    failed: list[tuple[bool, str]] = []
    if spec.restart_allowed is False:
        failed.append((False, "restart is not allowed (label vram-supervisor.restart=false)"))
    elif spec.restart_allowed is None and not settings.restart_fallback:
        failed.append(
            (
                False,
                "restart is not allowed (VRAM_RESTART_FALLBACK=false and no "
                "vram-supervisor.restart label)",
            )
        )
    if not spec.is_container:
        failed.append((False, "it is not a container (fixed URL)"))
    if not st.is_running:
        failed.append((False, "its container is not running"))
    last = state.restart_at(spec.key)
    if last is not None and now - last < settings.restart_cooldown_s:
        left = settings.restart_cooldown_s - (now - last)
        failed.append((False, f"restart cooldown, {left:.0f} s left"))
    if is_api_dead(comfy):
        if st.health is ServiceHealth.STARTING:
            failed.append((True, "its container is still starting (health: starting)"))
    elif not st.is_reachable:
        failed.append(
            (True, f"its API did not answer ({st.failed_checks} of {DEAD_API_CHECKS} checks)")
        )
    elif comfy.queue is None:
        failed.append((True, "its queue is unknown, a generation may be running"))
    elif comfy.queue.is_busy:
        failed.append(
            (
                True,
                f"a generation is running or queued ({comfy.queue.running} "
                f"running, {comfy.queue.pending} pending)",
            )
        )
    return failed


def restart_blockers(
    comfy: ComfyObservation, state: PolicyState, settings: Settings, now: float
) -> tuple[str, ...]:
    """Every restart guard this ComfyUI fails now (empty: a restart may go ahead)."""
    return tuple(msg for _, msg in _restart_guards(comfy, state, settings, now))


def _gpu_ok(g: GpuMemory) -> bool:
    return (
        g.total_bytes > 0
        and 0 <= g.used_bytes <= g.total_bytes
        and (0 <= g.free_bytes <= g.total_bytes)
    )


def _model_ok(m: OllamaModel) -> bool:
    return m.size_bytes > 0 and m.size_vram_bytes >= 0


def _expiry_key(m: OllamaModel) -> tuple[float, str]:
    """Soonest expiry first; unknown/unparseable last (it may be in use or pinned)."""
    if m.expires_at:
        try:
            return datetime.fromisoformat(m.expires_at).timestamp(), m.name
        except ValueError:
            pass
    return float("inf"), m.name


# --------------------------------------------------------------------------- one pass


@dataclass
class _Want:
    reason: str
    gpu_uuid: str | None
    dead: bool = False


@dataclass
class _Pass:
    """Scratch state of one decide() call."""

    obs: Observation
    state: PolicyState
    settings: Settings
    now: float
    gpus: list[GpuMemory]
    comfys: dict[str, ComfyObservation]
    ollamas: dict[str, OllamaObservation]
    episodes: dict[str, Episode]
    last_episode_at: float | None
    last_unload_at: float | None
    restart_at: dict[str, float]
    heal_at: dict[str, float]
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    noted: set[str] = field(default_factory=set)
    keep_noted: set[str] = field(default_factory=set)
    claimed: set[str] = field(default_factory=set)  # ComfyUI keys acted on this pass
    healed: set[tuple[str, str]] = field(default_factory=set)
    unloaded: set[tuple[str, str]] = field(default_factory=set)
    heal_gpus: set[str] = field(default_factory=set)
    wants: dict[str, _Want] = field(default_factory=dict)
    new_models: dict[str, list[str]] = field(default_factory=dict)
    wake: list[float] = field(default_factory=list)

    def emit(self, action: Action) -> None:
        if action not in self.actions:
            self.actions.append(action)

    def skip(self, why: str) -> None:
        if why not in self.skipped:
            self.skipped.append(why)

    def note_once(self, key: str, text: str) -> None:
        self.keep_noted.add(key)
        if key not in self.noted:
            self.noted.add(key)
            self.notes.append(text)

    def soon(self, seconds: float = 0.0) -> None:
        self.wake.append(seconds)

    def comfys_on(self, gpu: GpuMemory) -> list[ComfyObservation]:
        return [c for c in self.comfys.values() if shares_gpu(service_gpus(c), (gpu.uuid,))]

    def gpus_of(self, uuids: tuple[str, ...]) -> list[GpuMemory]:
        return [g for g in self.gpus if shares_gpu(uuids, (g.uuid,))]


def _usable_ollama(o: OllamaObservation) -> bool:
    return o.status.is_running and o.status.is_reachable and o.models is not None


def _start(obs: Observation, state: PolicyState, settings: Settings, now: float) -> _Pass:
    gpus: list[GpuMemory] = []
    for g in obs.gpus:
        if _gpu_ok(g) and all(g.uuid != h.uuid for h in gpus):
            gpus.append(g)
    comfys: dict[str, ComfyObservation] = {}
    for c in obs.comfyuis:
        comfys.setdefault(c.status.spec.key, c)
    ollamas: dict[str, OllamaObservation] = {}
    for o in obs.ollamas:
        ollamas.setdefault(o.status.spec.key, o)
    p = _Pass(
        obs,
        state,
        settings,
        now,
        gpus,
        comfys,
        ollamas,
        episodes={e.target: e for e in state.episodes},
        last_episode_at=state.last_episode_at,
        last_unload_at=state.last_unload_at,
        restart_at=dict(state.last_restart_at),
        heal_at=dict(state.last_heal_at),
        noted=set(state.noted),
    )
    if len(gpus) < len(obs.gpus):
        p.skip("ignored GPU reading(s) with impossible figures")
    return p


def _track_models(p: _Pass) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """New models per Ollama, and the next known-model set. An unreadable /api/ps keeps
    what was known (no false "new" later); a stopped Ollama forgets its models."""
    seen = set(p.state.seen_ollamas)
    known: set[tuple[str, str]] = set()
    many = len(p.ollamas) > 1
    for key, o in p.ollamas.items():
        prev = {m for k, m in p.state.known_models if k == key}
        if not o.status.is_running:
            if prev:
                p.soon()  # the model list changed
            continue
        if not _usable_ollama(o) or o.models is None:
            known |= {(key, m) for m in prev}
            continue
        names = list(dict.fromkeys(m.name for m in o.models))
        if p.state.is_initialised and key in seen:
            new = [n for n in names if n not in prev]
            if new:
                p.new_models[key] = new
                where = f" on {key}" if many else ""
                p.notes.append(f"New Ollama model(s) detected: {', '.join(new)}{where}")
            if set(names) != prev:
                p.soon()
        seen.add(key)
        known |= {(key, n) for n in names}
    if p.obs.docker_ok is False:  # discovery failed: absent Ollamas are not gone
        known |= {(k, m) for k, m in p.state.known_models if k not in p.ollamas}
    return frozenset(known), frozenset(seen)


# --------------------------------------------------------------------------- episodes


def _close(p: _Pass, key: str, why: str) -> None:
    p.episodes.pop(key, None)
    p.skip(f"Free episode on {key} closed: {why}")


def _advance_episodes(p: _Pass) -> None:
    for ep in p.state.episodes:
        key = ep.target
        c = p.comfys.get(key)
        if p.now - ep.started_at > EPISODE_STALE_S:
            _close(p, key, f"stale after {p.now - ep.started_at:.0f} s")
        elif c is None:
            if p.obs.docker_ok is not False:
                _close(p, key, "the service is gone")
        elif not c.status.is_running:
            _close(p, key, "its container is not running")
        elif ep.last_result is None:
            pass  # the action is in flight or its outcome was not recorded yet
        elif not c.status.is_reachable:
            if is_api_dead(c):
                why = f"its API has not answered for {c.status.failed_checks} checks"
                _try_restart(p, c, ep, why)
            else:
                p.skip(f"Free episode on {key} waits: {free_blocker(c, p.settings.priority)}")
        elif ep.stage is FreeStage.RESTART:
            _close(p, key, "restarted")
        elif ep.last_result is FreeResult.PENDING:
            if c.queue is None or c.queue.is_busy:
                p.skip(f"Free episode on {key} waits for the running prompt to end")
            else:
                _settle_freed(p, c, ep)
        elif ep.last_result is FreeResult.FREED:
            _settle_freed(p, c, ep)
        elif ep.last_result is FreeResult.PINNED:
            if ep.stage is FreeStage.SOFT:
                _escalate(p, c, ep, "the soft free released nothing", keep_if_blocked=True)
            else:
                _try_restart(p, c, ep, "the hard free released nothing")
        else:
            _close(p, key, "the free failed")


def _episode_gpu(p: _Pass, c: ComfyObservation, ep: Episode) -> GpuMemory | None:
    exact = [g for g in p.gpus if g.uuid == ep.gpu_uuid]
    pool = exact or p.gpus_of(service_gpus(c))
    return max(pool, key=lambda g: g.used_percent, default=None)


def _settle_freed(p: _Pass, c: ComfyObservation, ep: Episode) -> None:
    key = ep.target
    g = _episode_gpu(p, c, ep)
    if g is None:
        _close(p, key, "freed (no GPU reading to judge further)")
        return
    pct, aggressive = g.used_percent, p.settings.aggressive_threshold_percent
    if ep.stage is not FreeStage.SOFT or pct < aggressive:
        _close(p, key, f"freed, GPU {g.index} at {pct:.0f}%")
    elif estimate_reclaimable(c) <= MIN_RECLAIMABLE_BYTES:
        _close(p, key, f"GPU {g.index} still at {pct:.0f}% but {key} holds nothing more")
    else:
        why = f"GPU {g.index} still at {pct:.0f}% (aggressive {aggressive:g}%) after the soft free"
        _escalate(p, c, ep, why, keep_if_blocked=False)


def _escalate(
    p: _Pass, c: ComfyObservation, ep: Episode, why: str, *, keep_if_blocked: bool
) -> None:
    key = ep.target
    blocker = free_blocker(c, p.settings.priority)
    if blocker is not None:
        if keep_if_blocked:
            p.skip(f"Free episode on {key} waits before the hard free: {blocker}")
        else:  # it took the room back for its own work, which the priority allows
            _close(p, key, blocker)
        return
    p.emit(FreeComfy(key, FreeStage.HARD, f"{ep.reason}; {why}", ep.gpu_uuid))
    p.episodes[key] = replace(ep, stage=FreeStage.HARD, last_result=None, last_at=p.now)
    p.claimed.add(key)


def _try_restart(p: _Pass, c: ComfyObservation, ep: Episode | None, why: str) -> bool:
    key = c.status.spec.key
    state = replace(p.state, last_restart_at=tuple(p.restart_at.items()))
    failed = _restart_guards(c, state, p.settings, p.now)
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
            _close(p, key, "restart not possible")
        return False
    reason = f"{ep.reason}; {why}" if ep is not None else why
    p.emit(RestartComfy(key, reason))
    base = ep or Episode(key, FreeStage.RESTART, p.now, reason)
    p.episodes[key] = replace(base, stage=FreeStage.RESTART, last_result=None, last_at=p.now)
    p.restart_at[key] = p.now
    p.claimed.add(key)
    return True


# --------------------------------------------------------------------------- triggers


def _want_free(p: _Pass, c: ComfyObservation, reason: str, gpu_uuid: str | None) -> None:
    key = c.status.spec.key
    if key in p.claimed or key in p.wants or key in p.episodes:
        return
    if is_api_dead(c) and (c.vram_bytes is None or c.vram_bytes > MIN_RECLAIMABLE_BYTES):
        p.wants[key] = _Want(reason, gpu_uuid, dead=True)
        return
    blocker = free_blocker(c, p.settings.priority)
    if blocker is not None:
        p.skip(f"Not freeing {key} ({reason}): {blocker}")
        return
    held = estimate_reclaimable(c)
    if held <= MIN_RECLAIMABLE_BYTES:
        p.skip(f"Not freeing {key} ({reason}): it holds only {_size(held)} a free could return")
        return
    p.wants[key] = _Want(reason, gpu_uuid)


def _heal_or_wait(p: _Pass, o: OllamaObservation, m: OllamaModel) -> None:
    okey = o.status.spec.key
    hkey = f"{okey}|{m.name}"
    gpus = p.gpus_of(service_gpus(o))
    if not gpus:
        p.skip(f"Ollama model {m.name} spilled to the CPU but no GPU reading says where")
        return
    fitting = [g for g in gpus if fits_gpu(m.size_bytes, g)]
    if not fitting:
        biggest = max(g.total_bytes for g in gpus)
        p.note_once(
            f"nofit|{hkey}",
            f"Ollama model {m.name} ({_size(m.size_bytes)}) cannot "
            f"fit on the GPU ({_size(biggest)} less a {_size(SAFETY_MARGIN_BYTES)} "
            "margin); it is not healed",
        )
        return
    prio = p.settings.priority

    def idle_held(g: GpuMemory) -> list[ComfyObservation]:
        return [
            c
            for c in p.comfys_on(g)
            if free_blocker(c, Priority.BALANCED) is None
            and c.status.spec.key not in p.claimed
            and estimate_reclaimable(c) > MIN_RECLAIMABLE_BYTES
        ]

    g = max(fitting, key=lambda g: g.free_bytes + sum(map(estimate_reclaimable, idle_held(g))))
    reason = f"Ollama model {m.name} spilled to the CPU ({m.gpu_fraction:.0%} on GPU {g.index})"
    on_g = p.comfys_on(g)

    def free_for_room(why: str) -> None:
        p.skip(f"Not healing {m.name}: {why}")
        for c in on_g:
            _want_free(p, c, reason, g.uuid)

    if not p.settings.heal:
        free_for_room("healing is off (VRAM_HEAL=false)")
        return
    last = p.heal_at.get(hkey)
    if last is not None and p.now - last < p.settings.heal_cooldown_s:
        left = p.settings.heal_cooldown_s - (p.now - last)
        free_for_room(f"heal cooldown, {left:.0f} s left")
        p.soon(left)
        return
    if g.uuid in p.heal_gpus:
        p.skip(f"Not healing {m.name} yet: another heal on GPU {g.index} goes first")
        p.soon()
        return
    open_eps = sorted(c.status.spec.key for c in on_g if c.status.spec.key in p.episodes)
    if open_eps:
        p.skip(f"Not healing {m.name} yet: waiting for the free of {', '.join(open_eps)}")
        p.soon()
        return
    idle = idle_held(g)
    room = g.free_bytes + m.size_vram_bytes + sum(map(estimate_reclaimable, idle))
    need = m.size_bytes + SAFETY_MARGIN_BYTES
    if room < need:
        busy = [
            c
            for c in on_g
            if c.status.is_running
            and c.status.is_reachable
            and c.queue is not None
            and c.queue.is_busy
        ]
        if busy:
            names = ", ".join(c.status.spec.key for c in busy)
            p.skip(f"Not healing {m.name} yet: {names} has work (priority {prio.value})")
            p.soon()
            for c in busy:
                _want_free(p, c, reason, g.uuid)
        else:
            p.skip(f"Not healing {m.name}: {_size(room)} could be made free, {_size(need)} needed")
        return
    free_first = tuple(c.status.spec.key for c in idle)
    p.emit(HealOllama(okey, m.name, reason, free_first, m.gpu_fraction))
    p.claimed.update(free_first)
    p.healed.add((okey, m.name))
    p.heal_gpus.add(g.uuid)
    p.heal_at[hkey] = p.now
    if free_first:  # the heal's free is a free episode for the rate limit
        p.last_episode_at = p.now


def _spilled(p: _Pass) -> None:
    for o in p.ollamas.values():
        if not _usable_ollama(o) or o.models is None:
            continue
        for m in o.models:
            if _model_ok(m) and m.is_spilled:
                _heal_or_wait(p, o, m)


def _new_models(p: _Pass) -> None:
    for okey, names in p.new_models.items():
        o = p.ollamas[okey]
        reason = f"new Ollama model(s) {', '.join(names)}"
        for c in p.comfys.values():
            if not shares_gpu(service_gpus(c), service_gpus(o)):
                continue
            shared = [
                g for g in p.gpus_of(service_gpus(c)) if shares_gpu(service_gpus(o), (g.uuid,))
            ]
            g = max(shared, key=lambda g: g.used_percent, default=None)
            _want_free(p, c, reason, g.uuid if g else None)


def _over_threshold(p: _Pass) -> None:
    for g in p.gpus:
        if g.used_percent >= p.settings.threshold_percent:
            reason = (
                f"GPU {g.index} at {g.used_percent:.0f}% "
                f"(threshold {p.settings.threshold_percent:g}%)"
            )
            for c in p.comfys_on(g):
                _want_free(p, c, reason, g.uuid)


def _unload_for_comfy(p: _Pass) -> None:
    s = p.settings
    for g in p.gpus:
        if g.used_percent < s.threshold_percent:
            continue
        busy = [
            c
            for c in p.comfys_on(g)
            if c.status.is_running
            and c.status.is_reachable
            and c.queue is not None
            and c.queue.is_busy
        ]
        if not busy:
            continue
        cands = [
            (o.status.spec.key, m)
            for o in p.ollamas.values()
            if _usable_ollama(o) and shares_gpu(service_gpus(o), (g.uuid,))
            for m in o.models or ()
            if _model_ok(m) and m.size_vram_bytes > 0
        ]
        cands = [(k, m) for k, m in cands if (k, m.name) not in p.healed]
        if not cands:
            continue
        names = ", ".join(c.status.spec.key for c in busy)
        situation = f"{names} has work and GPU {g.index} is at {g.used_percent:.0f}%"
        if s.priority is Priority.OLLAMA:
            p.skip(
                f"Not unloading Ollama models: {situation}, but priority ollama never "
                "unloads them for ComfyUI"
            )
            continue
        last = p.state.last_unload_at
        if last is not None and p.now - last < s.min_free_interval_s:
            left = s.min_free_interval_s - (p.now - last)
            p.skip(f"Not unloading Ollama models yet ({situation}): rate limit, {left:.0f} s left")
            p.soon(left)
            continue
        target = g.total_bytes * s.threshold_percent / 100.0
        estimate = g.used_bytes
        for okey, m in sorted(cands, key=lambda km: _expiry_key(km[1])):
            if estimate < target:
                break
            if (okey, m.name) not in p.unloaded:
                p.unloaded.add((okey, m.name))
                p.emit(
                    UnloadOllama(okey, m.name, f"{situation} (threshold {s.threshold_percent:g}%)")
                )
                p.last_unload_at = p.now
            estimate -= m.size_vram_bytes


def _open_episodes(p: _Pass) -> None:
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
            if not _try_restart(p, c, None, f"{want.reason}; {why}"):
                continue
        else:
            p.emit(FreeComfy(key, FreeStage.SOFT, want.reason, want.gpu_uuid))
            p.episodes[key] = Episode(
                key, FreeStage.SOFT, p.now, want.reason, want.gpu_uuid, last_at=p.now
            )
            p.claimed.add(key)
        p.last_episode_at = p.now


# --------------------------------------------------------------------------- public


def decide(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Decision:
    """One pass: the actions to take now, the next state, notes and the next wake-up."""
    p = _start(obs, state, settings, now)
    known, seen = _track_models(p)
    _advance_episodes(p)
    _spilled(p)
    _new_models(p)
    _over_threshold(p)
    _unload_for_comfy(p)
    _open_episodes(p)

    # Keep "said once" notes only while their condition holds.
    for key in p.noted - p.keep_noted:
        if key.startswith("dead|") and key[5:] in p.comfys and not is_api_dead(p.comfys[key[5:]]):
            p.noted.discard(key)
        elif key.startswith("nofit|"):
            okey = key.split("|")[1]
            if okey not in p.ollamas or _usable_ollama(p.ollamas[okey]):
                p.noted.discard(key)

    if p.episodes or p.new_models:
        p.soon()
    if any(
        c.status.is_running and c.status.is_reachable and c.queue is not None and c.queue.is_busy
        for c in p.comfys.values()
    ):
        p.soon()
    fast = min(settings.check_interval_s, FAST_WAKE_S)
    wake = settings.check_interval_s
    for seconds in p.wake:
        wake = min(wake, max(seconds, fast))

    restart_at = {k: t for k, t in p.restart_at.items() if now - t < settings.restart_cooldown_s}
    heal_at = {k: t for k, t in p.heal_at.items() if now - t < settings.heal_cooldown_s}
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
    )
    return Decision(tuple(p.actions), next_state, tuple(p.notes), wake, tuple(p.skipped))


def record(state: PolicyState, outcome: Outcome, now: float) -> PolicyState:
    """Fold one action's measured outcome into the state (see the module doc for stages).

    A free the policy did not start (the gate's) opens an episode and counts for the rate
    limit, so it can escalate and is not repeated at once. `now` drops stale episodes."""
    action, at = outcome.action, outcome.at
    episodes = {e.target: e for e in state.episodes if now - e.started_at <= EPISODE_STALE_S}
    last_episode_at, last_unload_at = state.last_episode_at, state.last_unload_at
    restarts, heals = dict(state.last_restart_at), dict(state.last_heal_at)
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
    elif isinstance(action, UnloadOllama):
        last_unload_at = max(at, last_unload_at if last_unload_at is not None else at)
    else:
        key = f"{action.target}|{action.model}"
        heals[key] = max(at, heals.get(key, at))
    return replace(
        state,
        episodes=tuple(episodes.values()),
        last_episode_at=last_episode_at,
        last_unload_at=last_unload_at,
        last_restart_at=tuple(sorted(restarts.items())),
        last_heal_at=tuple(sorted(heals.items())),
    )
