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
   per VRAM_MIN_FREE_INTERVAL (`last_unload_at`). Never under priority `ollama`, nor
   without a serving Ollama gate (`Observation.ollama_gated`, not VRAM_GATE_PORT alone)
   for ComfyUIs under Dynamic VRAM that do not rank above the Ollama
   (`pages_rather_than_spill`: their jobs page instead, while a reload during the job
   would spill).

Model servers of the other registry kinds (llama-server, llama-swap ...; `p.servers`) take
part in triggers 1 and 4 as Ollama does: a model that appears in their list (loading or
loaded) frees the idle ComfyUIs sharing its GPU, and their idle models are unloaded for a
ComfyUI with work (`UnloadModel`), after Ollama's, one per round when what a model holds
is not known (the actor re-reads that it serves no request before unloading it).
VRAM_PRIORITY decides per pair: a model server's models are never unloaded for a ComfyUI
it ranks above (`Settings.outranks`).

(Trigger 3, spilled models, is `heal.py`.) Frees go through `episodes.want_free`.
"""

from __future__ import annotations

from supervisor.config import Settings
from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    FreeJobs,
    JobServerObservation,
    ModelServerObservation,
    OllamaObservation,
    ReloadJobs,
    ServedModel,
    ServiceSpec,
    UnloadModel,
    UnloadOllama,
    WakeModel,
)
from supervisor.policy.episodes import want_free
from supervisor.policy.guards import (
    MIN_RECLAIMABLE_BYTES,
    expiry_key,
    has_work,
    model_ok,
    seems_busy,
    service_gpus,
    shares_gpu,
)
from supervisor.policy.scratch import Pass, usable_ollama
from supervisor.units import format_bytes

# How soon to look again while a sleeping model waits for its room.
ROOM_RECHECK_S = 2.0


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
        known |= {
            (k, m) for k, m in p.state.known_models if k not in p.ollamas and k not in p.servers
        }
    _track_servers(p, known, seen)
    # A model whose heal waits for its unload leaves /api/ps only to be reloaded by the
    # heal: its return is not a new model (no free for it, no "detected" note).
    for w in p.state.heal_waits:
        waiting_on = p.ollamas.get(w.target)
        if waiting_on is not None and waiting_on.status.is_running:
            known.add((w.target, w.model))
    return frozenset(known), frozenset(seen)


def _track_servers(p: Pass, known: set[tuple[str, str]], seen: set[str]) -> None:
    """`track_models` for the model servers of the other kinds: a model listed as loading
    or loaded that was not before is new (their first read is a baseline)."""
    for key, m in p.servers.items():
        prev = {name for k, name in p.state.known_models if k == key}
        if not m.status.is_running:
            if prev:
                p.soon()
            continue
        if m.state is None or not m.status.is_reachable:
            known |= {(key, name) for name in prev}
            continue
        names = list(dict.fromkeys(x.name for x in m.models if x.is_resident))
        if p.state.is_initialised and key in seen:
            new = [n for n in names if n not in prev]
            if new:
                p.new_models[key] = new
                p.notes.append(f"New {m.title} model(s) detected: {', '.join(new)} on {key}")
            if set(names) != prev:
                p.soon()
        seen.add(key)
        known |= {(key, n) for n in names}


def note_server_spills(p: Pass) -> None:
    """A model of another kind's server that runs partly on the CPU (NVML against its
    size, `ModelServerObservation.spilled`) is said once, with why it is not healed: the
    placement is fixed when the model loads, and these servers load on a client's request
    (a reload by the supervisor would cut requests off or race the client's next load).
    The frees that make room before loads (triggers 1, 2 and the gate) are what prevents
    it."""
    for key, m in p.servers.items():
        found = m.spilled
        if found is None:
            continue
        model, share = found
        size = format_bytes(model.size_bytes)
        p.note_once(
            f"spill|{key}|{model.name}",
            f"{m.title} model {model.name} on {key} runs partly on the CPU: its processes "
            f"hold {share:.0%} of its {size} of weights on the GPU (NVML); it stays so until "
            "it is loaded again. Not healed (its server reloads on a client's request); "
            "the gate in front of it (VRAM_MODEL_GATES) makes room before its next load",
        )


def free_for_new_models(p: Pass) -> None:
    for okey, names in p.new_models.items():
        o: OllamaObservation | ModelServerObservation
        if okey in p.ollamas:
            o = p.ollamas[okey]
            reason = f"new Ollama model(s) {', '.join(names)}"
        else:
            o = p.servers[okey]
            reason = f"new {o.title} model(s) {', '.join(names)} on {okey}"
        for c in p.comfys.values():
            if not shares_gpu(service_gpus(c), service_gpus(o)):
                continue
            shared = [
                g for g in p.gpus_of(service_gpus(c)) if shares_gpu(service_gpus(o), (g.uuid,))
            ]
            g = max(shared, key=lambda g: g.used_percent, default=None)
            want_free(p, c, reason, g.uuid if g else None)
        for j in p.jobs.values():
            if shares_gpu(service_gpus(j), service_gpus(o)):
                want_free_jobs(p, j, reason)


def free_over_threshold(p: Pass) -> None:
    for g in p.gpus:
        if g.used_percent >= p.settings.threshold_percent:
            reason = (
                f"GPU {g.index} at {g.used_percent:.0f}% "
                f"(threshold {p.settings.threshold_percent:g}%)"
            )
            for c in p.comfys_on(g):
                want_free(p, c, reason, g.uuid)
            for j in p.jobs_on(g):
                want_free_jobs(p, j, reason, g.uuid)


def want_free_jobs(p: Pass, j: JobServerObservation, reason: str, gpu: str | None = None) -> None:
    """Free an idle job server of the other kinds: only while it is known to be idle (its
    frees do not wait for a running job), when it can be freed, holds more than a free
    would be worth (when known), and at most once per VRAM_MIN_FREE_INTERVAL each."""
    key, st = j.status.spec.key, j.state
    if not (j.status.is_running and j.status.is_reachable) or st is None:
        return
    if not st.can_free:
        p.skip(f"Not freeing {key} ({reason}): {j.title} has no free call")
        return
    if st.busy is not False:
        what = "has work" if st.busy else "may have work (its queue is unknown)"
        p.skip(f"Not freeing {key} ({reason}): it {what}; it is freed only when idle")
        return
    if j.vram_bytes is not None and j.vram_bytes < MIN_RECLAIMABLE_BYTES:
        return
    last = p.job_free_at.get(key)
    if last is not None and p.now - last < p.settings.min_free_interval_s:
        left = p.settings.min_free_interval_s - (p.now - last)
        p.skip(f"Not freeing {key} yet ({reason}): rate limit, {left:.0f} s left")
        p.soon(left)
        return
    p.job_free_at[key] = p.now
    p.emit(FreeJobs(key, reason, gpu))


def reload_parked(p: Pass) -> None:
    """Put back the weights a free parked in CPU RAM of a job server whose next job would
    not (`JobState.parked_bytes`, A1111), so that its next job is fast: only while it is
    known idle, not in a pass that frees it or sees a new model, once every GPU it uses has
    room for them under VRAM_THRESHOLD, and at most one free or reload of it per
    VRAM_MIN_FREE_INTERVAL."""
    s = p.settings
    freeing = {a.target for a in p.actions if isinstance(a, FreeJobs)}
    for key, j in p.jobs.items():
        st = j.state
        if st is None or st.parked_bytes is None or key in freeing:
            continue
        if not (j.status.is_running and j.status.is_reachable) or st.busy is not False:
            continue
        gpus = p.gpus_of(service_gpus(j))
        if not gpus or p.new_models:
            continue
        what = f"{key} ({j.title}: its weights wait in CPU RAM since a free)"
        full = [
            g
            for g in gpus
            if g.used_bytes + st.parked_bytes > g.total_bytes * s.threshold_percent / 100.0
        ]
        if full:
            g = full[0]
            p.skip(
                f"Not reloading {what} yet: GPU {g.index} has no room for "
                f"{format_bytes(st.parked_bytes)} under the threshold ({s.threshold_percent:g}%)"
            )
            continue
        last = p.job_free_at.get(key)
        if last is not None and p.now - last < s.min_free_interval_s:
            left = s.min_free_interval_s - (p.now - last)
            p.skip(f"Not reloading {what} yet: rate limit, {left:.0f} s left")
            p.soon(left)
            continue
        p.job_free_at[key] = p.now
        p.emit(ReloadJobs(key, f"GPU has room again for its {format_bytes(st.parked_bytes)}"))


def wake_sleeping(p: Pass) -> None:
    """A sleeping model that requests wait for (vLLM queues them until woken, and never
    wakes by itself): free the idle job servers on its GPUs, then wake it (`WakeModel`)
    once its GPUs have as much free as its sleep gave back (when this supervisor put it
    to sleep and measured that): a wake without room fails inside the server (a CUDA
    out-of-memory error that may end it), while its queued requests can wait."""
    for key, m in p.servers.items():
        st = m.state
        if st is None or not st.can_wake or not st.waiting or not m.status.is_reachable:
            continue
        for x in m.models:
            if x.state != "sleeping" or (key, x.name) in p.unloaded:
                continue
            reason = f"{st.waiting} request(s) wait for sleeping model {x.name} on {key}"
            for c in p.comfys.values():
                if shares_gpu(service_gpus(c), service_gpus(m)):
                    want_free(p, c, reason, None)
            for j in p.jobs.values():
                if shares_gpu(service_gpus(j), service_gpus(m)):
                    want_free_jobs(p, j, reason)
            need = p.slept.get(f"{key}|{x.name}")
            gpus = [g for g in p.gpus if shares_gpu(service_gpus(m), (g.uuid,))]
            free = min(g.free_bytes for g in gpus) if gpus else None
            if need is not None and free is not None and free < need:
                p.note_once(
                    f"wakeroom|{key}|{x.name}",
                    f"Not waking {x.name} on {key} yet: its sleep gave back "
                    f"{format_bytes(need)}, {format_bytes(free)} is free ({reason})",
                )
                p.soon(ROOM_RECHECK_S)
                continue
            p.emit(WakeModel(key, x.name, reason))
            p.soon()


def unload_for_comfy(p: Pass) -> None:
    s = p.settings
    for g in p.gpus:
        if g.used_percent < s.threshold_percent:
            continue
        busy: list[ComfyObservation | JobServerObservation] = [
            c for c in p.comfys_on(g) if has_work(c)
        ]
        busy += [j for j in p.jobs_on(g) if j.has_work]
        if not busy:
            continue
        cands = [
            (o, m)
            for o in p.ollamas.values()
            if usable_ollama(o) and shares_gpu(service_gpus(o), (g.uuid,))
            for m in o.models or ()
            if model_ok(m) and m.size_vram_bytes > 0
        ]
        cands = [(o, m) for o, m in cands if (o.status.spec.key, m.name) not in p.healed]
        others = _server_candidates(p, g.uuid)
        if not cands and not others:
            continue
        names = ", ".join(c.status.spec.key for c in busy)
        situation = f"{names} has work and GPU {g.index} is at {g.used_percent:.0f}%"
        # VRAM_PRIORITY per pair: a model server keeps its models for a ComfyUI it
        # ranks above; it unloads for any busy ComfyUI it does not.
        yields = [(o, m) for o, m in cands if not _outranks_all(p, o.status.spec, busy)]
        others = [(m, x) for m, x in others if not _outranks_all(p, m.status.spec, busy)]
        if cands and not yields:
            p.skip(
                f"Not unloading Ollama models: {situation}, but priority {s.priority} never "
                "unloads them for ComfyUI"
            )
        gated = p.obs.ollama_gated
        kept = [(o, m) for o, m in yields if pages_rather_than_spill(gated, s, o.status.spec, busy)]
        if kept:
            names = ", ".join(sorted({m.name for _, m in kept}))
            no_gate = "no gate (VRAM_GATE_PORT)"
            if s.gate_port is not None:
                no_gate = "no gate (VRAM_GATE_PORT is set, but the gate is not serving)"
            p.skip(
                f"Not unloading Ollama models ({names}): {situation}, but under Dynamic VRAM "
                "the job pages its weights (it runs slower), while a chat that loads an "
                "unloaded model again during the job would spill to the CPU for as long as "
                f"it stays loaded; {no_gate} holds such a load until there is room"
            )
            yields = [om for om in yields if om not in kept]
        if not yields and not others:
            continue
        last = p.state.last_unload_at
        if last is not None and p.now - last < s.min_free_interval_s:
            left = s.min_free_interval_s - (p.now - last)
            what = "Ollama models" if yields else "models"
            p.skip(f"Not unloading {what} yet ({situation}): rate limit, {left:.0f} s left")
            p.soon(left)
            continue
        target = g.total_bytes * s.threshold_percent / 100.0
        estimate = g.used_bytes
        wall = p.obs.wall_at
        why = f"{situation} (threshold {s.threshold_percent:g}%)"
        for o, m in sorted(yields, key=lambda om: expiry_key(om[1], wall)):
            if estimate < target:
                break
            okey = o.status.spec.key
            if (okey, m.name) not in p.unloaded:
                p.unloaded.add((okey, m.name))
                detail = why
                if seems_busy(m, wall):
                    detail += "; it seems in use (expires_at passed), nothing else frees enough"
                p.emit(UnloadOllama(okey, m.name, detail))
                p.last_unload_at = p.now
            estimate -= m.size_vram_bytes
        for server, x in others:
            if estimate < target:
                break
            key = server.status.spec.key
            if (key, x.name) not in p.unloaded:
                p.unloaded.add((key, x.name))
                p.emit(UnloadModel(key, x.name, why))
                p.last_unload_at = p.now
            held = _held(server, x)
            # Unknown: as if it freed enough (one such unload per round; the next round
            # reads the GPU again after the rate limit).
            estimate -= held if held is not None else estimate


def pages_rather_than_spill(
    gated: bool,
    s: Settings,
    ollama: ServiceSpec,
    busy: list[ComfyObservation | JobServerObservation],
) -> bool:
    """Trigger 4 leaves this Ollama's idle models loaded: no gate serves in front of
    Ollama (`gated`: `Observation.ollama_gated`; VRAM_GATE_PORT unset, or set but the gate
    did not start), every job server with work is a ComfyUI under Dynamic
    VRAM, and none of them ranks above the Ollama (VRAM_PRIORITY=comfyui, or a higher
    label, still unloads for it).

    Such a job does not fail for lack of room: comfy-aimdo pages its weights and it runs
    slower (api-facts-2026 section 2). An unloaded model, though, is loaded again by the
    next chat for it, and without the gate nothing holds that load until the job ends:
    llama-server fits it into what the job leaves free and keeps that split, CPU part
    included, until the model is loaded again (api-facts-2026 section 1), and its requests
    then keep it busy at CPU speed, so no heal can take effect. A paged job costs less than
    that. With the gate, the reload waits for room, so the unload stays."""
    return not gated and all(
        isinstance(c, ComfyObservation)
        and c.mode is ComfyMode.DYNAMIC
        and not s.outranks(c.status.spec, ollama)
        for c in busy
    )


def _outranks_all(
    p: Pass, spec: ServiceSpec, busy: list[ComfyObservation | JobServerObservation]
) -> bool:
    return all(p.settings.outranks(spec, c.status.spec) for c in busy)


def _server_candidates(p: Pass, gpu_uuid: str) -> list[tuple[ModelServerObservation, ServedModel]]:
    """Idle loaded models of the other kinds' model servers on this GPU that can be
    unloaded: loaded (not loading or sleeping), not known to be busy (the actor checks
    again right before the unload), the server answered and has an unload call. Largest
    known first, then unknown sizes, by name (a stable order)."""
    found = [
        (m, x)
        for m in p.servers.values()
        if m.status.is_running
        and m.status.is_reachable
        and m.state is not None
        and m.state.can_unload
        and shares_gpu(service_gpus(m), (gpu_uuid,))
        for x in m.models
        if x.is_resident and not x.is_loading and x.busy is not True
    ]
    return sorted(found, key=lambda mx: (-(_held(*mx) or 0), mx[0].status.spec.key, mx[1].name))


def _held(server: ModelServerObservation, model: ServedModel) -> int | None:
    """What unloading `model` gives back: its size as the server reports it, else an
    even share of what NVML attributes to the server; None when neither is known."""
    if model.size_bytes:
        return model.size_bytes
    resident = [x for x in server.models if x.is_resident]
    if server.vram_bytes is not None and resident:
        return server.vram_bytes // len(resident)
    return None
