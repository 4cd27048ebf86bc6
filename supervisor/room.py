"""The gate's `ports.RoomMaker`: free ComfyUI's VRAM before Ollama loads a model.

Policy: only the ComfyUI(s) on Ollama's GPU(s) that hold more than their CUDA context
are freed, soft then hard, until free VRAM covers the need or the deadline passes. It
shares the Actor's lock with the loop, so a gate free never overlaps a loop action, and
gives up (False) when it cannot take the lock in time. Every free it does is reported
through `on_outcome` so the policy can escalate it and does not repeat it. In dry run it
stops after the first "would free".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from supervisor.actions import Actor, holds_nothing
from supervisor.errors import ServiceError
from supervisor.model import FreeComfy, FreeResult, FreeStage, Outcome, Priority


class ComfyRoomMaker:
    """`ports.RoomMaker` for the gate: frees the ComfyUI(s) on Ollama's GPU, soft then
    hard, until free VRAM covers the need. Shares the Actor's lock with the loop.

    A busy ComfyUI is freed only under VRAM_PRIORITY=ollama (the flags then wait for its
    prompt); under balanced and comfyui a running generation's models are left alone."""

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

    def free_bytes(self) -> int | None:
        # The model lands on one of Ollama's GPUs (the one with the most free memory
        # among them); another GPU's free memory is no room for it.
        return self._actor.probe.free_bytes(self._actor.targets().ollama_gpus)

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        end = self._clock() + deadline_s
        if not self._actor.lock.acquire(timeout=max(deadline_s, 0.0)):
            return False
        try:
            free = self.free_bytes()
            if free is not None and free >= need_bytes:
                return True
            targets = self._actor.targets()
            gpus = set(targets.ollama_gpus)
            settings = self._actor.settings
            for key, (spec, comfy) in targets.comfyuis.items():
                if gpus and spec.gpu_uuids and not gpus & set(spec.gpu_uuids):
                    continue  # another GPU: freeing it gives Ollama nothing
                if holds_nothing(self._actor.probe.comfy_reading(key)):
                    # Only its CUDA context (Ollama's own models fill the GPU): freeing
                    # it gives nothing, and verifying that would hold the request.
                    logger.debug(f"Not freeing ComfyUI {spec.name} for the gate: it holds nothing")
                    continue
                try:
                    busy = comfy.queue().is_busy
                except ServiceError:
                    busy = False
                if busy and settings.priority is not Priority.OLLAMA:
                    logger.info(
                        f"Not freeing ComfyUI {spec.name} for the gate: it has work "
                        f"and VRAM_PRIORITY={settings.priority}"
                    )
                    continue
                for stage in (FreeStage.SOFT, FreeStage.HARD):
                    left = end - self._clock()
                    if left <= 0:
                        return False
                    outcome = self._actor.free_comfy(
                        FreeComfy(key, stage, reason),
                        wait_pending_s=left if busy else 0.0,
                        verify_s=left,
                    )
                    self._on_outcome(outcome)
                    if outcome.dry_run:
                        return False
                    free = self.free_bytes()
                    if free is not None and free >= need_bytes:
                        return True
                    if free is None and outcome.result is FreeResult.FREED:
                        return True  # cannot measure the room; the free did its part
            return False
        finally:
            self._actor.lock.release()
