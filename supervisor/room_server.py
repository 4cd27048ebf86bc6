"""The RoomMaker of the model-server gates (gate/servers.py): before a model server of the
registry's other kinds loads a model, free the idle job servers on its GPUs.

Policy:
- Which job servers: the ComfyUIs and the job servers of the other kinds that share a GPU
  with the model server (a server whose GPUs are unknown shares every GPU).
- A ComfyUI is freed with its soft free (`/free` unload_models, verified like the loop's);
  one that a fresh reading shows holding nothing beyond its CUDA context is passed over.
  A job server of another kind gets its own free (`FreeJobs` through the Actor, which
  re-reads that it is idle first).
- Running work is never cut: a ComfyUI with a running or pending prompt is passed over,
  unless the model server ranks above it (VRAM_PRIORITY, the vram-supervisor.priority
  label): then it is freed at once with flags that act when its prompt ends, as the
  Ollama gate does under VRAM_PRIORITY=ollama. A busy job server of another kind is never
  freed (its free would not wait for the job).
- Every free holds the Actor's lock (never beside a loop action) and is reported through
  `on_outcome`, so the loop does not repeat it. Returns True when something was freed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from loguru import logger

from supervisor.actions import Actor, holds_nothing
from supervisor.errors import ServiceError
from supervisor.model import FreeComfy, FreeJobs, FreeResult, FreeStage, Outcome


def _shares(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return not a or not b or bool(set(a) & set(b))


class JobRoomFreer:
    """`gate.servers.ServerRoomMaker` over the Actor; see the module doc."""

    def __init__(
        self,
        actor: Actor,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self._actor = actor
        self._clock = clock
        self._on_outcome = on_outcome or (lambda outcome: None)

    def make_room(self, server_key: str, *, reason: str, deadline_s: float) -> bool:
        end = self._clock() + deadline_s
        targets = self._actor.targets()
        server = targets.model_servers.get(server_key)
        if server is None:
            return False
        spec = server[0]
        freed = False
        for key, (comfy_spec, comfy) in targets.comfyuis.items():
            if not _shares(spec.gpu_uuids, comfy_spec.gpu_uuids):
                continue
            if holds_nothing(self._actor.probe.comfy_reading(key, fresh_pids=True)):
                continue
            try:
                busy = comfy.queue().is_busy
            except ServiceError:
                busy = False  # unreadable: judged by its VRAM, as the Ollama gate does
            cut = self._actor.settings.outranks(spec, comfy_spec)
            if busy and not cut:
                logger.info(
                    f"Gate: not freeing {key} for {server_key}: it has work and "
                    f"{server_key} does not rank above it (VRAM_PRIORITY)"
                )
                continue
            action = FreeComfy(key, FreeStage.SOFT, reason)
            outcome = self._locked(
                end,
                functools.partial(self._free_comfy, action, end),
            )
            freed |= outcome is not None and outcome.result is FreeResult.FREED
        for key, (job_spec, _) in targets.job_servers.items():
            if not _shares(spec.gpu_uuids, job_spec.gpu_uuids):
                continue
            outcome = self._locked(
                end, functools.partial(self._actor.execute, FreeJobs(key, reason))
            )
            freed |= outcome is not None and outcome.result is FreeResult.FREED
        return freed

    def _free_comfy(self, action: FreeComfy, end: float) -> Outcome:
        return self._actor.free_comfy(action, verify_s=max(end - self._clock(), 0.0))

    def _locked(self, end: float, act: Callable[[], Outcome]) -> Outcome | None:
        if not self._actor.lock.acquire(timeout=max(end - self._clock(), 0.0)):
            return None
        try:
            outcome = act()
        finally:
            self._actor.lock.release()
        self._on_outcome(outcome)
        return outcome
