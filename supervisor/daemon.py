"""The loop: wake (event or tick) -> observe -> decide -> act -> record.

Policy:
- Each pass re-reads everything it needs (Docker, the services' APIs, NVML), so a lost or
  duplicated Docker event cannot corrupt state; events only wake the loop early.
- Docker is listed when an event said something changed, and at least once per
  VRAM_CHECK_INTERVAL. When Docker cannot be reached the last known services are kept and
  Docker is retried every pass; the loop never stops for it.
- No request goes to a stopped container. Each running service is read in parallel, with
  its own count of consecutive failures. Every failure is logged, with the log noise backed
  off (1st, 2nd, 4th, 8th ... failure in a row), never the loop.
- VRAM figures come from NVML when it works, else from the services' APIs; the source is
  logged once and whenever it changes.
- A safety limit caps actions per service per minute on top of the policy's own rate
  limits, so a flapping or lying service cannot cause an action storm.
- `stop()` (signals) sets a flag and wakes the loop; verify waits sleep on the same flag.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loguru import logger

from supervisor.actions import PRELOAD_TIMEOUT_S, Actor, Reading, Targets, format_bytes
from supervisor.config import Settings
from supervisor.errors import ServiceError
from supervisor.metrics import Metrics
from supervisor.model import (
    Action,
    ComfyObservation,
    ComfyQueue,
    ComfyStats,
    Decision,
    GpuMemory,
    Observation,
    OllamaModel,
    OllamaObservation,
    Outcome,
    PolicyState,
    Role,
    ServiceHealth,
    ServiceSpec,
    ServiceStatus,
    VramSource,
)
from supervisor.ports import ComfyApi, DockerApi, EventSource, GpuProcess, GpuReader, OllamaApi
from supervisor.room import ComfyRoomMaker
from supervisor.vram.api import comfy_vram_bytes, gpus_from_api, ollama_vram_bytes
from supervisor.vram.attribution import Attribution, attribute

Decide = Callable[[Observation, PolicyState, Settings, float], Decision]
Record = Callable[[PolicyState, Outcome, float], PolicyState]

MAX_ACTIONS_PER_SERVICE_PER_MIN = 6
RECENT_ACTIONS = 50
# Reads one pass may wait on, each up to VRAM_REQUEST_TIMEOUT (a client retries once).
READS_PER_PASS = 4
# Passes without an answer after which a ComfyUI counts as hung (as in the policy).
DEAD_API_CHECKS = 3


def noisy(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th ... occurrence of a repeated failure."""
    return count > 0 and count & (count - 1) == 0


@dataclass
class _Service:
    spec: ServiceSpec
    is_running: bool
    health: ServiceHealth = ServiceHealth.NONE
    failures: int = 0
    error: str | None = None
    client: Any = None  # OllamaApi | ComfyApi, built for spec.url


@dataclass(frozen=True)
class _Read:
    models: tuple[OllamaModel, ...] | None = None
    queue: ComfyQueue | None = None
    stats: ComfyStats | None = None
    error: str | None = None


class Daemon:
    """Owns the loop and the adapters it reads. `run()` blocks until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        ollama_client: Callable[[str], OllamaApi],
        comfy_client: Callable[[str], ComfyApi],
        docker: Callable[[], DockerApi] | None = None,
        events: EventSource | None = None,
        gpu: GpuReader | None = None,
        decide: Decide | None = None,
        record: Record | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        actor_sleep: Callable[[float], object] | None = None,
        poll_s: float = 0.25,
    ) -> None:
        if decide is None or record is None:
            from supervisor import policy  # lazy: the loop can be tested with a stand-in

            decide = decide or policy.decide
            record = record or policy.record
        self.settings = settings
        self._decide: Decide = decide
        self._record: Record = record
        self._docker_factory = docker if settings.needs_docker else None
        self._docker: DockerApi | None = None
        self._events = events if self._docker_factory else None
        self._gpu = gpu
        self._make_ollama = ollama_client
        self._make_comfy = comfy_client
        self.metrics = metrics
        self._clock = clock
        self._wall = wall_clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards what snapshot() reads
        self._services: dict[str, _Service] = {}
        self._state = PolicyState()
        self._targets = Targets()
        self._pids: dict[str, tuple[int, ...]] = {}
        self._foreign_pids: set[int] = set()
        self._source: VramSource | None = None
        self._docker_ok: bool | None = None
        self._docker_failures = 0
        self._docker_dirty = True
        self._docker_listed_at: float | None = None
        self._nvml_failures = 0
        self._listed: dict[str, tuple[ServiceSpec, bool, ServiceHealth]] = {}
        self._last_obs: Observation | None = None
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ACTIONS)
        self._action_times: dict[str, deque[float]] = {}
        self.last_pass_at: float | None = None  # monotonic
        self.last_pass_wall: float | None = None
        self.busy_since: float | None = None  # monotonic start of the running action
        self.pass_started_at: float | None = None  # monotonic start of the pass under way
        self.actor = Actor(
            settings,
            probe=_LiveProbe(self),
            targets=lambda: self._targets,
            docker=lambda: self._docker,
            clock=clock,
            sleep=actor_sleep,
            stop=self._stop,
            poll_s=poll_s,
        )
        self._external: list[Outcome] = []  # the gate's outcomes, folded in by the loop
        self.room_maker = ComfyRoomMaker(self.actor, clock, on_outcome=self._gate_outcome)
        self._fixed = {
            role: url
            for role, url in (
                (Role.OLLAMA, settings.ollama_url),
                (Role.COMFYUI, settings.comfyui_url),
            )
            if url
        }

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Only sets flags: safe from a signal handler."""
        self._stop.set()
        self._wake.set()

    @property
    def is_stopping(self) -> bool:
        return self._stop.is_set()

    def wake(self) -> None:
        self._wake.set()

    def on_docker_event(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.docker_event()
        logger.debug(f"Docker event: {kind}")
        self._docker_dirty = True
        self._wake.set()

    def run(self) -> None:
        """Pass after pass until stop(); a failing pass is logged and the loop goes on."""
        if self._events is not None:
            try:
                self._events.start(self.on_docker_event)
            except Exception as exc:
                logger.warning(f"Docker events are not followed ({exc}); polling only")
        try:
            while not self._stop.is_set():
                self._wake.clear()
                wake_in = self.settings.check_interval_s
                try:
                    wake_in = self.run_once().wake_in_s
                except Exception as exc:
                    self.pass_started_at = None  # a failed pass is no sign of life
                    if self._stop.is_set():
                        break  # adapters are being closed under us: not worth an error
                    logger.opt(exception=exc).error(f"A pass of the loop failed: {exc}")
                wake_in = min(max(wake_in, 0.05), self.settings.check_interval_s)
                self._wake.wait(wake_in)
        finally:
            if self._events is not None:
                try:
                    self._events.stop()
                except Exception as exc:
                    logger.debug(f"Stopping Docker events: {exc}")

    def close(self) -> None:
        self.stop()
        for service in self._services.values():
            _close(service.client)
        if self._gpu is not None:
            _close(self._gpu)

    # ------------------------------------------------------------------ one pass

    def current_ollama(self) -> OllamaApi | None:
        """The Ollama the gate forwards to: the first running one (fixed URL or container)."""
        ollamas = self._targets.ollamas
        return next(iter(ollamas.values()))[1] if ollamas else None

    def _gate_outcome(self, outcome: Outcome) -> None:
        with self._lock:
            self._external.append(outcome)
        self._wake.set()

    def run_once(self) -> Decision:
        with self._lock:
            self.pass_started_at = self._clock()
            external, self._external = self._external, []
        for outcome in external:
            self._state = self._record(self._state, outcome, self._clock())
            self._remember(outcome)
            if self.metrics is not None:
                self.metrics.record_outcome(outcome, trigger_at=outcome.at)
        obs = self.observe()
        decision = self._decide(obs, self._state, self.settings, self._clock())
        self._state = decision.state
        for note in decision.notes:
            logger.info(note)
        for why in decision.reasons_skipped:
            logger.debug(why)
        for action in decision.actions:
            if self._stop.is_set():
                break
            if not self._allowed(action):
                continue
            self.busy_since = self._clock()
            try:
                outcome = self.actor.execute(action)
            finally:
                self.busy_since = None
            self._state = self._record(self._state, outcome, self._clock())
            self._remember(outcome)
            if self.metrics is not None:
                self.metrics.record_outcome(outcome, trigger_at=obs.at)
        with self._lock:
            self.last_pass_at = self._clock()
            self.last_pass_wall = self._wall()
            self.pass_started_at = None
        if self.metrics is not None:
            self.metrics.observed(obs, self.last_pass_wall)
            if self._events is not None:
                self.metrics.set_docker_reconnects(self._events.reconnects)
        return decision

    def _allowed(self, action: Action) -> bool:
        now = self._clock()
        times = self._action_times.setdefault(action.target, deque())
        while times and now - times[0] > 60.0:
            times.popleft()
        if len(times) >= MAX_ACTIONS_PER_SERVICE_PER_MIN:
            logger.warning(
                f"Skipping {type(action).__name__} on {action.target}: already "
                f"{len(times)} actions on it in the last minute (safety limit)"
            )
            return False
        times.append(now)
        return True

    def _remember(self, outcome: Outcome) -> None:
        action = outcome.action
        entry: dict[str, Any] = {
            "wall_time": self._wall(),
            "action": type(action).__name__,
            "target": action.target,
            "reason": action.reason,
            "ok": outcome.ok,
            "result": outcome.result.value if outcome.result else None,
            "before_bytes": outcome.before_bytes,
            "after_bytes": outcome.after_bytes,
            "duration_s": round(outcome.duration_s, 3),
            "dry_run": outcome.dry_run,
            "detail": outcome.detail,
        }
        for attr in ("stage", "model"):
            if hasattr(action, attr):
                entry[attr] = str(getattr(action, attr))
        with self._lock:
            self._recent.append(entry)

    # ------------------------------------------------------------------ observe

    def observe(self) -> Observation:
        at = self._clock()
        self._refresh_services(at)
        running = [s for s in self._services.values() if s.is_running]
        reads = dict(
            zip([s.spec.key for s in running], _in_parallel(self._read, running), strict=True)
        )
        self._count_failures(running, reads)
        stats = [r.stats for r in reads.values() if r.stats is not None]
        models = [m for r in reads.values() for m in r.models or ()]
        source, gpus, processes = self._read_vram(stats, models)
        attributed = self._attribute(processes, running) if processes is not None else {}

        ollamas: list[OllamaObservation] = []
        comfyuis: list[ComfyObservation] = []
        for service in self._services.values():
            read = reads.get(service.spec.key, _Read())
            status = ServiceStatus(
                spec=service.spec,
                is_running=service.is_running,
                health=service.health,
                is_reachable=service.is_running and read.error is None,
                failed_checks=service.failures,
                error=service.error if service.is_running else "not running",
            )
            attribution = attributed.get(service.spec.key)
            gpu_uuids = attribution.gpu_uuids if attribution else ()
            if service.spec.role is Role.OLLAMA:
                vram = (
                    attribution.vram_bytes
                    if attribution
                    else (ollama_vram_bytes(read.models) if read.models is not None else None)
                )
                ollamas.append(OllamaObservation(status, read.models, vram, gpu_uuids))
            else:
                vram = (
                    attribution.vram_bytes
                    if attribution
                    else (comfy_vram_bytes(read.stats) if read.stats is not None else None)
                )
                comfyuis.append(ComfyObservation(status, read.queue, read.stats, vram, gpu_uuids))

        obs = Observation(
            at=at,
            source=source,
            gpus=gpus,
            ollamas=tuple(ollamas),
            comfyuis=tuple(comfyuis),
            docker_ok=self._docker_ok,
        )
        self._targets = Targets(
            comfyuis={
                s.spec.key: (s.spec, s.client) for s in running if s.spec.role is Role.COMFYUI
            },
            ollamas={s.spec.key: (s.spec, s.client) for s in running if s.spec.role is Role.OLLAMA},
            ollama_gpus=tuple(sorted({u for o in ollamas for u in o.gpu_uuids})),
            dead_comfyuis=frozenset(
                s.spec.key
                for s in running
                if s.spec.role is Role.COMFYUI and s.failures >= DEAD_API_CHECKS
            ),
        )
        with self._lock:
            self._last_obs = obs
        return obs

    def _refresh_services(self, now: float) -> None:
        wanted: dict[str, tuple[ServiceSpec, bool, ServiceHealth]] = {}
        for role, url in self._fixed.items():
            spec = ServiceSpec(role=role, name=role.value, url=url)
            wanted[spec.key] = (spec, True, ServiceHealth.NONE)
        if self._docker_factory is not None:
            listed_at = self._docker_listed_at
            due = listed_at is None or now - listed_at >= self.settings.check_interval_s
            if self._docker_dirty or due or not self._docker_ok:
                self._list_docker(now)
            # While Docker is unreachable this is the last listing that worked.
            wanted.update(self._listed)
        for key in [k for k in self._services if k not in wanted]:
            service = self._services.pop(key)
            if service.is_running and service.spec.is_container:
                logger.warning(f"Lost {service.spec.role} container {service.spec.name} (removed)")
            _close(service.client)
        for key, (spec, is_running, health) in wanted.items():
            self._update_service(key, spec, is_running, health)

    def _list_docker(self, now: float) -> None:
        try:
            if self._docker is None:
                assert self._docker_factory is not None
                self._docker = self._docker_factory()
            containers = self._docker.list_services()
        except Exception as exc:  # DockerUnavailable, or a factory that cannot connect
            self._docker_failures += 1
            if noisy(self._docker_failures):
                logger.warning(
                    f"Docker is unreachable: {exc} (failure {self._docker_failures} in a row; "
                    "keeping the last known services and retrying every pass)"
                )
            self._docker_ok = False
            return
        if self._docker_failures:
            logger.info(f"Docker is reachable again after {self._docker_failures} failures")
        self._docker_failures = 0
        self._docker_ok = True
        self._docker_dirty = False
        self._docker_listed_at = now
        self._listed = {
            c.spec.key: (c.spec, c.is_running, c.health)
            for c in containers
            if c.spec.role not in self._fixed
        }

    def _update_service(
        self, key: str, spec: ServiceSpec, is_running: bool, health: ServiceHealth
    ) -> None:
        service = self._services.get(key)
        if service is None:
            service = _Service(spec, is_running=False)
            self._services[key] = service
        was_running = service.is_running
        if service.spec.url != spec.url:
            _close(service.client)
            service.client = None
            was_running = False
        service.spec, service.is_running, service.health = spec, is_running, health
        if is_running and service.client is None:
            service.client = (self._make_ollama if spec.role is Role.OLLAMA else self._make_comfy)(
                spec.url
            )
        if is_running and not was_running:
            service.failures, service.error = 0, None
            if spec.is_container:
                logger.info(f"Discovered {spec.role} container {spec.name} at {spec.url}")
            else:
                logger.info(f"Using {spec.role} at {spec.url} (fixed URL)")
        elif was_running and not is_running:
            logger.warning(f"Lost {spec.role} container {spec.name} (not running)")

    def _read(self, service: _Service) -> _Read:
        try:
            if service.spec.role is Role.OLLAMA:
                return _Read(models=service.client.ps())
            queue: ComfyQueue | None = None
            stats: ComfyStats | None = None
            errors: list[str] = []
            try:
                queue = service.client.queue()
            except ServiceError as exc:
                errors.append(str(exc))
            try:
                stats = service.client.system_stats()
            except ServiceError as exc:
                errors.append(str(exc))
            # Dead only when nothing answered; one bad endpoint is a partial reading.
            error = "; ".join(errors) if queue is None and stats is None else None
            if errors and error is None:
                logger.debug(f"Partial reading of {service.spec.key}: {'; '.join(errors)}")
            return _Read(queue=queue, stats=stats, error=error)
        except ServiceError as exc:
            return _Read(error=str(exc))
        except Exception as exc:  # an adapter breaking its contract must not stop the loop
            return _Read(error=f"unexpected {type(exc).__name__}: {exc}")

    def _count_failures(self, running: list[_Service], reads: Mapping[str, _Read]) -> None:
        for service in running:
            read = reads[service.spec.key]
            spec = service.spec
            what = (
                f"{spec.role} container {spec.name}"
                if spec.is_container
                else (f"{spec.role} (fixed URL)")
            )
            if read.error is None:
                if service.failures:
                    logger.info(f"{what} answers again after {service.failures} failed checks")
                service.failures, service.error = 0, None
                continue
            service.failures += 1
            service.error = read.error
            if noisy(service.failures):
                logger.warning(
                    f"Cannot read {what}: {read.error} ({service.failures} failed checks in a row)"
                )

    def _read_vram(
        self, stats: list[ComfyStats], models: list[OllamaModel]
    ) -> tuple[VramSource, tuple[GpuMemory, ...], tuple[GpuProcess, ...] | None]:
        gpus: tuple[GpuMemory, ...] = ()
        processes: tuple[GpuProcess, ...] | None = None
        source = VramSource.NONE
        if self._gpu is not None:
            try:
                gpus, processes = self._gpu.gpus(), self._gpu.processes()
                source = VramSource.NVML
                self._nvml_failures = 0
            except Exception as exc:  # NvmlUnavailable, or a reader breaking its contract
                self._nvml_failures += 1
                if noisy(self._nvml_failures):
                    logger.warning(f"NVML reading failed: {exc}; using the services' APIs")
                gpus, processes = (), None
        if source is not VramSource.NVML:
            gpus = gpus_from_api(stats, models)
            source = VramSource.API if gpus else VramSource.NONE
        if source is not self._source:
            logger.info(f"VRAM source: {source}")
            self._source = source
        return source, gpus, processes

    def _attribute(
        self, processes: tuple[GpuProcess, ...], running: list[_Service]
    ) -> dict[str, Attribution]:
        containers = [s for s in running if s.spec.container_id and self._docker is not None]
        if not containers:
            return {}
        # docker top only when the picture changed: a new GPU process (an Ollama runner
        # starts per model) or another set of containers. PIDs of processes outside every
        # container are remembered so they do not cause a re-read on every pass.
        known = {pid for pids in self._pids.values() for pid in pids} | self._foreign_pids
        stale = {s.spec.key for s in containers} != set(self._pids)
        if stale or any(p.pid not in known for p in processes):
            pids: dict[str, tuple[int, ...]] = {}
            for s in containers:
                try:
                    assert self._docker is not None and s.spec.container_id is not None
                    pids[s.spec.key] = self._docker.container_pids(s.spec.container_id)
                except Exception as exc:  # DockerUnavailable; a gone container
                    logger.debug(f"docker top {s.spec.name} failed: {exc}")
            self._pids = pids
            owned = {pid for pids_ in pids.values() for pid in pids_}
            self._foreign_pids = {p.pid for p in processes if p.pid not in owned}
        return attribute(processes, self._pids) if self._pids else {}

    # ------------------------------------------------------------------ status

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive while a pass completed within 3 x VRAM_CHECK_INTERVAL, or the pass under
        way started recently enough for what it may legitimately wait on: service reads
        stuck in their timeouts, or an action (a model reload takes minutes). A hung
        service must not make the supervisor look dead; a stuck loop still shows."""
        now = self._clock()
        limit = 3 * self.settings.check_interval_s
        with self._lock:
            last, started = self.last_pass_at, self.pass_started_at
            obs = self._last_obs
        fresh = last is not None and now - last <= limit
        grace = limit + READS_PER_PASS * self.settings.request_timeout_s
        if self.busy_since is not None:
            grace += PRELOAD_TIMEOUT_S + 3 * self.settings.verify_timeout_s
        in_pass = started is not None and now - started <= grace
        ok = fresh or in_pass
        body: dict[str, Any] = {
            "ok": ok,
            "last_pass_age_s": None if last is None else round(now - last, 3),
            "in_pass_for_s": None if started is None else round(now - started, 3),
            "docker": _docker_word(self._docker_ok),
            "vram_source": obs.source.value if obs else None,
            "services": {
                s.spec.key: ("down" if not s.is_running else "ok" if not s.failures else "failing")
                for s in list(self._services.values())
            },
        }
        return ok, body

    def snapshot(self) -> dict[str, Any]:
        """Everything `status` shows, as JSON-able data."""
        with self._lock:
            obs = self._last_obs
            recent = list(self._recent)
            last_wall = self.last_pass_wall
        return {
            "dry_run": self.settings.dry_run,
            "priority": self.settings.priority.value,
            "last_pass_wall_time": last_wall,
            "docker": {
                "in_use": self._docker_factory is not None,
                "state": _docker_word(self._docker_ok),
                "reconnects": self._events.reconnects if self._events is not None else None,
            },
            "vram_source": obs.source.value if obs else None,
            "gpus": [_gpu_json(g) for g in obs.gpus] if obs else [],
            "ollama": [_ollama_json(o) for o in obs.ollamas] if obs else [],
            "comfyui": [_comfy_json(c) for c in obs.comfyuis] if obs else [],
            "recent_actions": recent,
        }


class _LiveProbe:
    """Fresh readings for the Actor's verification, from the daemon's adapters."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def comfy_reading(self, key: str) -> Reading | None:
        d = self._d
        pids = d._pids.get(key)
        if d._gpu is not None and pids:
            try:
                wanted = set(pids)
                return Reading(
                    sum(p.used_bytes or 0 for p in d._gpu.processes() if p.pid in wanted)
                )
            except Exception as exc:
                logger.debug(f"NVML process reading failed: {exc}")
        target = d._targets.comfyuis.get(key)
        if target is not None:
            try:
                stats = target[1].system_stats()
                if stats.device_type == "cuda":
                    return Reading(comfy_vram_bytes(stats))
            except ServiceError as exc:
                logger.debug(f"ComfyUI stats reading failed: {exc}")
        if d._gpu is not None:
            try:
                return Reading(sum(g.used_bytes for g in d._gpu.gpus()), is_device_wide=True)
            except Exception as exc:
                logger.debug(f"NVML device reading failed: {exc}")
        return None

    def free_bytes(self, gpu_uuid: str | None) -> int | None:
        d = self._d
        if d._gpu is not None:
            try:
                gpus = d._gpu.gpus()
                chosen = [g for g in gpus if g.uuid == gpu_uuid] or list(gpus)
                if chosen:
                    # Unknown GPU: Ollama places a model where it fits best.
                    return max(g.free_bytes for g in chosen)
            except Exception as exc:
                logger.debug(f"NVML device reading failed: {exc}")
        for _, comfy in d._targets.comfyuis.values():
            try:
                stats = comfy.system_stats()
            except ServiceError:
                continue
            if stats.device_type == "cuda":
                # Driver free = ComfyUI's vram_free minus torch's cache (api-facts 2.2).
                return max(0, stats.vram_free_bytes - stats.torch_cached_bytes)
        return None


def _in_parallel(fn: Callable[[_Service], _Read], services: list[_Service]) -> list[_Read]:
    """Read every service at once, so one slow service does not delay the others. Daemon
    threads (not a pool): a read stuck in a timeout never holds up the process's exit."""
    results: list[_Read] = [_Read(error="not read")] * len(services)

    def one(i: int) -> None:
        results[i] = fn(services[i])

    threads = [
        threading.Thread(target=one, args=(i,), name=f"read-{s.spec.key}", daemon=True)
        for i, s in enumerate(services)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _close(thing: object) -> None:
    close = getattr(thing, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:
            logger.debug(f"Closing {thing!r}: {exc}")


def _docker_word(ok: bool | None) -> str:
    return "not used" if ok is None else "ok" if ok else "unreachable"


def _gpu_json(g: GpuMemory) -> dict[str, Any]:
    return {
        "uuid": g.uuid,
        "index": g.index,
        "name": g.name,
        "total_bytes": g.total_bytes,
        "used_bytes": g.used_bytes,
        "free_bytes": g.free_bytes,
        "used_percent": round(g.used_percent, 1),
    }


def _status_json(s: ServiceStatus) -> dict[str, Any]:
    return {
        "key": s.spec.key,
        "name": s.spec.name,
        "url": s.spec.url,
        "container_id": s.spec.container_id,
        "running": s.is_running,
        "health": s.health.value,
        "reachable": s.is_reachable,
        "failed_checks": s.failed_checks,
        "error": s.error,
    }


def _ollama_json(o: OllamaObservation) -> dict[str, Any]:
    models = [
        {
            "name": m.name,
            "size_bytes": m.size_bytes,
            "size_vram_bytes": m.size_vram_bytes,
            "gpu_percent": round(100 * m.gpu_fraction, 1),
            "expires_at": m.expires_at,
        }
        for m in o.models or ()
    ]
    return {
        **_status_json(o.status),
        "vram_bytes": o.vram_bytes,
        "gpu_uuids": list(o.gpu_uuids),
        "models": models if o.models is not None else None,
        "vram": format_bytes(o.vram_bytes),
    }


def _comfy_json(c: ComfyObservation) -> dict[str, Any]:
    queue = {"running": c.queue.running, "pending": c.queue.pending} if c.queue else None
    return {
        **_status_json(c.status),
        "vram_bytes": c.vram_bytes,
        "gpu_uuids": list(c.gpu_uuids),
        "queue": queue,
        "vram": format_bytes(c.vram_bytes),
    }
