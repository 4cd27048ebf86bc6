"""The gate's `ports.RoomMaker`: free ComfyUI's VRAM before Ollama loads a model.

Policy: only the ComfyUI(s) on Ollama's GPU(s) that hold more than their CUDA context
are freed, soft then hard, until the room covers the need or the deadline passes.
- The need the gate asks for includes what the gate's Ollama keeps free when it places a
  model (`OllamaProfile.load_headroom_bytes`: llama-server's fit target, 1 GiB, Ollama
  >= 0.30; before 0.30 the head room of its own layer estimate).
- The room for a new model: free VRAM, plus the VRAM of those of Ollama's resident models
  that Ollama's own rule evicts for this load (model.evictable_bytes): before
  0.30 all of them (a further model must fit fully, api-facts 1.8); from 0.30 only while
  the load's need exceeds 80 % of the free memory, smallest first, since otherwise Ollama
  loads beside them and the new model spills (api-facts-2026 section 1). Only ComfyUI's
  memory is ours to free. Free VRAM is read on Ollama's GPU(s) only; the resident VRAM is
  what the gate's Ollama (the first running one) lists in /api/ps.
- A ComfyUI is passed over only when a fresh reading says it holds nothing beyond its
  CUDA context and its queue is empty: one with work, even if it holds nothing yet,
  is about to load that work's weights during the load: it is waited for (under every
  priority, since nothing is held yet that flags could free) and freed once idle.
- A running generation is never interrupted. Under VRAM_PRIORITY=balanced and comfyui, a
  ComfyUI with a running or pending prompt is waited for (its /queue polled every
  IDLE_POLL_S, within the deadline) and freed once idle, also when its prompt started
  between the look and the free; under ollama it is freed at once with flags that act
  when its prompt ends.
- The frees share the Actor's lock with the loop, so a gate free never overlaps a loop
  action; merely waiting for ComfyUI to become idle does not hold it. It gives up (False)
  when it cannot take the lock in time.
- Every free it does is reported through `on_outcome` so the policy can escalate it and
  does not repeat it. In dry run it stops after the first "would free".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from supervisor.actions import Actor, holds_nothing
from supervisor.errors import ServiceError
from supervisor.model import (
    FreeComfy,
    FreeResult,
    FreeStage,
    Outcome,
    Resident,
    evictable_bytes,
)
from supervisor.ollama_profile import OllamaProfile, ollama_profile
from supervisor.ports import ComfyApi, LoadRoom, Targets

# How often a busy ComfyUI's /queue is read while the gate waits for it to become idle.
IDLE_POLL_S = 0.25
# What the gate's admission puts before the model name in `reason`.
GATE_REASON_PREFIX = "gate: load of "


class ComfyRoomMaker:
    """`ports.RoomMaker` for the gate: frees the ComfyUI(s) on Ollama's GPU, soft then
    hard, until the room (free VRAM, plus the resident models Ollama would evict)
    covers the need.
    Shares the Actor's lock with the loop.

    A busy ComfyUI is freed at once only under VRAM_PRIORITY=ollama (the flags then wait
    for its prompt); under balanced and comfyui the gate waits until it is idle, then
    frees it. A running generation is never interrupted."""

    def __init__(
        self,
        actor: Actor,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self._actor = actor
        self._clock = clock
        # The daemon folds these into the policy state, so the loop does not repeat a free
        # the gate just did, and can escalate it.
        self._on_outcome = on_outcome or (lambda outcome: None)

    def load_profile(self) -> OllamaProfile | None:
        """What the gate's Ollama (the first running one) does; None: none known."""
        targets = self._actor.targets()
        for key in targets.ollamas:
            return targets.ollama_profiles.get(key)
        return None

    def room_for(self, need_bytes: int) -> LoadRoom | None:
        """The room for a load of `need_bytes` (head room included; see the module's
        policy): free VRAM on Ollama's GPU, plus what Ollama's own rule would evict.
        None: unknown."""
        targets = self._actor.targets()
        # The model lands on one of Ollama's GPUs (the one with the most free memory
        # among them); another GPU's free memory is no room for it.
        free = self._actor.probe.free_bytes(targets.ollama_gpus)
        if free is None:
            return None
        profile = self.load_profile() or ollama_profile(None)
        load = max(need_bytes - profile.load_headroom_bytes, 0)
        residents = _residents(targets)
        return LoadRoom(free, evictable_bytes(profile.is_llama_server, load, free, residents))

    def _covers(self, need_bytes: int) -> bool:
        room = self.room_for(need_bytes)
        return room is not None and room.total_bytes >= need_bytes

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        end = self._clock() + deadline_s
        if self._covers(need_bytes):
            return True
        targets = self._actor.targets()
        gpus = set(targets.ollama_gpus)
        settings = self._actor.settings
        priority = settings.priority
        # The gate's Ollama (the first running one): its rank decides whether a busy
        # ComfyUI's work protects it (VRAM_PRIORITY, the vram-supervisor.priority label).
        ollama = next(iter(targets.ollamas.values()), None)
        for key, (spec, comfy) in targets.comfyuis.items():
            cut = ollama is not None and settings.outranks(ollama[0], spec)
            if gpus and spec.gpu_uuids and not gpus & set(spec.gpu_uuids):
                continue  # another GPU: freeing it gives Ollama nothing
            # A fresh reading (its container's PIDs listed again: the loop's may predate
            # a restart), and its queue: a ComfyUI that holds nothing now but has work
            # is about to load that work's weights, into the room this load needs.
            reading = self._actor.probe.comfy_reading(key, fresh_pids=True)
            empty = holds_nothing(reading)
            if empty and not _is_busy(comfy):
                # Only its CUDA context (Ollama's own models fill the GPU): freeing
                # it gives nothing, and verifying that would hold the request.
                logger.debug(f"Not freeing ComfyUI {spec.name} for the gate: it holds nothing")
                continue
            while True:
                busy = _is_busy(comfy)
                # Under ollama a busy ComfyUI is freed at once (its flags act when its
                # prompt ends), unless it holds nothing yet: a free now finds nothing to
                # verify, so its work is waited for, as under the other priorities.
                if busy and (not cut or empty):
                    model = reason.removeprefix(GATE_REASON_PREFIX)
                    logger.info(
                        f"Gate: waiting for ComfyUI {spec.name} to finish its work before "
                        f"making room for {model}"
                    )
                    if not self._wait_idle(comfy, end):
                        if self._actor.is_stopping:
                            logger.info(
                                f"Gate: stopped waiting for ComfyUI {spec.name}: shutting down"
                            )
                        else:
                            logger.info(
                                f"Gate: ComfyUI {spec.name} still has work at the deadline; "
                                f"not freeing it (VRAM_PRIORITY={priority})"
                            )
                        return False
                    busy = False
                result = self._free(key, reason, need_bytes, end, wait_for_prompt=busy)
                if result is not None:
                    return result
                # Short of room because a prompt started between the look and the free (its
                # flags wait for it): wait for it like for any work, while time is left.
                if cut or not _is_busy(comfy) or self._clock() >= end:
                    break
        return False

    def _wait_idle(self, comfy: ComfyApi, end: float) -> bool:
        """Poll ComfyUI's queue until nothing runs or waits (True), or until `end` or the
        supervisor stops (False). Holds no lock: the loop goes on meanwhile."""
        while self._clock() < end:
            if not _is_busy(comfy):
                return True
            if not self._actor.wait(min(IDLE_POLL_S, max(end - self._clock(), 0.0))):
                return False
        return not _is_busy(comfy)

    def _free(
        self, key: str, reason: str, need_bytes: int, end: float, *, wait_for_prompt: bool
    ) -> bool | None:
        """Free one ComfyUI under the Actor's lock, soft then hard. True: the room is
        there; False: give up (deadline, lock, dry run); None: try the next ComfyUI."""
        if not self._actor.lock.acquire(timeout=max(end - self._clock(), 0.0)):
            return False
        try:
            if self._covers(need_bytes):
                return True  # made meanwhile (the loop, or Ollama's own unloads)
            for stage in (FreeStage.SOFT, FreeStage.HARD):
                left = end - self._clock()
                if left <= 0:
                    return False
                outcome = self._actor.free_comfy(
                    FreeComfy(key, stage, reason),
                    wait_pending_s=left if wait_for_prompt else 0.0,
                    verify_s=left,
                )
                self._on_outcome(outcome)
                if outcome.dry_run:
                    return False
                room = self.room_for(need_bytes)
                if room is not None and room.total_bytes >= need_bytes:
                    return True
                if room is None and outcome.result is FreeResult.FREED:
                    return True  # cannot measure the room; the free did its part
            return None
        finally:
            self._actor.lock.release()


def _residents(targets: Targets) -> tuple[Resident, ...]:
    """The models the gate's Ollama has loaded. None when /api/ps cannot be read (then
    only free VRAM counts, which may free ComfyUI needlessly but never spills)."""
    if not targets.ollamas:
        return ()
    _, ollama = next(iter(targets.ollamas.values()))  # the one the gate forwards to
    try:
        return tuple(Resident(m.name, m.size_vram_bytes) for m in ollama.ps())
    except ServiceError as exc:
        logger.debug(f"Gate: cannot read Ollama's /api/ps to judge the room: {exc}")
        return ()


def _is_busy(comfy: ComfyApi) -> bool:
    try:
        return comfy.queue().is_busy
    except ServiceError:
        return False  # unreadable: judged by its VRAM like an idle one, as before
