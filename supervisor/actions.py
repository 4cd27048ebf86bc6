"""Carry out the policy's actions against the adapters, verify each one, report `Outcome`s.

Policy:
- Nothing is trusted on the word of an API. ComfyUI's `POST /free` answers 200 before it
  does anything and Ollama's unload returns before the runner is gone, so every action
  reads VRAM (or /api/ps) afterwards, every `poll_s`, until the effect shows or
  `VRAM_VERIFY_TIMEOUT` passes, and reports what it measured.
- A free is classified FREED (VRAM came back), PENDING (a prompt is running: ComfyUI
  applies the flags after it; never escalate over it), PINNED (idle, nothing released:
  escalate) or FAILED (the API call failed, or VRAM could not be read to verify).
- A restart re-reads ComfyUI's queue at the moment of acting and refuses if anything runs
  or waits: a running generation is never killed.
- `VRAM_DRY_RUN`: log "DRY RUN: would ..." and send nothing.
- One lock serialises everything that acts on the GPU (the loop's actions and the gate's
  `make_room`), so two frees never overlap. Adapter errors never escape: they become a
  FAILED outcome.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from loguru import logger

from supervisor.config import Settings
from supervisor.errors import DockerUnavailable, ServiceError
from supervisor.model import (
    Action,
    ComfyQueue,
    FreeComfy,
    FreeResult,
    FreeStage,
    HealOllama,
    OllamaModel,
    Outcome,
    Priority,
    RestartComfy,
    ServiceSpec,
    UnloadOllama,
)
from supervisor.ports import ComfyApi, DockerApi, OllamaApi

MIB = 1024**2
GIB = 1024**3
# A drop smaller than this is noise (allocator jitter), not a free.
MIN_DROP_BYTES = 256 * MIB
# A ComfyUI whose own reading is below this holds only its CUDA context: nothing to free.
NOTHING_HELD_BYTES = 512 * MIB
# How long a verified drop is watched for further release before "after" is reported.
SETTLE_S = 1.0
# Ollama waits up to 5 s for VRAM to recover after an unload; we wait as long.
RECOVERY_WAIT_S = 5.0
# A preload dies with its client; give it the time OLLAMA_LOAD_TIMEOUT gives a stall.
PRELOAD_TIMEOUT_S = 300.0
RESTART_STOP_TIMEOUT_S = 10.0


def format_bytes(value: int | None) -> str:
    """12.3 GiB / 512 MiB / unknown: the sizes users see in logs and `status`."""
    if value is None:
        return "unknown"
    if abs(value) >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB"


@dataclass(frozen=True)
class Reading:
    """VRAM attributed to one ComfyUI. `is_device_wide`: the GPU's used bytes (other
    processes included), because nothing narrower could be read."""

    bytes: int
    is_device_wide: bool = False


class Probe(Protocol):
    """Fresh VRAM readings for verification (implemented by the daemon over NVML/APIs)."""

    def comfy_reading(self, key: str) -> Reading | None: ...
    def free_bytes(self, gpu_uuid: str | None) -> int | None: ...


@dataclass(frozen=True)
class Targets:
    """The services that may be acted on now (running ones only), by ServiceSpec.key."""

    comfyuis: Mapping[str, tuple[ServiceSpec, ComfyApi]] = field(default_factory=dict)
    ollamas: Mapping[str, tuple[ServiceSpec, OllamaApi]] = field(default_factory=dict)
    ollama_gpus: tuple[str, ...] = ()  # GPUs Ollama uses (for the gate); () = unknown
    # ComfyUIs whose API has not answered for several passes in a row: a hung ComfyUI may
    # be restarted although its queue cannot be read (the policy's dead-API rule).
    dead_comfyuis: frozenset[str] = frozenset()


def _dropped(before: Reading, after: Reading) -> bool:
    return before.bytes - after.bytes >= max(MIN_DROP_BYTES, before.bytes // 10)


class Actor:
    """Carries out actions one at a time under `lock`; every method returns an Outcome."""

    def __init__(
        self,
        settings: Settings,
        *,
        probe: Probe,
        targets: Callable[[], Targets],
        docker: Callable[[], DockerApi | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        stop: threading.Event | None = None,
        poll_s: float = 0.25,
        preload_timeout_s: float = PRELOAD_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self.probe = probe
        self.targets = targets
        self._docker = docker or (lambda: None)
        self._clock = clock
        self._stop = stop or threading.Event()
        # Sleeping on the stop event makes a verify loop end at once on SIGTERM.
        self._sleep = sleep or self._stop.wait
        self._poll_s = poll_s
        self._preload_timeout_s = preload_timeout_s

    # ------------------------------------------------------------------ entry point

    def execute(self, action: Action) -> Outcome:
        with self.lock:
            try:
                if isinstance(action, FreeComfy):
                    return self.free_comfy(action)
                if isinstance(action, RestartComfy):
                    return self.restart_comfy(action)
                if isinstance(action, UnloadOllama):
                    return self.unload_ollama(action)
                return self.heal_ollama(action)
            except Exception as exc:  # a bug or an adapter breaking its contract
                logger.opt(exception=exc).error(f"Action {action!r} crashed: {exc}")
                return Outcome(
                    action,
                    self._clock(),
                    ok=False,
                    result=FreeResult.FAILED,
                    detail=f"internal error: {exc}",
                )

    def _dry(self, action: Action, what: str) -> Outcome:
        logger.bind(target=action.target).info(f"DRY RUN: would {what} ({action.reason})")
        return Outcome(action, self._clock(), ok=True, dry_run=True, detail=f"would {what}")

    def _wait(self, seconds: float) -> bool:
        """Sleep; False when the supervisor is stopping."""
        self._sleep(seconds)
        return not self._stop.is_set()

    # ------------------------------------------------------------------ ComfyUI free

    def free_comfy(
        self, action: FreeComfy, *, wait_pending_s: float = 0.0, verify_s: float | None = None
    ) -> Outcome:
        """One verified free. `wait_pending_s` > 0 keeps watching while a prompt runs (the
        gate waits for the flags to act); 0 reports PENDING as soon as a prompt is seen.
        `verify_s` caps the whole watch (default VRAM_VERIFY_TIMEOUT)."""
        start = self._clock()
        target = self.targets().comfyuis.get(action.target)
        if target is None:
            return Outcome(
                action,
                start,
                ok=False,
                result=FreeResult.FAILED,
                detail="ComfyUI is not running or not known",
            )
        spec, comfy = target
        hard = action.stage is FreeStage.HARD
        body = (
            '{"unload_models": true, "free_memory": true}' if hard else ('{"unload_models": true}')
        )
        if self.settings.dry_run:
            return self._dry(action, f"free ComfyUI {spec.name} ({action.stage}: {body})")
        log = logger.bind(target=action.target, stage=action.stage.value)
        before = self.probe.comfy_reading(action.target)
        try:
            comfy.free(unload_models=True, free_memory=hard)
        except ServiceError as exc:
            log.warning(f"Could not free ComfyUI {spec.name} ({action.stage}): {exc}")
            return Outcome(
                action,
                start,
                ok=False,
                result=FreeResult.FAILED,
                before_bytes=before.bytes if before else None,
                detail=str(exc),
                duration_s=self._clock() - start,
            )

        watch_s = max(self.settings.verify_timeout_s, wait_pending_s)
        deadline = start + (watch_s if verify_s is None else verify_s)
        after: Reading | None = None
        running = False
        polls = 0
        while True:
            # An idle ComfyUI acts within milliseconds: look early, then every poll_s.
            polls += 1
            if not self._wait(min(self._poll_s, 0.05 * 2**polls)):
                break
            after = self.probe.comfy_reading(action.target)
            if before is not None and after is not None and _dropped(before, after):
                after = self._settle(action.target, after, deadline)
                took = self._clock() - start
                log.info(
                    f"Freed ComfyUI memory ({action.stage}): {format_bytes(before.bytes)}"
                    f" -> {format_bytes(after.bytes)} in {took:.1f} s on {spec.name}"
                    f" ({action.reason})"
                )
                return Outcome(
                    action,
                    start,
                    ok=True,
                    result=FreeResult.FREED,
                    before_bytes=before.bytes,
                    after_bytes=after.bytes,
                    duration_s=took,
                )
            running = self._is_running(comfy)
            if running and wait_pending_s <= 0:
                break  # the flags act after the prompt; the next passes re-check
            if self._clock() >= deadline:
                break

        took = self._clock() - start
        b = before.bytes if before else None
        a = after.bytes if after else None
        if running:
            log.info(
                f"ComfyUI {spec.name} is running a prompt: the {action.stage} free "
                "takes effect when it ends"
            )
            return Outcome(
                action,
                start,
                ok=True,
                result=FreeResult.PENDING,
                before_bytes=b,
                after_bytes=a,
                detail="a prompt is running",
                duration_s=took,
            )
        if before is None or after is None:
            log.warning(
                f"Sent the {action.stage} free to ComfyUI {spec.name} but could not "
                "read its VRAM to verify it"
            )
            return Outcome(
                action,
                start,
                ok=False,
                result=FreeResult.FAILED,
                before_bytes=b,
                after_bytes=a,
                detail="VRAM could not be read",
                duration_s=took,
            )
        if not before.is_device_wide and before.bytes < NOTHING_HELD_BYTES:
            log.info(
                f"ComfyUI {spec.name} holds only {format_bytes(before.bytes)}: nothing to free"
            )
            return Outcome(
                action,
                start,
                ok=True,
                result=FreeResult.FREED,
                before_bytes=b,
                after_bytes=a,
                detail="nothing held",
                duration_s=took,
            )
        log.warning(
            f"ComfyUI {spec.name} is idle but kept its VRAM after the "
            f"{action.stage} free: {format_bytes(b)} -> {format_bytes(a)}"
        )
        return Outcome(
            action,
            start,
            ok=False,
            result=FreeResult.PINNED,
            before_bytes=b,
            after_bytes=a,
            detail="idle, nothing released",
            duration_s=took,
        )

    def _settle(self, key: str, after: Reading, deadline: float) -> Reading:
        """Torch releases in steps; watch briefly so "after" is the settled figure."""
        until = min(deadline, self._clock() + SETTLE_S)
        while self._clock() < until and self._wait(min(self._poll_s, 0.1)):
            again = self.probe.comfy_reading(key)
            if again is None or again.bytes >= after.bytes:
                break
            after = again
        return after

    @staticmethod
    def _is_running(comfy: ComfyApi) -> bool:
        try:
            return comfy.queue().running > 0
        except ServiceError:
            return False

    # ------------------------------------------------------------------ ComfyUI restart

    def restart_comfy(self, action: RestartComfy) -> Outcome:
        start = self._clock()

        def refuse(why: str, result: FreeResult = FreeResult.FAILED) -> Outcome:
            logger.bind(target=action.target).warning(
                f"Not restarting ComfyUI {action.target}: {why}"
            )
            return Outcome(
                action,
                start,
                ok=False,
                result=result,
                detail=why,
                duration_s=self._clock() - start,
            )

        target = self.targets().comfyuis.get(action.target)
        if target is None:
            return refuse("it is not running or not known")
        spec, comfy = target
        if spec.container_id is None:
            return refuse("it has a fixed URL, no container to restart")
        docker = self._docker()
        if docker is None:
            return refuse("Docker is not available")
        # The guard is re-checked now: the observation that led here may be seconds old.
        try:
            queue = comfy.queue()
        except ServiceError as exc:
            if action.target not in self.targets().dead_comfyuis:
                return refuse(
                    f"its queue cannot be read ({exc}), so a generation may be running",
                    FreeResult.PENDING,
                )
            queue = ComfyQueue(running=0, pending=0)  # hung: nothing can be generating
        if queue.is_busy:
            return refuse(
                f"a generation is running or queued ({queue.running} running, "
                f"{queue.pending} pending)",
                FreeResult.PENDING,
            )
        if self.settings.dry_run:
            return self._dry(action, f"restart ComfyUI container {spec.name}")
        before = self.probe.comfy_reading(action.target)
        try:
            docker.restart(spec.container_id, RESTART_STOP_TIMEOUT_S)
        except DockerUnavailable as exc:
            logger.bind(target=action.target).error(
                f"Restarting ComfyUI container {spec.name} failed: {exc}"
            )
            return Outcome(
                action,
                start,
                ok=False,
                result=FreeResult.FAILED,
                detail=str(exc),
                duration_s=self._clock() - start,
            )
        logger.bind(target=action.target).warning(
            f"Restarted ComfyUI container {spec.name}: {action.reason}"
        )
        return Outcome(
            action,
            start,
            ok=True,
            result=FreeResult.FREED,
            before_bytes=before.bytes if before else None,
            duration_s=self._clock() - start,
        )

    # ------------------------------------------------------------------ Ollama

    def _find(self, ollama: OllamaApi, model: str) -> OllamaModel | None:
        return next((m for m in ollama.ps() if m.name == model), None)

    def _wait_gone(self, ollama: OllamaApi, model: str, deadline: float) -> bool:
        """The unload is asynchronous: the model leaves /api/ps when its runner stops."""
        while True:
            try:
                if self._find(ollama, model) is None:
                    return True
            except ServiceError:
                pass
            if self._clock() >= deadline or not self._wait(self._poll_s):
                return False

    def unload_ollama(self, action: UnloadOllama) -> Outcome:
        start = self._clock()
        target = self.targets().ollamas.get(action.target)
        if target is None:
            return Outcome(action, start, ok=False, detail="Ollama is not running or not known")
        spec, ollama = target
        if self.settings.dry_run:
            return self._dry(action, f"unload Ollama model {action.model} on {spec.name}")
        log = logger.bind(target=action.target, model=action.model)
        try:
            found = self._find(ollama, action.model)
            ollama.unload(action.model)
        except ServiceError as exc:
            log.warning(f"Could not unload Ollama model {action.model}: {exc}")
            return Outcome(
                action, start, ok=False, detail=str(exc), duration_s=self._clock() - start
            )
        before = found.size_vram_bytes if found else None
        gone = self._wait_gone(ollama, action.model, start + self.settings.verify_timeout_s)
        took = self._clock() - start
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

    def heal_ollama(self, action: HealOllama) -> Outcome:
        """Free the room, unload the spilled model, wait until VRAM is back, load it again."""
        start = self._clock()
        targets = self.targets()
        target = targets.ollamas.get(action.target)
        if target is None:
            return Outcome(action, start, ok=False, detail="Ollama is not running or not known")
        spec, ollama = target
        if self.settings.dry_run:
            return self._dry(
                action,
                f"heal Ollama model {action.model} on {spec.name} "
                f"(free {', '.join(action.free_first) or 'nothing'}, unload, "
                "preload)",
            )
        log = logger.bind(target=action.target, model=action.model)

        def fail(detail: str) -> Outcome:
            log.warning(f"Could not heal Ollama model {action.model}: {detail}")
            return Outcome(action, start, ok=False, detail=detail, duration_s=self._clock() - start)

        try:
            model = self._find(ollama, action.model)
        except ServiceError as exc:
            return fail(str(exc))
        if model is None:
            return fail("it is no longer loaded")
        for key in action.free_first:
            if key in targets.comfyuis:
                self.free_comfy(FreeComfy(key, FreeStage.HARD, f"heal {action.model}"))
        gpu = targets.ollama_gpus[0] if len(targets.ollama_gpus) == 1 else None
        free = self.probe.free_bytes(gpu)
        if free is not None and free + model.size_vram_bytes < model.size_bytes:
            return fail(
                f"not enough room: {format_bytes(free + model.size_vram_bytes)} would "
                f"be free, {format_bytes(model.size_bytes)} needed; it would spill again"
            )
        try:
            ollama.unload(action.model)
        except ServiceError as exc:
            return fail(f"unload failed: {exc}")
        if not self._wait_gone(
            ollama, action.model, self._clock() + self.settings.verify_timeout_s
        ):
            return fail("it is still in use, the unload waits for its requests")
        if free is not None:
            self._wait_recovered(gpu, free + model.size_vram_bytes * 3 // 4)
        if self._stop.is_set():
            return fail("the supervisor is stopping")
        try:
            ollama.preload(action.model, self._preload_timeout_s)
            healed = self._find(ollama, action.model)
        except ServiceError as exc:
            return fail(f"reload failed: {exc}")
        after = healed.gpu_fraction if healed else 0.0
        took = self._clock() - start
        before_pct, after_pct = round(model.gpu_fraction * 100), round(after * 100)
        ok = healed is not None and after > model.gpu_fraction
        if ok:
            log.info(
                f"Healed Ollama model {action.model}: {before_pct}% -> {after_pct}% "
                f"on GPU in {took:.1f} s ({action.reason})"
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
            before_bytes=model.size_vram_bytes,
            after_bytes=healed.size_vram_bytes if healed else None,
            after_fraction=after,
            duration_s=took,
        )

    def _wait_recovered(self, gpu: str | None, target_free: int) -> None:
        deadline = self._clock() + RECOVERY_WAIT_S
        while self._clock() < deadline and self._wait(self._poll_s):
            free = self.probe.free_bytes(gpu)
            if free is not None and free >= target_free:
                return


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
        gpus = self._actor.targets().ollama_gpus
        return self._actor.probe.free_bytes(gpus[0] if len(gpus) == 1 else None)

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
