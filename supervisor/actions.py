"""Carry out the policy's actions against the adapters, verify each one, report `Outcome`s.

Policy:
- Nothing is trusted on the word of an API. ComfyUI's `POST /free` answers 200 before it
  does anything and Ollama's unload returns before the runner is gone, so every action
  reads VRAM (or /api/ps) afterwards, every `poll_s`, until the effect shows or
  `VRAM_VERIFY_TIMEOUT` passes, and reports what it measured.
- A free is classified FREED (VRAM came back), PENDING (a prompt is running: ComfyUI
  applies the flags after it; never escalate over it), PINNED (idle, nothing released:
  escalate) or FAILED (the API call failed, or VRAM could not be read to verify).
- A restart re-reads ComfyUI's queue and Docker's container list at the moment of acting,
  and refuses if anything runs or waits (a running generation is never killed) or the
  container is no longer running (one the user stopped is never started). Afterwards it
  reads the VRAM like a free: FREED only if it dropped, else PINNED.
- `VRAM_DRY_RUN`: log "DRY RUN: would ..." and send nothing.
- The safety limit: at most MAX_ACTIONS_PER_SERVICE_PER_MIN actions on one service in
  any minute, whoever asks (the loop, the gates, a heal's own frees), on top of the
  policy's rate limits; an action refused at the moment of acting without sending
  anything (the model serves a request, the job server has work) does not count; one
  over it is not sent and reported FAILED with a "skipped: ..."
  detail, logged as a warning. Every action method checks it first (`capped`).
- Never act on a container that opted out: `capped` reads the role label again before
  acting (and a heal reads it again before a request that comes seconds later, after a
  wait), and every request that acts is sent inside `sending`, which pins that container:
  a failed request is retried only while that very container still carries the label (a
  container recreated without it at the same URL between two attempts would otherwise
  get the retry, found by the soak). What no check can close: a recreate between the
  last read and the first attempt (milliseconds, against a recreate's seconds).
- One lock serialises everything that acts on the GPU (the loop's actions and the gate's
  frees), so two frees never overlap. A heal holds it only for its free and its unload,
  not while Ollama unloads and reloads the model (see `ollama_actions`). Adapter errors
  never escape: they become a FAILED outcome.

ComfyUI's free and restart live here; Ollama's unload and heal in `ollama_actions`; the
gate's room maker in `room`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from loguru import logger

from supervisor import ollama_actions, tenant_actions
from supervisor.clients._http import resend_guard
from supervisor.config import Settings
from supervisor.errors import DockerUnavailable, ServiceError
from supervisor.model import (
    Action,
    ComfyQueue,
    FreeComfy,
    FreeJobs,
    FreeResult,
    FreeStage,
    HealOllama,
    Outcome,
    ReloadJobs,
    RestartComfy,
    ServiceSpec,
    UnloadModel,
    UnloadOllama,
    WakeModel,
)
from supervisor.ports import ComfyApi, DockerApi, Probe, Reading, Targets
from supervisor.units import MIB, format_bytes

# A drop smaller than this is noise (allocator jitter), not a free.
MIN_DROP_BYTES = 256 * MIB
# A ComfyUI whose own reading is below this holds only its CUDA context: nothing to free.
NOTHING_HELD_BYTES = 512 * MIB
# How long a verified drop is watched for further release before "after" is reported.
SETTLE_S = 1.0
# A preload dies with its client; give it the time OLLAMA_LOAD_TIMEOUT gives a stall.
PRELOAD_TIMEOUT_S = 300.0
RESTART_STOP_TIMEOUT_S = 10.0
# The safety limit on actions per service per minute (see the module doc); read at each
# check, so a benchmark in compressed time can scale it.
MAX_ACTIONS_PER_SERVICE_PER_MIN = 6


def holds_nothing(reading: Reading | None) -> bool:
    """A ComfyUI's own reading says it holds only its CUDA context: nothing to free. A
    device-wide reading says nothing about ComfyUI, so it never counts as nothing."""
    return reading is not None and not reading.is_device_wide and reading.bytes < NOTHING_HELD_BYTES


def _restart_freed(before: Reading | None, after: Reading | None) -> bool:
    """After a restart: ComfyUI's own reading says it holds nothing, or the reading
    dropped compared with a "before" of the same kind."""
    if after is None:
        return False
    if holds_nothing(after):
        return True
    return (
        before is not None
        and before.is_device_wide == after.is_device_wide
        and _dropped(before, after)
    )


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
        wall_clock: Callable[[], float] = time.time,
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
        self.clock = clock
        self.wall_clock = wall_clock  # Unix time, to judge Ollama's expires_at
        self._stop = stop or threading.Event()
        # Called with a model name just before an unload is sent (the gate forgets it).
        self.unload_listeners: list[Callable[[str], None]] = []
        # (server key, model) of requests in flight through the model-server gates.
        self.in_flight_sources: list[Callable[[], frozenset[tuple[str, str]]]] = []
        # Sleeping on the stop event makes a verify loop end at once on SIGTERM.
        self._sleep = sleep or self._stop.wait
        self.poll_s = poll_s
        self.preload_timeout_s = preload_timeout_s
        self._cap_lock = threading.Lock()
        self._action_times: dict[str, deque[float]] = {}

    # ------------------------------------------------------------------ entry point

    def execute(self, action: Action) -> Outcome:
        try:
            if isinstance(action, HealOllama):
                # A heal takes the lock itself, only while it acts on the GPU: its reload
                # (up to minutes) must not keep the gate from making room meanwhile.
                return self.heal_ollama(action)
            with self.lock:
                if isinstance(action, FreeComfy):
                    return self.free_comfy(action)
                if isinstance(action, RestartComfy):
                    return self.restart_comfy(action)
                if isinstance(action, UnloadModel | WakeModel | FreeJobs | ReloadJobs):
                    refused = self.capped(action)
                    if refused is not None:
                        return refused
                    outcome = tenant_actions.execute(self, action)
                    if not outcome.sent:
                        self._uncount(action.target)  # nothing reached the service
                    return outcome
                return self.unload_ollama(action)
        except Exception as exc:  # noqa: BLE001 - a bug or an adapter's: a failed outcome
            logger.opt(exception=exc).error(f"Action {action!r} crashed: {exc}")
            return Outcome(
                action,
                self.clock(),
                ok=False,
                result=FreeResult.FAILED,
                detail=f"internal error: {exc}",
            )

    def capped(self, action: Action) -> Outcome | None:
        """Whether `action` may run now: None when it may (it is counted by the safety
        limit), else the FAILED outcome to report instead, sent nothing: over the safety
        limit (module doc), or its container no longer carries its role label (it was
        recreated without it, or removed, since the last listing: a container that opted
        out is never acted on). Safe from any thread."""
        now = self.clock()
        if (gone := self.not_ours(action.target)) is not None:
            logger.info(f"Not acting on {action.target}: {gone}")
            return Outcome(
                action,
                now,
                ok=False,
                result=FreeResult.FAILED,
                detail=f"skipped: {gone}",
                sent=False,
            )
        with self._cap_lock:
            times = self._action_times.setdefault(action.target, deque())
            while times and now - times[0] > 60.0:
                times.popleft()
            if len(times) < MAX_ACTIONS_PER_SERVICE_PER_MIN:
                times.append(now)
                return None
            count = len(times)
        why = f"already {count} actions on it in the last minute (safety limit)"
        logger.warning(f"Skipping {type(action).__name__} on {action.target}: {why}")
        return Outcome(action, now, ok=False, result=FreeResult.FAILED, detail=f"skipped: {why}")

    @contextmanager
    def sending(self, target: str) -> Iterator[None]:
        """Around the requests that act on `target` (its label read just before, by
        `capped` or `not_ours`): the container behind it now is the one acted on. Its
        label is read again before any retry, which is not sent once that container is
        gone or lost its label, even if the listing meanwhile dropped it (module doc)."""
        spec = self._spec(target)
        with resend_guard(lambda: self._spec_not_ours(target, spec)):
            yield

    def not_ours(self, target: str) -> str | None:
        """Why the container behind `target` may not be acted on any more (None: it may,
        or it is a fixed URL, or Docker cannot say now: the listing of a moment ago
        stands)."""
        return self._spec_not_ours(target, self._spec(target))

    def _spec(self, target: str) -> ServiceSpec | None:
        t = self.targets()
        found = (
            t.comfyuis.get(target)
            or t.ollamas.get(target)
            or t.model_servers.get(target)
            or t.job_servers.get(target)
        )
        return found[0] if found is not None else None

    def _spec_not_ours(self, target: str, spec: ServiceSpec | None) -> str | None:
        docker = self._docker()
        if spec is None or spec.container_id is None or docker is None:
            return None
        try:
            role = docker.role_label(spec.container_id)
        except DockerUnavailable as exc:
            logger.debug(f"Cannot check the label of {target} before acting: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - an adapter's bug: unknown, so do not act
            logger.opt(exception=exc).warning(f"Reading the label of {target} failed: {exc}")
            return f"its label could not be read ({exc})"
        if role is None:
            return (
                f"its container {spec.container_id[:12]} is gone (removed or recreated) or "
                "no longer carries the vram-supervisor.role label"
            )
        if role != spec.role:
            return f"its container {spec.container_id[:12]} now has the role label {role!r}"
        return None

    def serving(self, target: str) -> frozenset[str] | None:
        """The models of model server `target` with a request in flight through a gate;
        None when a gate could not say (then any of them may be serving one)."""
        found: set[str] = set()
        for source in list(self.in_flight_sources):
            try:
                found |= {model for key, model in source() if key == target}
            except Exception as exc:  # noqa: BLE001 - a gate's bug: say it, act as if unknown
                logger.opt(exception=exc).warning(f"A gate's in-flight reading failed: {exc}")
                return None
        return frozenset(found)

    def _uncount(self, target: str) -> None:
        """Take back the count of an action that sent nothing (refused when acted on)."""
        with self._cap_lock:
            times = self._action_times.get(target)
            if times:
                times.pop()

    def announce_unload(self, model: str) -> None:
        """Tell the listeners (the gate) an unload of `model` is about to be sent."""
        for listener in list(self.unload_listeners):
            try:
                listener(model)
            except Exception as exc:  # noqa: BLE001 - a listener's bug must not stop the unload
                logger.debug(f"An unload listener failed for {model}: {exc}")

    @property
    def is_stopping(self) -> bool:
        return self._stop.is_set()

    def dry(self, action: Action, what: str) -> Outcome:
        """Dry run: log what would be done and report it, sending nothing."""
        logger.bind(target=action.target).info(f"DRY RUN: would {what} ({action.reason})")
        return Outcome(action, self.clock(), ok=True, dry_run=True, detail=f"would {what}")

    def wait(self, seconds: float) -> bool:
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
        if (refused := self.capped(action)) is not None:
            return refused
        start = self.clock()
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
            return self.dry(action, f"free ComfyUI {spec.name} ({action.stage}: {body})")
        log = logger.bind(target=action.target, stage=action.stage.value)
        before = self.probe.comfy_reading(action.target)

        def report(result: FreeResult, detail: str = "", after: Reading | None = None) -> Outcome:
            return Outcome(
                action,
                start,
                ok=result in (FreeResult.FREED, FreeResult.PENDING),
                result=result,
                before_bytes=before.bytes if before else None,
                after_bytes=after.bytes if after else None,
                detail=detail,
                duration_s=self.clock() - start,
            )

        try:
            with self.sending(action.target):
                comfy.free(unload_models=True, free_memory=hard)
        except ServiceError as exc:
            log.warning(f"Could not free ComfyUI {spec.name} ({action.stage}): {exc}")
            return report(FreeResult.FAILED, str(exc))

        watch_s = max(self.settings.verify_timeout_s, wait_pending_s)
        deadline = start + (watch_s if verify_s is None else verify_s)
        after: Reading | None = None
        running = False
        polls = 0
        while True:
            # An idle ComfyUI acts within milliseconds: look early, then every poll_s.
            polls += 1
            if not self.wait(min(self.poll_s, 0.05 * 2**polls)):
                break
            after = self.probe.comfy_reading(action.target)
            if polls == 1 and holds_nothing(before) and after is not None:
                break  # only its CUDA context: no use waiting out the window
            if before is not None and after is not None and _dropped(before, after):
                after = self._settle(action.target, after, deadline)
                took = self.clock() - start
                log.info(
                    f"Freed ComfyUI memory ({action.stage}): {format_bytes(before.bytes)}"
                    f" -> {format_bytes(after.bytes)} in {took:.1f} s on {spec.name}"
                    f" ({action.reason})"
                )
                return report(FreeResult.FREED, after=after)
            running = self._is_running(comfy)
            if running and wait_pending_s <= 0:
                break  # the flags act after the prompt; the next passes re-check
            if self.clock() >= deadline:
                break

        if running:
            log.info(
                f"ComfyUI {spec.name} is running a prompt: the {action.stage} free "
                "takes effect when it ends"
            )
            return report(FreeResult.PENDING, "a prompt is running", after)
        if before is None or after is None:
            log.warning(
                f"Sent the {action.stage} free to ComfyUI {spec.name} but could not "
                "read its VRAM to verify it"
            )
            return report(FreeResult.FAILED, "VRAM could not be read", after)
        if holds_nothing(before):
            log.info(
                f"ComfyUI {spec.name} holds only {format_bytes(before.bytes)}: nothing to free"
            )
            return report(FreeResult.FREED, "nothing held", after)
        log.warning(
            f"ComfyUI {spec.name} is idle but kept its VRAM after the "
            f"{action.stage} free: {format_bytes(before.bytes)} -> {format_bytes(after.bytes)}"
        )
        return report(FreeResult.PINNED, "idle, nothing released", after)

    def _settle(self, key: str, after: Reading, deadline: float) -> Reading:
        """Torch releases in steps; watch briefly so "after" is the settled figure."""
        until = min(deadline, self.clock() + SETTLE_S)
        while self.clock() < until and self.wait(min(self.poll_s, 0.1)):
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
        if (refused := self.capped(action)) is not None:
            return refused
        start = self.clock()
        log = logger.bind(target=action.target)

        def done(
            result: FreeResult,
            detail: str,
            before: Reading | None = None,
            after: Reading | None = None,
        ) -> Outcome:
            return Outcome(
                action,
                start,
                ok=result is FreeResult.FREED,
                result=result,
                before_bytes=before.bytes if before else None,
                after_bytes=after.bytes if after else None,
                detail=detail,
                duration_s=self.clock() - start,
            )

        def refuse(why: str, result: FreeResult = FreeResult.FAILED) -> Outcome:
            log.warning(f"Not restarting ComfyUI {action.target}: {why}")
            return done(result, why)

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
            return self.dry(action, f"restart ComfyUI container {spec.name}")
        # Docker's word now, not the pass's: a container stopped since is never started.
        try:
            listed = docker.list_services()
        except DockerUnavailable as exc:
            return refuse(f"its container's state cannot be checked ({exc})")
        same = next((c for c in listed if c.spec.container_id == spec.container_id), None)
        if same is None:
            renamed = any(c.spec.key == spec.key for c in listed)
            return refuse("it was recreated since" if renamed else "its container is gone")
        if not same.is_running:
            return refuse(f"its container is {same.status} now; a stopped one is never started")
        before = self.probe.comfy_reading(action.target)
        try:
            docker.restart(spec.container_id, RESTART_STOP_TIMEOUT_S)
        except DockerUnavailable as exc:
            log.error(f"Restarting ComfyUI container {spec.name} failed: {exc}")
            return done(FreeResult.FAILED, str(exc), before)
        log.warning(f"Restarted ComfyUI container {spec.name}: {action.reason}")
        after = self._after_restart(action.target, before)
        took = self.clock() - start
        was = format_bytes(before.bytes if before else None)
        if _restart_freed(before, after):
            assert after is not None
            log.info(
                f"ComfyUI {spec.name} after the restart: {was} -> "
                f"{format_bytes(after.bytes)} in {took:.1f} s"
            )
            return done(FreeResult.FREED, "", before, after)
        detail = (
            f"restarted, but its VRAM could not be read within {took:.0f} s"
            if after is None
            else f"restarted, but it still holds {format_bytes(after.bytes)} (before: {was})"
        )
        log.warning(f"ComfyUI {spec.name} {detail}")
        return done(FreeResult.PINNED, detail, before, after)

    def _after_restart(self, key: str, before: Reading | None) -> Reading | None:
        """ComfyUI's reading after its restart, watched until it freed or
        VRAM_VERIFY_TIMEOUT passes: its new processes' NVML memory (PIDs read afresh), or
        torch's reserved bytes once its API answers. A device-wide reading counts only
        to compare with a device-wide "before"."""
        deadline = self.clock() + self.settings.verify_timeout_s
        after: Reading | None = None
        while self.wait(self.poll_s):
            reading = self.probe.comfy_reading(key, fresh_pids=True)
            if reading is not None and (
                not reading.is_device_wide or (before is not None and before.is_device_wide)
            ):
                after = reading
                if _restart_freed(before, after):
                    break
            if self.clock() >= deadline:
                break
        return after

    # ------------------------------------------------------------------ Ollama

    def unload_ollama(self, action: UnloadOllama) -> Outcome:
        if (refused := self.capped(action)) is not None:
            return refused
        return ollama_actions.unload(self, action)

    def heal_ollama(self, action: HealOllama) -> Outcome:
        if (refused := self.capped(action)) is not None:
            return refused
        if action.reload_only:
            return ollama_actions.reload_after_wait(self, action)
        return ollama_actions.heal(self, action)
