"""Triggers 1, 2 and 4: new models, a GPU over the threshold, a busy job server (pure).

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

Triggers 1 and 4 run over every model server alike, Ollama and the other registry kinds
(llama-server, llama-swap ...; `p.servers`), through the views of `servers.py`:
`ResidentModels` for 1 (a model that appears in a server's list frees the idle ComfyUIs
and job servers sharing its GPU; for the other kinds a model listed as loading counts),
`UnloadCandidate` for 4 (one loop over the candidates in unload order: Ollama's first by
expiry as above, then the other kinds' idle loaded models, largest first, unloaded with
`UnloadModel`, one per round when what a model holds is not known; the actor re-reads
that it serves no request before unloading it). VRAM_PRIORITY decides per pair: a model
server's models are never unloaded for a ComfyUI it ranks above (`Settings.outranks`).
What differs by kind is in the candidate: what an unload gives back, the order, the
action, whether skips name the kind (Ollama's) and whether a reload would spill without
the gate (`pages_rather_than_spill`, Ollama's).

On the other side, triggers 1, 2 and 4 (and a sleeping model that requests wait for,
`wake_sleeping`) run over every job server alike, ComfyUI and the other registry kinds
(A1111/Forge, InvokeAI ...; `p.jobs`), through the `JobServerView`s of `jobs.py`: one
loop per trigger over the job servers sharing a GPU, the ComfyUIs first, then the
others, each in reading order. What differs by kind is in the view: what its free is
(ComfyUI's a staged episode, `episodes.want_free`: soft, hard, restart; the others' one
`FreeJobs` while known idle, `jobs.want_free_jobs`), whether it has work (trigger 4
unloads for it), whether its jobs page when VRAM is short (ComfyUI's under Dynamic VRAM)
and whether a free for a new model names a GPU (ComfyUI's).

(Trigger 3, spilled models, is `heal.py`; it frees ComfyUIs only.)
"""

from __future__ import annotations

from supervisor.config import Settings
from supervisor.model import FreeJobs, ReloadJobs, ServiceSpec, WakeModel
from supervisor.policy.guards import service_gpus, shares_gpu
from supervisor.policy.jobs import JobServerView, job_servers, job_servers_on
from supervisor.policy.scratch import Pass
from supervisor.policy.servers import UnloadCandidate, resident_models, unload_candidates
from supervisor.units import format_bytes

# How soon to look again while a sleeping model waits for its room.
ROOM_RECHECK_S = 2.0


def track_models(p: Pass) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """New models per model server (Ollama and the other kinds, `servers.ResidentModels`),
    and the next known-model set. A server's first read is a baseline; an unreadable one
    keeps what was known (no false "new" later); a stopped one forgets its models."""
    seen = set(p.state.seen_ollamas)
    known: set[tuple[str, str]] = set()
    for r in resident_models(p):
        key = r.key
        prev = {m for k, m in p.state.known_models if k == key}
        if not r.is_running:
            if prev:
                p.soon()  # the model list changed
            continue
        if r.names is None:
            known |= {(key, m) for m in prev}
            continue
        if p.state.is_initialised and key in seen:
            new = [n for n in r.names if n not in prev]
            if new:
                p.new_models[key] = new
                # A new load of a model healed before (it left /api/ps and a client loaded
                # it again): the heal cooldown was for the earlier load. Ollama >= 0.30
                # spills a further model often, so each load may need its heal; heals that
                # did not help still back off (heal.py).
                for name in new if r.heals else ():
                    p.heal_at.pop(f"{key}|{name}", None)
                p.notes.append(f"New {r.title} model(s) detected: {', '.join(new)}{r.note_where}")
            if set(r.names) != prev:
                p.soon()
        seen.add(key)
        known |= {(key, n) for n in r.names}
    if p.obs.docker_ok is False:  # discovery failed: absent servers are not gone
        known |= {
            (k, m) for k, m in p.state.known_models if k not in p.ollamas and k not in p.servers
        }
    # A model whose heal waits for its unload leaves /api/ps only to be reloaded by the
    # heal: its return is not a new model (no free for it, no "detected" note).
    for w in p.state.heal_waits:
        waiting_on = p.ollamas.get(w.target)
        if waiting_on is not None and waiting_on.status.is_running:
            known.add((w.target, w.model))
    return frozenset(known), frozenset(seen)


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
    servers = {r.key: r for r in resident_models(p)}
    views = job_servers(p)
    for key, names in p.new_models.items():
        r = servers[key]
        reason = f"new {r.title} model(s) {', '.join(names)}{r.reason_where}"
        for v in views:
            if v.shares(r.gpus):
                v.free(p, reason, v.gpu_for(p.gpus, r.gpus))


def free_over_threshold(p: Pass) -> None:
    for g in p.gpus:
        if g.used_percent >= p.settings.threshold_percent:
            reason = (
                f"GPU {g.index} at {g.used_percent:.0f}% "
                f"(threshold {p.settings.threshold_percent:g}%)"
            )
            for v in job_servers_on(p, g):
                v.free(p, reason, g.uuid)


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
    views = job_servers(p)
    for key, m in p.servers.items():
        st = m.state
        if st is None or not st.can_wake or not st.waiting or not m.status.is_reachable:
            continue
        for x in m.models:
            if x.state != "sleeping" or (key, x.name) in p.unloaded:
                continue
            reason = f"{st.waiting} request(s) wait for sleeping model {x.name} on {key}"
            for v in views:
                if v.shares(service_gpus(m)):
                    v.free(p, reason)
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
        busy = [v for v in job_servers_on(p, g) if v.has_work]
        if not busy:
            continue
        cands = unload_candidates(p, g.uuid)
        if not cands:
            continue
        names = ", ".join(v.key for v in busy)
        situation = f"{names} has work and GPU {g.index} is at {g.used_percent:.0f}%"
        # VRAM_PRIORITY per pair: a model server keeps its models for a job server it
        # ranks above; it unloads for any busy job server it does not.
        yields = [c for c in cands if not _outranks_all(p, c.spec, busy)]
        for kind in _named_kinds(cands):
            if not any(c.title == kind for c in yields if c.named_in_skips):
                p.skip(
                    f"Not unloading {kind} models: {situation}, but priority {s.priority} "
                    "never unloads them for ComfyUI"
                )
        gated = p.obs.ollama_gated
        kept = [
            c
            for c in yields
            if c.spills_without_gate and pages_rather_than_spill(gated, s, c.spec, busy)
        ]
        no_gate = "no gate (VRAM_GATE_PORT)"
        if s.gate_port is not None:
            no_gate = "no gate (VRAM_GATE_PORT is set, but the gate is not serving)"
        for kind in _named_kinds(kept):
            names = ", ".join(sorted({c.model for c in kept if c.title == kind}))
            p.skip(
                f"Not unloading {kind} models ({names}): {situation}, but under Dynamic VRAM "
                "the job pages its weights (it runs slower), while a chat that loads an "
                "unloaded model again during the job would spill to the CPU for as long as "
                f"it stays loaded; {no_gate} holds such a load until there is room"
            )
        yields = [c for c in yields if c not in kept]
        if not yields:
            continue
        last = p.state.last_unload_at
        if last is not None and p.now - last < s.min_free_interval_s:
            left = s.min_free_interval_s - (p.now - last)
            what = next((f"{c.title} models" for c in yields if c.named_in_skips), "models")
            p.skip(f"Not unloading {what} yet ({situation}): rate limit, {left:.0f} s left")
            p.soon(left)
            continue
        target = g.total_bytes * s.threshold_percent / 100.0
        estimate = g.used_bytes
        why = f"{situation} (threshold {s.threshold_percent:g}%)"
        for c in yields:  # in unload order (`servers.Order`)
            if estimate < target:
                break
            if (c.key, c.model) not in p.unloaded:
                p.unloaded.add((c.key, c.model))
                detail = why
                if c.seems_busy:
                    detail += "; it seems in use (expires_at passed), nothing else frees enough"
                p.emit(c.action(detail))
                p.last_unload_at = p.now
            # Unknown: as if it freed enough (one such unload per round; the next round
            # reads the GPU again after the rate limit).
            estimate -= c.gives_back if c.gives_back is not None else estimate


def pages_rather_than_spill(
    gated: bool, s: Settings, ollama: ServiceSpec, busy: list[JobServerView]
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
    return not gated and all(v.pages_when_short and not s.outranks(v.spec, ollama) for v in busy)


def _outranks_all(p: Pass, spec: ServiceSpec, busy: list[JobServerView]) -> bool:
    return all(p.settings.outranks(spec, v.spec) for v in busy)


def _named_kinds(cands: list[UnloadCandidate]) -> list[str]:
    """The kinds among these candidates that skips name, in the order first seen."""
    return list(dict.fromkeys(c.title for c in cands if c.named_in_skips))
