"""Ollama actions for the Actor: unload a model, heal a model that spilled to the CPU.

Policy (the Actor's, see `supervisor.actions`): nothing is trusted on the word of the API.
Ollama's unload returns before the runner is gone, so both actions watch /api/ps until the
model leaves it (VRAM_VERIFY_TIMEOUT); a heal also waits up to RECOVERY_WAIT_S for the VRAM
to come back before it loads the model again, and gives up rather than reload into a GPU
where the model would spill again (the room: free VRAM, plus what Ollama evicts of its
other models itself for the reload, `model.evictable_bytes`, as the gate counts it); after
the unload it waits (VRAM_VERIFY_TIMEOUT at most) for room a ComfyUI job took meanwhile
before it reloads. Both return an Outcome; adapter
errors become a failed Outcome, never an exception.

Locking: an unload runs under the Actor's lock (the Actor calls it so). A heal takes the
lock itself, only while it acts on the GPU: the ComfyUI free, the room check and the
unload. It releases it while it waits for the model to leave /api/ps and while the reload
runs (Ollama's own load, up to minutes), so the gate can make room meanwhile (a gate free
then only helps), and takes it again only if it must free ComfyUI again before reloading.

A heal leaves the model as it found it, keep-alive included:
- The reload keeps a model that was loaded forever (expires_at about year 2318, gotcha 6)
  loaded forever (keep_alive -1). Any other keep-alive cannot be told from expires_at (stale
  during generations), so none is sent and the load gets OLLAMA_KEEP_ALIVE.
- If a request keeps the model busy past VRAM_VERIFY_TIMEOUT, the keep_alive 0 unload
  stays armed inside Ollama and unloads the model when the request ends (api-facts 1.6).
  The heal does not block the loop for that: it reports the unload as waiting
  (`Outcome.awaiting_unload`, with the keep-alive to restore: -1 for a forever model,
  else what was left of its expiry, at least Ollama's default 5 minutes) and the policy
  sends the second half (`reload_after_wait`) once the model has left /api/ps. Past the
  policy's bound, or when the supervisor is stopping, the unload is withdrawn with a load
  request carrying that keep-alive (which replaces the runner's, api-facts 1.6/1.7).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from loguru import logger

from supervisor.errors import ServiceError
from supervisor.model import (
    FreeComfy,
    FreeStage,
    HealOllama,
    OllamaModel,
    Outcome,
    Resident,
    UnloadOllama,
    evictable_bytes,
)
from supervisor.policy.guards import shares_gpu
from supervisor.ports import ActorPort, OllamaApi
from supervisor.units import MIB, format_bytes

# Ollama waits up to 5 s for VRAM to recover after an unload; we wait as long.
RECOVERY_WAIT_S = 5.0
# keep_alive -1 shows as now + Go's longest duration (~292 years): about year 2318.
FOREVER_FROM_YEAR = 2200
# OLLAMA_KEEP_ALIVE's default (api-facts 1.9): what a withdrawn unload leaves at least.
DEFAULT_KEEP_ALIVE_S = 300

KeepAlive = int | str | None


def _expiry(model: OllamaModel) -> datetime | None:
    if not model.expires_at:
        return None
    try:
        return datetime.fromisoformat(model.expires_at)
    except ValueError:
        return None


def reload_keep_alive(model: OllamaModel) -> KeepAlive:
    """The keep_alive that reloads `model` as it was: -1 when it was kept forever; None
    (send none: OLLAMA_KEEP_ALIVE) otherwise, as expires_at does not tell the rest."""
    expiry = _expiry(model)
    return -1 if expiry is not None and expiry.year >= FOREVER_FROM_YEAR else None


def restore_keep_alive(model: OllamaModel, wall_now: float) -> int:
    """The keep_alive that withdraws our armed unload of a busy `model`: -1 for a forever
    model, else the seconds left until its expiry, at least Ollama's default."""
    if reload_keep_alive(model) == -1:
        return -1
    expiry = _expiry(model)
    left = math.ceil(expiry.timestamp() - wall_now) if expiry is not None else 0
    return max(left, DEFAULT_KEEP_ALIVE_S)


def _find(ollama: OllamaApi, model: str) -> OllamaModel | None:
    return next((m for m in ollama.ps() if m.name == model), None)


def _wait_gone(actor: ActorPort, ollama: OllamaApi, model: str, deadline: float) -> bool:
    """The unload is asynchronous: the model leaves /api/ps when its runner stops."""
    while True:
        try:
            if _find(ollama, model) is None:
                return True
        except ServiceError:
            pass
        if actor.clock() >= deadline or not actor.wait(actor.poll_s):
            return False


def _wait_recovered(actor: ActorPort, gpus: tuple[str, ...], target_free: int) -> None:
    deadline = actor.clock() + RECOVERY_WAIT_S
    while actor.clock() < deadline and actor.wait(actor.poll_s):
        free = actor.probe.free_bytes(gpus)
        if free is not None and free >= target_free:
            return


def _wait_room(
    actor: ActorPort, ollama: OllamaApi, model: str, gpus: tuple[str, ...], need: int
) -> OllamaModel | None:
    """Wait (VRAM_VERIFY_TIMEOUT at most) until `need` bytes are free for the reload; the
    model as a request loaded it meanwhile, else None (room, or the time is up)."""
    deadline = actor.clock() + actor.settings.verify_timeout_s
    while True:
        free = actor.probe.free_bytes(gpus)
        if free is None or free >= need:
            return None
        try:
            found = _find(ollama, model)
        except ServiceError:
            found = None
        if found is not None:
            return found
        if actor.clock() >= deadline or not actor.wait(actor.poll_s):
            return None


def unload(actor: ActorPort, action: UnloadOllama) -> Outcome:
    """Unload one model and watch /api/ps until it is gone."""
    start = actor.clock()
    target = actor.targets().ollamas.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="Ollama is not running or not known")
    spec, ollama = target
    if actor.settings.dry_run:
        return actor.dry(action, f"unload Ollama model {action.model} on {spec.name}")
    log = logger.bind(target=action.target, model=action.model)
    try:
        found = _find(ollama, action.model)
        actor.announce_unload(action.model)
        with actor.sending(action.target):
            ollama.unload(action.model)
    except ServiceError as exc:
        log.warning(f"Could not unload Ollama model {action.model}: {exc}")
        return Outcome(action, start, ok=False, detail=str(exc), duration_s=actor.clock() - start)
    before = found.size_vram_bytes if found else None
    gone = _wait_gone(actor, ollama, action.model, start + actor.settings.verify_timeout_s)
    took = actor.clock() - start
    if gone:
        log.info(
            f"Unloaded Ollama model {action.model} ({format_bytes(before)} of VRAM) "
            f"in {took:.1f} s: {action.reason}"
        )
    else:
        log.warning(
            f"Ollama model {action.model} is still loaded {took:.1f} s after the "
            "unload (a request is still using it)"
        )
    return Outcome(
        action,
        start,
        ok=gone,
        before_bytes=before,
        after_bytes=0 if gone else before,
        detail="" if gone else "still loaded",
        duration_s=took,
    )


def heal(actor: ActorPort, action: HealOllama) -> Outcome:
    """Free the room, unload the spilled model, wait until VRAM is back, load it again."""
    start = actor.clock()
    targets = actor.targets()
    target = targets.ollamas.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="Ollama is not running or not known")
    spec, ollama = target
    profile = targets.ollama_profiles.get(action.target)
    # What its load keeps free beyond the model (llama-server's fit target from 0.30, the
    # head room of its own layer estimate before), as the gate counts it.
    fit_target = profile.load_headroom_bytes if profile is not None else 0
    if actor.settings.dry_run:
        return actor.dry(
            action,
            f"heal Ollama model {action.model} on {spec.name} "
            f"(free {', '.join(action.free_first) or 'nothing'}, unload, "
            "preload)",
        )
    log = logger.bind(target=action.target, model=action.model)

    def fail(detail: str) -> Outcome:
        log.warning(f"Could not heal Ollama model {action.model}: {detail}")
        return Outcome(action, start, ok=False, detail=detail, duration_s=actor.clock() - start)

    # The GPU the policy wants the model on; else the best of Ollama's GPUs.
    gpus = (action.gpu_uuid,) if action.gpu_uuid else targets.ollama_gpus
    # Under the lock: what acts on the GPU (the free, the room check, the unload).
    with actor.lock:
        try:
            resident = ollama.ps()
        except ServiceError as exc:
            return fail(str(exc))
        model = next((m for m in resident if m.name == action.model), None)
        if model is None:
            return fail("it is no longer loaded")
        _free_first(actor, action)
        held = _comfy_held(actor, action, gpus)
        free = actor.probe.free_bytes(gpus)
        need = model.size_bytes + fit_target
        # What Ollama evicts of its other models itself for the reload, by its rule (as
        # the gate counts it): before 0.30 a model that does not fit beside them makes
        # Ollama unload them, so they are room for it.
        evicts = 0
        if free is not None:
            others = [
                Resident(m.name, m.size_vram_bytes)
                for m in resident
                if m.name != action.model and m.size_vram_bytes > 0
            ]
            is_llama_server = profile.is_llama_server if profile is not None else True
            room = free + model.size_vram_bytes
            evicts = evictable_bytes(is_llama_server, model.size_bytes, room, others)
            if room + evicts < need:
                also = f" (and {format_bytes(evicts)} Ollama evicts)" if evicts else ""
                return fail(
                    f"not enough room: {format_bytes(room)} would be free{also}, "
                    f"{format_bytes(need)} needed; it would spill again"
                )
        try:
            actor.announce_unload(action.model)
            with actor.sending(action.target):
                ollama.unload(action.model)
        except ServiceError as exc:
            return fail(f"unload failed: {exc}")
        if free is not None:
            log.info(
                f"Heal of Ollama model {action.model}: unloading it to load it again wholly "
                f"on the GPU ({format_bytes(room + evicts)} of room for "
                f"{format_bytes(need)})"
            )
    # Without the lock: waiting for Ollama and its reload block nothing of ours.
    if not _wait_gone(actor, ollama, action.model, actor.clock() + actor.settings.verify_timeout_s):
        if actor.is_stopping:  # nobody would reload it after the request
            if (gone := actor.not_ours(action.target)) is not None:
                return fail(f"the unload is not withdrawn: {gone}")
            return _withdraw_unload(actor, action.target, ollama, model, fail)
        return _awaiting(actor, action, model, start)
    if free is not None:
        _wait_recovered(actor, gpus, free + model.size_vram_bytes * 3 // 4)
        now_free = actor.probe.free_bytes(gpus)
        if now_free is not None and now_free + evicts < need:
            # Free again only a ComfyUI that took memory back meanwhile (a new job); one
            # that still holds what it held after the first free has nothing more to give
            # (another process took the room), and freeing it would only cost a verify.
            grown = _grown_since(actor, held)
            if grown:
                with actor.lock:
                    _free_first(actor, replace(action, free_first=grown))
            # A ComfyUI job that began meanwhile keeps the room until it ends (its free
            # applies between prompts, api-facts 2.3): wait for the room, at most
            # VRAM_VERIFY_TIMEOUT, rather than reload beside it and spill again. A
            # request that loads the model meanwhile ends the wait; its load is judged.
            loaded = _wait_room(actor, ollama, action.model, gpus, need - evicts)
            if loaded is not None:
                return _judge(
                    actor, action, start, model.gpu_fraction, model.size_vram_bytes, loaded
                )
    if actor.is_stopping:
        return fail("the supervisor is stopping")
    if (gone := actor.not_ours(action.target)) is not None:
        # Seconds may have passed since the unload: the container may have opted out.
        return fail(f"not reloaded: {gone}")
    try:
        with actor.sending(action.target):
            ollama.preload(
                action.model, actor.preload_timeout_s, keep_alive=reload_keep_alive(model)
            )
        healed = _find(ollama, action.model)
    except ServiceError as exc:
        return fail(f"reload failed: {exc}")
    return _judge(actor, action, start, model.gpu_fraction, model.size_vram_bytes, healed)


def _awaiting(actor: ActorPort, action: HealOllama, model: OllamaModel, start: float) -> Outcome:
    """A request keeps the model busy: leave the unload armed (Ollama unloads the model
    when the request ends) and let the policy reload it then, with the keep-alive that
    withdrawing the unload would send (`restore_keep_alive`)."""
    keep_alive = restore_keep_alive(model, actor.wall_clock())
    took = actor.clock() - start
    logger.bind(target=action.target, model=action.model).info(
        f"Heal of Ollama model {action.model} waits for its request to end: the unload "
        f"is armed, the model is reloaded once it leaves /api/ps (keep_alive {keep_alive})"
    )
    return Outcome(
        action,
        start,
        ok=False,
        before_bytes=model.size_vram_bytes,
        detail=f"waiting: a request keeps it loaded {took:.1f} s after the unload",
        duration_s=took,
        awaiting_unload=True,
        keep_alive=keep_alive,
    )


def _judge(
    actor: ActorPort,
    action: HealOllama,
    start: float,
    before_fraction: float,
    before_bytes: int | None,
    healed: OllamaModel | None,
) -> Outcome:
    """Report a reload: healed only when the model is whole on the GPU again."""
    log = logger.bind(target=action.target, model=action.model)
    after = healed.gpu_fraction if healed else 0.0
    took = actor.clock() - start
    before_pct, after_pct = round(before_fraction * 100), round(after * 100)
    # A heal is a success only when the model is whole on the GPU again; a partial gain is
    # reported as such (and counted as failed), so the policy backs off instead of calling
    # it done.
    ok = healed is not None and not healed.is_spilled
    if ok:
        log.info(
            f"Healed Ollama model {action.model}: {before_pct}% -> {after_pct}% "
            f"on GPU in {took:.1f} s ({action.reason})"
        )
    elif healed is not None and after > before_fraction:
        log.warning(
            f"Partly healed Ollama model {action.model}: {before_pct}% -> {after_pct}% on "
            "GPU; the rest is still on the CPU (another process took part of the room)"
        )
    elif healed is None:
        # Not "-> 0% on GPU": the reload answered, and the model left /api/ps before it was
        # read (Ollama unloaded it again for another model's load, or a crash).
        log.warning(
            f"Heal of Ollama model {action.model} did not help: it was no longer loaded "
            f"when checked after its reload ({before_pct}% on GPU before; Ollama unloaded "
            "it again, e.g. for another model's load)"
        )
    else:
        log.warning(
            f"Heal of Ollama model {action.model} did not help: {before_pct}% -> "
            f"{after_pct}% on GPU"
        )
    return Outcome(
        action,
        start,
        ok=ok,
        before_bytes=before_bytes,
        after_bytes=healed.size_vram_bytes if healed else None,
        after_fraction=after,
        duration_s=took,
    )


def reload_after_wait(actor: ActorPort, action: HealOllama) -> Outcome:
    """The second half of a heal whose unload waited for a request (`reload_only`): the
    model left /api/ps -> free the ComfyUIs the policy names again, preload, verify. Still
    loaded (`withdraw`) -> withdraw the armed unload. Loaded again by a request before
    us -> judge that load, send nothing."""
    start = actor.clock()
    target = actor.targets().ollamas.get(action.target)
    if target is None:
        return Outcome(action, start, ok=False, detail="Ollama is not running or not known")
    spec, ollama = target
    verb = "withdraw the unload of" if action.withdraw else "reload"
    if actor.settings.dry_run:
        return actor.dry(action, f"{verb} Ollama model {action.model} on {spec.name}")
    log = logger.bind(target=action.target, model=action.model)

    def fail(detail: str) -> Outcome:
        log.warning(f"Could not heal Ollama model {action.model}: {detail}")
        return Outcome(action, start, ok=False, detail=detail, duration_s=actor.clock() - start)

    try:
        found = _find(ollama, action.model)
    except ServiceError as exc:
        return fail(str(exc))
    if found is not None and action.withdraw:
        return _withdraw_unload(actor, action.target, ollama, found, fail, action.keep_alive)
    if found is None:
        if action.free_first:
            with actor.lock:
                _free_first(actor, action)
            # The frees took up to a verification each: the container may have opted out.
            if (gone := actor.not_ours(action.target)) is not None:
                return fail(f"not reloaded: {gone}")
        if actor.is_stopping:
            return fail("the supervisor is stopping")
        try:
            with actor.sending(action.target):
                ollama.preload(action.model, actor.preload_timeout_s, keep_alive=action.keep_alive)
            found = _find(ollama, action.model)
        except ServiceError as exc:
            return fail(f"reload failed: {exc}")
    return _judge(actor, action, start, action.before_fraction, None, found)


GROWN_BYTES = 256 * MIB  # a ComfyUI that grew by more than this took memory back


def _comfy_held(actor: ActorPort, action: HealOllama, gpus: tuple[str, ...]) -> dict[str, int]:
    """What each ComfyUI on the heal's GPUs holds right after the heal's free (unknown ones
    left out): the ComfyUIs it freed, and those it did not need to free, since a job that
    starts during the heal takes the room its reload needs (found by the soak: a reload
    beside an idle ComfyUI that had loaded SDXL meanwhile spilled again)."""
    held = {}
    for key, (spec, _) in actor.targets().comfyuis.items():
        if key not in action.free_first and not shares_gpu(spec.gpu_uuids, gpus):
            continue
        reading = actor.probe.comfy_reading(key)
        if reading is not None:
            held[key] = reading.bytes
    return held


def _grown_since(actor: ActorPort, held: dict[str, int]) -> tuple[str, ...]:
    grown = []
    for key, then in held.items():
        reading = actor.probe.comfy_reading(key)
        if reading is not None and reading.bytes > then + GROWN_BYTES:
            grown.append(key)
    return tuple(grown)


def _free_first(actor: ActorPort, action: HealOllama) -> None:
    """Hard-free the ComfyUIs the policy named for this heal (caller holds the lock)."""
    comfyuis = actor.targets().comfyuis
    for key in action.free_first:
        if key in comfyuis:
            actor.free_comfy(FreeComfy(key, FreeStage.HARD, f"heal {action.model}"))


def _withdraw_unload(
    actor: ActorPort,
    target: str,
    ollama: OllamaApi,
    model: OllamaModel,
    fail: Callable[[str], Outcome],
    keep_alive: KeepAlive = None,
) -> Outcome:
    """A request kept the model busy: cancel the armed unload, report the heal failed."""
    if keep_alive is None:
        keep_alive = restore_keep_alive(model, actor.wall_clock())
    try:
        with actor.sending(target):
            ollama.preload(model.name, actor.preload_timeout_s, keep_alive=keep_alive)
    except ServiceError as exc:
        return fail(
            "it is still in use by a request, and withdrawing the unload failed "
            f"({exc}): Ollama unloads it when the request ends"
        )
    return fail(
        "it is still in use by a request; the unload was withdrawn "
        f"(keep_alive {keep_alive}) and it stays loaded as it was, partly on the CPU"
    )
