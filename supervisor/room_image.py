"""The image gate's `ports.RoomMaker`: unload idle models (Ollama's first, then those of the
other model servers: llama-swap, llama-server ...) before a ComfyUI job.

ComfyUI loads a job's models from the VRAM free when the job starts; short of it, it loads
part of them (low-VRAM, or Dynamic VRAM paging) and the job runs slower (api-facts 2.7,
api-facts-2026 section 2). An idle Ollama model holding the card is the usual cause.
Policy:
- The room for a job: the free VRAM on the ComfyUI's GPU(s), plus what that ComfyUI holds
  beyond its CUDA context (it evicts its own models for the next job itself). The ComfyUI
  is the first running one (the one the image gate forwards to).
- Short of the need, the Ollama models on that GPU are unloaded one at a time through the
  Actor (the same verified unload as the loop, which tells the Ollama gate first), soonest
  expiry first, until the room covers the need or the deadline passes.
- Then the idle models of the other model servers on that GPU (`UnloadModel` through the
  Actor, which reads again that the model serves no request before it unloads it).
- Never a model serving a request: one the Ollama gate has a request in flight for, or
  one still listed past its expires_at (api-facts gotcha 6). While such a model holds
  the room the job needs, it is looked at again every BUSY_POLL_S until the deadline
  (VRAM_GATE_WAIT) and unloaded once its request is done. When even those models (with
  the ones the actor refused a moment ago) could not make the room, their sizes all
  known, nothing is waited for: the job goes on at once (it would page all the same,
  only later). Never under
  VRAM_PRIORITY=ollama: Ollama keeps its models and the job may run in low-VRAM mode.
- The unloads share the Actor's lock with the loop; each one is reported through
  `on_outcome` so the policy counts it. In dry run it stops after the first "would unload".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from supervisor.actions import NOTHING_HELD_BYTES, Actor
from supervisor.errors import ServiceError
from supervisor.gate.admission import model_key
from supervisor.model import Outcome, UnloadModel, UnloadOllama
from supervisor.ollama_actions import RECOVERY_WAIT_S
from supervisor.policy.guards import expiry_key, seems_busy
from supervisor.units import format_bytes

BUSY_POLL_S = 0.25  # how often a model serving a request is looked at again
REFUSED_RETRY_S = 2.0  # a model the actor refused to unload is asked again after this


class _HeldBack:
    """The models one look could not unload yet (serving a request, or refused by the
    actor a moment ago) and what they hold together (None: some size is unknown)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.bytes: int | None = 0

    def add(self, name: str, size: int | None) -> None:
        self.names.append(name)
        self.bytes = None if size is None or self.bytes is None else self.bytes + size


class OllamaRoomMaker:
    """`ports.RoomMaker` for the image gate: unloads idle Ollama models (see the module's
    policy). `busy_models` names (as `model_key`) the models serving a request now."""

    def __init__(
        self,
        actor: Actor,
        busy_models: Callable[[], frozenset[str]] = frozenset,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self._actor = actor
        self._busy_models = busy_models
        self._clock = clock
        self._on_outcome = on_outcome or (lambda outcome: None)

    def _comfy(self) -> tuple[str | None, tuple[str, ...]]:
        """The ComfyUI the gate forwards to (its key) and its GPUs (() = unknown/all)."""
        comfyuis = self._actor.targets().comfyuis
        if not comfyuis:
            return None, ()
        key, (spec, _api) = next(iter(comfyuis.items()))
        return key, spec.gpu_uuids

    def held_bytes(self) -> int | None:
        """What the ComfyUI holds beyond its CUDA context; None: unknown."""
        key, _gpus = self._comfy()
        if key is None:
            return None
        reading = self._actor.probe.comfy_reading(key)
        if reading is None or reading.is_device_wide:
            return None
        return max(0, reading.bytes - NOTHING_HELD_BYTES)

    def free_bytes(self) -> int | None:
        """The room for a job: free VRAM on the ComfyUI's GPU plus what it holds beyond
        its CUDA context. None: unknown."""
        _key, gpus = self._comfy()
        free = self._actor.probe.free_bytes(gpus)
        if free is None:
            return None
        return free + (self.held_bytes() or 0)

    def _covers(self, need_bytes: int) -> bool:
        room = self.free_bytes()
        return room is not None and room >= need_bytes

    def _wait_recovered(self, gpus: tuple[str, ...], target_free: int, end: float) -> None:
        """The model left /api/ps before its runner gave the memory back: wait for the free
        VRAM itself, or readings that attribute the used memory to ComfyUI would count
        Ollama's leaving runner as ComfyUI's room."""
        deadline = min(end, self._clock() + RECOVERY_WAIT_S)
        while self._clock() < deadline:
            free = self._actor.probe.free_bytes(gpus)
            if free is not None and free >= target_free:
                return
            if not self._actor.wait(self._actor.poll_s):
                return

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        """Unload idle models until the room covers `need_bytes`. While the room is short
        only because a model serves a request, look again every BUSY_POLL_S until the
        deadline: the job would start paged next to a model that is idle a moment later
        (a chat ends in seconds, and a prompt queued behind a running job starts later)."""
        end = self._clock() + deadline_s
        said: set[str] = set()  # what was already logged (models serving a request ...)
        refused: dict[str, float] = {}  # "key|model" -> when the actor last refused it
        while True:
            done, held_back = self._make_room_once(need_bytes, reason, end, said, refused)
            if done or held_back is None or self._clock() >= end:
                return done
            if self._short_anyway(need_bytes, held_back, reason):
                return False
            if not self._actor.wait(min(BUSY_POLL_S, max(0.0, end - self._clock()))):
                return False

    def _short_anyway(self, need_bytes: int, held_back: _HeldBack, reason: str) -> bool:
        """Whether the room would fall short even with every model held back now unloaded
        (each one's size known): then waiting for them only delays the job."""
        room = self.free_bytes()
        if held_back.bytes is None or room is None or room + held_back.bytes >= need_bytes:
            return False
        logger.info(
            f"Gate: not waiting for {', '.join(held_back.names)} for {reason}: with them "
            f"unloaded the room would still be {format_bytes(room + held_back.bytes)} of the "
            f"{format_bytes(need_bytes)} needed; forwarding now"
        )
        return True

    def _make_room_once(
        self,
        need_bytes: int,
        reason: str,
        end: float,
        said: set[str],
        refused: dict[str, float],
    ) -> tuple[bool, _HeldBack | None]:
        """One pass over the models: whether the room covers the need now, and the models
        a request held back (serving one, or refused by the actor a moment ago; None:
        none serving a request, so waiting gains nothing)."""
        held = _HeldBack()
        is_blocked = False
        if self._covers(need_bytes):
            return True, None
        targets = self._actor.targets()
        comfy_key, comfy_gpus = self._comfy()
        comfy = targets.comfyuis.get(comfy_key) if comfy_key is not None else None
        settings = self._actor.settings
        # VRAM_PRIORITY: an Ollama that ranks above the ComfyUI keeps its models.
        yielding = {
            key: target
            for key, target in targets.ollamas.items()
            if comfy is None or not settings.outranks(target[0], comfy[0])
        }
        # The model servers of the other kinds (llama-swap, llama-server ...), likewise.
        others = {
            key: target
            for key, target in targets.model_servers.items()
            if comfy is None or not settings.outranks(target[0], comfy[0])
        }
        if targets.ollamas and not yielding:
            if "|priority" not in said:  # once per make_room, not once per look
                said.add("|priority")
                logger.info(
                    f"Gate: not unloading Ollama models for {reason}: VRAM_PRIORITY="
                    f"{settings.priority} keeps them (the job may run in low-VRAM mode)"
                )
            if not others:
                return False, None
        for key, (spec, ollama) in yielding.items():
            if comfy_gpus and spec.gpu_uuids and not set(comfy_gpus) & set(spec.gpu_uuids):
                continue  # another GPU: unloading it gives ComfyUI nothing
            try:
                models = ollama.ps()
            except ServiceError as exc:
                logger.debug(f"Gate: cannot read /api/ps of {spec.name}: {exc}")
                held.bytes = None  # what it holds is unknown: waiting may still help
                continue
            wall = self._actor.wall_clock()
            busy = self._busy_models()
            idle = sorted(
                (
                    m
                    for m in models
                    if m.size_vram_bytes > 0
                    and model_key(m.name) not in busy
                    and not seems_busy(m, wall)
                ),
                key=lambda m: expiry_key(m, wall),
            )
            skipped = [m.name for m in models if m not in idle and m.size_vram_bytes > 0]
            is_blocked = is_blocked or bool(skipped)
            for m in models:
                if m.name in skipped:
                    held.add(m.name, m.size_vram_bytes)
            if set(skipped) - said:
                said.update(skipped)
                logger.info(
                    f"Gate: not unloading {', '.join(skipped)} for {reason}: serving a request"
                )
            for m in idle:
                left = end - self._clock()
                if left <= 0 or not self._actor.lock.acquire(timeout=left):
                    return False, None
                try:
                    if self._covers(need_bytes):
                        return True, None
                    free_before = self._actor.probe.free_bytes(comfy_gpus)
                    outcome = self._actor.execute(UnloadOllama(key, m.name, reason))
                finally:
                    self._actor.lock.release()
                self._on_outcome(outcome)
                if outcome.dry_run:
                    return False, None
                if not outcome.ok:
                    held.add(m.name, m.size_vram_bytes)  # tried again at the next look
                if outcome.ok and free_before is not None:
                    self._wait_recovered(comfy_gpus, free_before + m.size_vram_bytes * 9 // 10, end)
                if self._covers(need_bytes):
                    return True, None
        for key, (spec, server) in others.items():
            if comfy_gpus and spec.gpu_uuids and not set(comfy_gpus) & set(spec.gpu_uuids):
                continue
            try:
                state = server.served()
            except ServiceError as exc:
                logger.debug(f"Gate: cannot read {key}: {exc}")
                held.bytes = None  # what it holds is unknown: waiting may still help
                continue
            if not state.can_unload:
                continue
            for x in state.models:
                if not x.is_resident:
                    continue
                if x.is_loading or x.busy is True:
                    is_blocked = True  # serving (or loading for) a request
                    held.add(x.name, None if x.is_loading else x.size_bytes)
                    continue
                last = refused.get(f"{key}|{x.name}")
                if last is not None and self._clock() - last < REFUSED_RETRY_S:
                    held.add(x.name, x.size_bytes)  # may be unloaded at the next try
                    continue  # the actor refused it a moment ago (busy, or busy unknown)
                left = end - self._clock()
                if left <= 0 or not self._actor.lock.acquire(timeout=left):
                    return False, None
                try:
                    if self._covers(need_bytes):
                        return True, None
                    # The actor reads again that the model serves no request, first.
                    outcome = self._actor.execute(UnloadModel(key, x.name, reason))
                finally:
                    self._actor.lock.release()
                self._on_outcome(outcome)
                if not outcome.ok:  # asked again after REFUSED_RETRY_S, not on every look
                    refused[f"{key}|{x.name}"] = self._clock()
                    held.add(x.name, x.size_bytes)
                if outcome.dry_run:
                    return False, None
                if self._covers(need_bytes):
                    return True, None
        if self._covers(need_bytes):
            return True, None
        return False, held if is_blocked else None
