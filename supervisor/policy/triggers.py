"""Triggers 1, 2 and 4: new Ollama models, a GPU over the threshold, a busy ComfyUI (pure).

Evaluated per GPU (a service with no GPU list shares every GPU):
1. New model(s) in an Ollama's /api/ps since its previous read (an Ollama's first read is a
   baseline, so nothing is "new" on the first pass) -> note "New Ollama model(s)
   detected: ..." and free (soft) each ComfyUI sharing a GPU with that Ollama.
2. A GPU at or above VRAM_THRESHOLD -> free (soft) the ComfyUIs on it.
4. A ComfyUI with work on a GPU at or above the threshold while Ollama models hold VRAM
   there -> unload Ollama models, soonest `expires_at` first (the least recently used when
   keep_alive is uniform), until the estimate is below the threshold. Ollama has no busy
   flag, and it defers an unload until in-flight requests finish: a model still listed
   after its `expires_at` (judged with `Observation.wall_at`) is in a long request, so it
   goes last, after unknown expiries and keep_alive forever (about year 2318); it is
   unloaded only when nothing else frees enough. At most one unload round
   per VRAM_MIN_FREE_INTERVAL (`last_unload_at`). Never under priority `ollama`.

(Trigger 3, spilled models, is `heal.py`.) Frees go through `episodes.want_free`.
"""

from __future__ import annotations

from supervisor.model import Priority, UnloadOllama
from supervisor.policy.episodes import want_free
from supervisor.policy.guards import (
    expiry_key,
    has_work,
    model_ok,
    seems_busy,
    service_gpus,
    shares_gpu,
)
from supervisor.policy.scratch import Pass, usable_ollama


def track_models(p: Pass) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
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
        if not usable_ollama(o) or o.models is None:
            known |= {(key, m) for m in prev}
            continue
        names = list(dict.fromkeys(m.name for m in o.models))
        if p.state.is_initialised and key in seen:
            new = [n for n in names if n not in prev]
            if new:
                p.new_models[key] = new
                # A new load of a model healed before (it left /api/ps and a client loaded
                # it again): the heal cooldown was for the earlier load. Ollama >= 0.30
                # spills a further model often, so each load may need its heal; heals that
                # did not help still back off (heal.py).
                for name in new:
                    p.heal_at.pop(f"{key}|{name}", None)
                where = f" on {key}" if many else ""
                p.notes.append(f"New Ollama model(s) detected: {', '.join(new)}{where}")
            if set(names) != prev:
                p.soon()
        seen.add(key)
        known |= {(key, n) for n in names}
    if p.obs.docker_ok is False:  # discovery failed: absent Ollamas are not gone
        known |= {(k, m) for k, m in p.state.known_models if k not in p.ollamas}
    # A model whose heal waits for its unload leaves /api/ps only to be reloaded by the
    # heal: its return is not a new model (no free for it, no "detected" note).
    for w in p.state.heal_waits:
        waiting_on = p.ollamas.get(w.target)
        if waiting_on is not None and waiting_on.status.is_running:
            known.add((w.target, w.model))
    return frozenset(known), frozenset(seen)


def free_for_new_models(p: Pass) -> None:
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
            want_free(p, c, reason, g.uuid if g else None)


def free_over_threshold(p: Pass) -> None:
    for g in p.gpus:
        if g.used_percent >= p.settings.threshold_percent:
            reason = (
                f"GPU {g.index} at {g.used_percent:.0f}% "
                f"(threshold {p.settings.threshold_percent:g}%)"
            )
            for c in p.comfys_on(g):
                want_free(p, c, reason, g.uuid)


def unload_for_comfy(p: Pass) -> None:
    s = p.settings
    for g in p.gpus:
        if g.used_percent < s.threshold_percent:
            continue
        busy = [c for c in p.comfys_on(g) if has_work(c)]
        if not busy:
            continue
        cands = [
            (o.status.spec.key, m)
            for o in p.ollamas.values()
            if usable_ollama(o) and shares_gpu(service_gpus(o), (g.uuid,))
            for m in o.models or ()
            if model_ok(m) and m.size_vram_bytes > 0
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
        wall = p.obs.wall_at
        for okey, m in sorted(cands, key=lambda km: expiry_key(km[1], wall)):
            if estimate < target:
                break
            if (okey, m.name) not in p.unloaded:
                p.unloaded.add((okey, m.name))
                why = f"{situation} (threshold {s.threshold_percent:g}%)"
                if seems_busy(m, wall):
                    why += "; it seems in use (expires_at passed), nothing else frees enough"
                p.emit(UnloadOllama(okey, m.name, why))
                p.last_unload_at = p.now
            estimate -= m.size_vram_bytes
