"""Trigger 3: Ollama models that spilled to the CPU (size_vram < size) (pure).

A model that could not fit the GPU anyway is noted once and left alone. Otherwise, with
VRAM_HEAL, its cooldown passed, no free episode open on that GPU and room that can be made
(GPU free + the model's own VRAM + what idle ComfyUIs could give back + what Ollama
evicts of its other models itself for the reload, by its generation's rule
(`model.evictable_bytes`: all of them before 0.30) >= size + SAFETY_MARGIN_BYTES + the fit
target of an Ollama >= 0.30), it is healed: HealOllama frees
those idle ComfyUIs itself (one heal per GPU per pass) and names the GPU it should land on
(`gpu_uuid`: the Ollama's GPU, the only GPU, or the GPU of the ComfyUIs it frees; None when
unknown, as with the API source).
While the heal must wait (healing off, cooldown, a busy ComfyUI) its ComfyUIs are freed
so the room exists for the heal or the next load. When even freeing everything cannot make
the room, nothing is done.

Back-off: a heal that left the model spilled (its outcome's `after_fraction` below 100 %,
or none) is a strike in `Backoff` "heal|<Ollama key>|<model>" (`record()` counts them; a
heal that reached 100 % or the model no longer spilled clears it). After n strikes the
next heal waits VRAM_HEAL_COOLDOWN x 2^n (at most x HEAL_BACKOFF_MAX) and its ComfyUIs are
not freed for it meanwhile, unless the room that could be made (GPU free + the model's VRAM
+ what idle ComfyUIs could give back) grew by more than HEAL_ROOM_GROWTH_BYTES since the
last heal: then only the plain cooldown applies.

A busy model: when a request kept the model loaded past VRAM_VERIFY_TIMEOUT, the heal's
keep_alive 0 unload stays armed in Ollama (it happens when the request ends) and
`record()` keeps a `HealWait`. `follow_heal_waits` carries it on, one reading per pass:
the model left /api/ps -> reload it (HealOllama `reload_only`, with the keep-alive the
heal saved; only ComfyUIs that took memory back are freed again); listed whole on the
GPU -> a request loaded it first, healed; listed with another split -> a request loaded
it again first, spilled: healed afresh as a new load; still listed after HEAL_WAIT_FACTOR x
VRAM_VERIFY_TIMEOUT (HEAL_WAIT_SEVERE_FACTOR x for a model that was under
HEAL_SEVERE_FRACTION on the GPU: its requests pile up at CPU speed, and the unload is
better kept armed until they pause) -> withdraw the unload (`withdraw`) and back off as
for a failed heal.
No other heal or unload of that model runs meanwhile.
"""

from __future__ import annotations

from supervisor.model import (
    Backoff,
    ComfyObservation,
    GpuMemory,
    HealOllama,
    HealWait,
    OllamaModel,
    OllamaObservation,
    Resident,
    VramSource,
    evictable_bytes,
)
from supervisor.policy.episodes import pinned_hold, want_free
from supervisor.policy.guards import (
    MIN_RECLAIMABLE_BYTES,
    SAFETY_MARGIN_BYTES,
    estimate_reclaimable,
    fits_gpu,
    free_blocker,
    has_work,
    model_ok,
    service_gpus,
)
from supervisor.policy.scratch import Pass, usable_ollama
from supervisor.units import GIB, format_bytes

# A heal that left the model spilled doubles the wait for the next one, up to this factor.
HEAL_BACKOFF_MAX = 8
# ... unless this much more room could be made than at the last heal.
HEAL_ROOM_GROWTH_BYTES = GIB
# A heal waits for a busy model's request at most this many VRAM_VERIFY_TIMEOUTs ...
HEAL_WAIT_FACTOR = 10
# ... or this many when the model was severely spilled: under HEAL_SEVERE_FRACTION on the
# GPU. Each token then costs its GPU share plus its CPU share times the CPU's slowdown (many
# times the GPU's), so such a model serves at a fraction of its speed and its requests pile
# up; the armed unload takes effect between two of them (api-facts 1.6: Ollama unloads it
# once no request is in flight, and a request without keep_alive leaves it armed), so it
# is kept armed rather than withdrawn, which would leave the model slow until its
# keep-alive ends.
HEAL_WAIT_SEVERE_FACTOR = 60
HEAL_SEVERE_FRACTION = 0.9
# A listed model whose GPU share moved by more than this was loaded again.
SPLIT_CHANGED = 0.005


def heal_wait_bound_s(before_fraction: float, verify_timeout_s: float) -> float:
    """How long a heal keeps its unload of a busy model armed before it withdraws it."""
    severe = before_fraction < HEAL_SEVERE_FRACTION
    return (HEAL_WAIT_SEVERE_FACTOR if severe else HEAL_WAIT_FACTOR) * verify_timeout_s


def _landing_gpu(
    p: Pass, o: OllamaObservation, g: GpuMemory, free_first: list[ComfyObservation]
) -> str | None:
    """The GPU the healed model should land on, when the readings say: where the Ollama
    holds memory or was granted, the only GPU read, or where its ComfyUIs are freed. None
    with the API source (its one GPU is a stand-in) or when the Ollama may use any GPU."""
    if p.obs.source is VramSource.API:
        return None
    if service_gpus(o) or len(p.gpus) == 1:
        return g.uuid
    if any(g.uuid in service_gpus(c) for c in free_first):
        return g.uuid
    return None


def _idle_held(p: Pass, g: GpuMemory) -> list[ComfyObservation]:
    """The idle ComfyUIs on `g` that hold memory a free would give back."""
    return [
        c
        for c in p.comfys_on(g)
        if free_blocker(c) is None
        and c.status.spec.key not in p.claimed
        and estimate_reclaimable(c) > MIN_RECLAIMABLE_BYTES
        and pinned_hold(p, c) is None  # its memory did not come back last time
    ]


def _heal_or_wait(p: Pass, o: OllamaObservation, m: OllamaModel) -> None:
    okey = o.status.spec.key
    hkey = f"{okey}|{m.name}"
    gpus = p.gpus_of(service_gpus(o))
    if not gpus:
        p.skip(f"Ollama model {m.name} spilled to the CPU but no GPU reading says where")
        return
    # llama-server (Ollama >= 0.30) keeps its fit target free: part of every margin.
    margin = SAFETY_MARGIN_BYTES + o.fit_target_bytes
    fitting = [g for g in gpus if fits_gpu(m.size_bytes, g, margin)]
    if not fitting:
        biggest = max(g.total_bytes for g in gpus)
        p.note_once(
            f"nofit|{hkey}",
            f"Ollama model {m.name} ({format_bytes(m.size_bytes)}) cannot "
            f"fit on the GPU ({format_bytes(biggest)} less a {format_bytes(margin)} "
            "margin); it is not healed",
        )
        return

    g = max(fitting, key=lambda g: g.free_bytes + sum(map(estimate_reclaimable, _idle_held(p, g))))
    reason = f"Ollama model {m.name} spilled to the CPU ({m.gpu_fraction:.0%} on GPU {g.index})"
    on_g = p.comfys_on(g)

    def free_for_room(why: str) -> None:
        p.skip(f"Not healing {m.name}: {why}")
        for c in on_g:
            want_free(p, c, reason, g.uuid)

    if not p.settings.heal:
        free_for_room("healing is off (VRAM_HEAL=false)")
        return
    idle = _idle_held(p, g)
    room = g.free_bytes + m.size_vram_bytes + sum(map(estimate_reclaimable, idle))
    # Ollama's other models that its own rule evicts for the reload (as the gate counts
    # them): before 0.30 a model that does not fit beside them makes Ollama unload them.
    others = [
        Resident(x.name, x.size_vram_bytes)
        for x in o.models or ()
        if x.name != m.name and model_ok(x) and x.size_vram_bytes > 0
    ]
    room += evictable_bytes(o.is_llama_server, m.size_bytes, room, others)
    cooldown = p.settings.heal_cooldown_s
    last = p.heal_at.get(hkey)
    bo = p.backoffs.get(f"heal|{hkey}")
    if bo is not None and bo.strikes:  # heals that left it spilled: wait longer
        last = bo.at if last is None else max(last, bo.at)
        wait = cooldown * min(2**bo.strikes, HEAL_BACKOFF_MAX)
        grown = room - bo.bytes_then > HEAL_ROOM_GROWTH_BYTES
        if not grown and p.now - last < wait:
            left = wait - (p.now - last)
            p.skip(
                f"Not healing {m.name}: {bo.strikes} heal(s) in a row left it spilled; "
                f"backing off {wait:.0f} s ({left:.0f} s left) unless more than "
                f"{format_bytes(HEAL_ROOM_GROWTH_BYTES)} above the "
                f"{format_bytes(bo.bytes_then)} of room then can be made"
            )
            p.soon(left)
            return
    if last is not None and p.now - last < cooldown:
        left = cooldown - (p.now - last)
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
    need = m.size_bytes + margin
    if room < need:
        busy = [c for c in on_g if has_work(c)]
        if busy:
            names = ", ".join(c.status.spec.key for c in busy)
            prio = p.settings.priority
            p.skip(f"Not healing {m.name} yet: {names} has work (priority {prio})")
            p.soon()
            for c in busy:
                want_free(p, c, reason, g.uuid)
        else:
            p.skip(
                f"Not healing {m.name}: {format_bytes(room)} could be made free, "
                f"{format_bytes(need)} needed"
            )
        return
    free_first = tuple(c.status.spec.key for c in idle)
    landing = _landing_gpu(p, o, g, idle)
    p.emit(HealOllama(okey, m.name, reason, free_first, m.gpu_fraction, landing))
    p.claimed.update(free_first)
    p.healed.add((okey, m.name))
    p.heal_gpus.add(g.uuid)
    p.heal_at[hkey] = p.now
    bkey = f"heal|{hkey}"
    strikes = bo.strikes if bo is not None else 0
    p.backoffs[bkey] = Backoff(bkey, p.now, room, strikes)  # record() judges the outcome
    if free_first:  # the heal's free is a free episode for the rate limit
        p.last_episode_at = p.now


def _continue(p: Pass, w: HealWait, reason: str, *, withdraw: bool = False) -> None:
    """Emit the second half of a waiting heal: the reload (or the withdrawal)."""
    free_first: tuple[str, ...] = ()
    if not withdraw:  # re-free only the ComfyUIs that took memory back meanwhile
        gpus = [g for g in p.gpus if w.gpu_uuid in (None, g.uuid)]
        took = {c.status.spec.key for g in gpus for c in _idle_held(p, g)}
        free_first = tuple(k for k in w.free_first if k in took)
    p.emit(
        HealOllama(
            w.target,
            w.model,
            reason,
            free_first,
            w.before_fraction,
            w.gpu_uuid,
            reload_only=True,
            withdraw=withdraw,
            keep_alive=w.keep_alive,
        )
    )
    p.claimed.update(free_first)
    p.healed.add((w.target, w.model))
    if w.gpu_uuid is not None:
        p.heal_gpus.add(w.gpu_uuid)
    p.heal_at[w.key] = p.now
    del p.heal_waits[w.key]  # record() judges the outcome


def follow_heal_waits(p: Pass) -> None:
    """Carry on the heals whose unload waits for a request to end (`HealWait`).

    Once the model has left /api/ps it is reloaded (HealOllama with `reload_only`). If it
    is listed whole on the GPU, a request loaded it again first and it is healed. If it is
    still listed spilled past `heal_wait_bound_s`, the unload is
    withdrawn (the model stays as it was) and the heal counts as one that did not help."""
    for w in list(p.heal_waits.values()):
        o = p.ollamas.get(w.target)
        if o is None or not o.status.is_running:
            if o is None and p.obs.docker_ok is False:
                continue  # Docker failed: keep what is known
            del p.heal_waits[w.key]  # the Ollama is gone, its unload with it
            continue
        p.healed.add((w.target, w.model))  # no other heal or unload of it meanwhile
        if not usable_ollama(o) or o.models is None:
            p.soon()
            continue
        m = next((m for m in o.models if m.name == w.model), None)
        if m is None:
            _continue(p, w, f"Ollama model {w.model} left the GPU after its request ended")
        elif not m.is_spilled:
            p.notes.append(
                f"Ollama model {w.model} was loaded again by a request before the heal "
                f"reloaded it: {m.gpu_fraction:.0%} on GPU"
            )
            p.backoffs.pop(f"heal|{w.key}", None)  # healed: the plain cooldown again
            del p.heal_waits[w.key]
        elif w.before_fraction > 0 and abs(m.gpu_fraction - w.before_fraction) > SPLIT_CHANGED:
            # The split is fixed until a reload (api-facts-2026 1): a request loaded it
            # again between two passes, spilled again. The armed unload went with the
            # old runner; this load is healed afresh (a new load, as in track_models).
            p.notes.append(
                f"Ollama model {w.model} was loaded again by a request before the heal "
                f"reloaded it, again spilled: {m.gpu_fraction:.0%} on GPU"
            )
            del p.heal_waits[w.key]
            p.heal_at.pop(w.key, None)
            p.healed.discard((w.target, w.model))
        elif p.now - w.since >= heal_wait_bound_s(w.before_fraction, p.settings.verify_timeout_s):
            _continue(
                p,
                w,
                f"Ollama model {w.model} is still in use {p.now - w.since:.0f} s after "
                "the heal's unload",
                withdraw=True,
            )
        else:
            p.skip(
                f"Heal of {w.model} waits for its request to end "
                f"({p.now - w.since:.0f} s; the unload is armed)"
            )
            p.soon()


def heal_spilled(p: Pass) -> None:
    for o in p.ollamas.values():
        if not usable_ollama(o) or o.models is None:
            continue
        for m in o.models:
            if model_ok(m) and m.is_spilled and (o.status.spec.key, m.name) not in p.healed:
                _heal_or_wait(p, o, m)
