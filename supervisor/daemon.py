"""The loop: wake (event or tick) -> observe -> decide -> act -> record.

Policy:
- Each pass re-reads everything it needs (`observe.Observer`: Docker, the services' APIs,
  NVML), so a lost or duplicated Docker event cannot corrupt state; events only wake the
  loop early. Docker being unreachable never stops the loop (see `observe`).
- The Actor's safety limit caps actions per service per minute (the loop's, the gates'
  and a heal's own), on top of the policy's own rate limits, so a flapping or lying
  service cannot cause an action storm (`actions`).
- Every outcome, the gate's included, is folded into the policy state with `record()`; an
  action not carried out (safety limit, stopping) is recorded as a FAILED outcome with a
  "skipped: ..." detail, so the policy does not wait on it.
- `stop()` (signals) sets a flag and wakes the loop; verify waits sleep on the same flag.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from loguru import logger

from supervisor import policy
from supervisor.actions import PRELOAD_TIMEOUT_S, Actor
from supervisor.config import Settings
from supervisor.metrics import Metrics
from supervisor.model import Action, Decision, FreeResult, Observation, Outcome, PolicyState
from supervisor.observe import Observer
from supervisor.ports import ComfyApi, DockerApi, EventSource, GpuReader, ModelServerApi, OllamaApi
from supervisor.probe import LiveProbe
from supervisor.room import ComfyRoomMaker
from supervisor.room_image import OllamaRoomMaker
from supervisor.room_server import JobRoomFreer
from supervisor.snapshot import docker_word, observation_json, outcome_json

Decide = Callable[[Observation, PolicyState, Settings, float], Decision]
Record = Callable[[PolicyState, Outcome, float], PolicyState]

RECENT_ACTIONS = 50
# Reads one pass may wait on, each up to VRAM_REQUEST_TIMEOUT (a client retries once).
READS_PER_PASS = 4


class Daemon:
    """Owns the loop, the Observer (and through it the adapters) and the Actor. `run()`
    blocks until `stop()`."""

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
        self.settings = settings
        # Stand-ins let the loop be tested without the real policy.
        self._decide: Decide = decide or policy.decide
        self._record: Record = record or policy.record
        self._stop = threading.Event()
        self._observer = Observer(
            settings,
            ollama_client=ollama_client,
            comfy_client=comfy_client,
            docker=docker,
            gpu=gpu,
            clock=clock,
            wall_clock=wall_clock,
            stop=self._stop,
        )
        self._events = events if self._observer.uses_docker else None
        self.metrics = metrics
        if metrics is not None and self._events is not None:
            source = self._events
            metrics.watch_docker_events(lambda: bool(source.connected))
        # Set by cli when the gate runs: its state for /status (see snapshot.gate_json).
        self.gate_status: Callable[[], dict[str, Any]] | None = None
        # Set by the assembly once the Ollama gate started: whether it serves now
        # (`Observation.ollama_gated`). VRAM_GATE_PORT alone does not make Ollama gated.
        self.ollama_gate_serving: Callable[[], bool] | None = None
        self._said_gate_off = False  # logged that VRAM_GATE_PORT is set but no gate serves
        self._clock = clock
        self._wall = wall_clock
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards what snapshot() reads
        self._state = PolicyState()
        self._last_obs: Observation | None = None
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ACTIONS)
        self.last_pass_at: float | None = None  # monotonic
        self.last_pass_wall: float | None = None
        self.busy_since: float | None = None  # monotonic start of the running action
        self.pass_started_at: float | None = None  # monotonic start of the pass under way
        self.actor = Actor(
            settings,
            probe=LiveProbe(self._observer),
            targets=lambda: self._observer.targets,
            docker=lambda: self._observer.docker,
            clock=clock,
            wall_clock=wall_clock,
            sleep=actor_sleep,
            stop=self._stop,
            poll_s=poll_s,
        )
        self._external: list[Outcome] = []  # the gate's outcomes, folded in by the loop
        self.room_maker = ComfyRoomMaker(self.actor, clock, on_outcome=self._gate_outcome)
        # The model-server gates' RoomMaker: frees idle job servers before such a load.
        self.job_room_freer = JobRoomFreer(self.actor, clock, on_outcome=self._gate_outcome)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Only sets flags: safe from a signal handler."""
        self._stop.set()
        self._wake.set()

    @property
    def is_stopping(self) -> bool:
        return self._stop.is_set()

    def on_docker_event(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.docker_event()
        logger.debug(f"Docker event: {kind}")
        self._observer.mark_docker_stale()
        self._wake.set()

    def run(self) -> None:
        """Pass after pass until stop(); a failing pass is logged and the loop goes on."""
        if self._events is not None:
            try:
                self._events.start(self.on_docker_event)
            except Exception as exc:  # noqa: BLE001 - events are optional: polling covers them
                logger.warning(f"Docker events are not followed ({exc}); polling only")
        try:
            while not self._stop.is_set():
                self._wake.clear()
                wake_in = self.settings.check_interval_s
                try:
                    wake_in = self.run_once().wake_in_s
                except Exception as exc:  # noqa: BLE001 - a failing pass must not end the loop
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
                except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever stop() does
                    logger.debug(f"Stopping Docker events: {exc}")

    def close(self) -> None:
        self.stop()
        self._observer.close()

    # ------------------------------------------------------------------ one pass

    def current_ollama(self) -> OllamaApi | None:
        """The Ollama the gate forwards to: the first running one (fixed URL or container)."""
        ollamas = self._observer.targets.ollamas
        return next(iter(ollamas.values()))[1] if ollamas else None

    def current_servers(self, role: str) -> list[tuple[str, str, ModelServerApi]]:
        """Where a model-server gate forwards: (key, base URL, client) of every running
        model server of `role` (fixed URLs and containers), in the order they are known."""
        return [
            (key, spec.url, api)
            for key, (spec, api) in self._observer.targets.model_servers.items()
            if spec.role == role
        ]

    def current_comfyui_url(self) -> str | None:
        """Where the image gate forwards: the first running ComfyUI (fixed URL or container)."""
        comfyuis = self._observer.targets.comfyuis
        return next(iter(comfyuis.values()))[1].base_url if comfyuis else None

    def image_room_maker(self, busy_models: Callable[[], frozenset[str]]) -> OllamaRoomMaker:
        """The image gate's RoomMaker: unloads idle Ollama models through the Actor, and
        reports them to the loop like the gate's frees."""
        return OllamaRoomMaker(self.actor, busy_models, self._clock, on_outcome=self._gate_outcome)

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
        self._say_if_the_gate_is_off(obs)
        decision = self._decide(obs, self._state, self.settings, self._clock())
        self._state = decision.state
        for note in decision.notes:
            logger.info(note)
        for why in decision.reasons_skipped:
            logger.debug(why)
        for action in decision.actions:
            refusal = "the supervisor is stopping" if self._stop.is_set() else None
            if refusal is not None:
                self._skip(action, refusal)
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

    def _say_if_the_gate_is_off(self, obs: Observation) -> None:
        """Once (again after the gate served meanwhile): VRAM_GATE_PORT is set but no Ollama
        gate serves, so the policy's trigger 4 acts as it does without a gate."""
        is_off = self.settings.gate_port is not None and not obs.ollama_gated
        if is_off and not self._said_gate_off:
            logger.warning(
                f"VRAM_GATE_PORT={self.settings.gate_port} is set, but the Ollama gate is not "
                "serving: trigger 4 acts as it does without a gate (it leaves idle Ollama "
                "models loaded for a ComfyUI job under Dynamic VRAM, since nothing would hold "
                "a reload during the job until there is room)"
            )
        self._said_gate_off = is_off

    def _skip(self, action: Action, why: str) -> None:
        """Tell the policy an action it decided was not carried out, so the episode it
        opened closes now instead of waiting EPISODE_STALE_S for an outcome."""
        outcome = Outcome(
            action, self._clock(), ok=False, result=FreeResult.FAILED, detail=f"skipped: {why}"
        )
        self._state = self._record(self._state, outcome, self._clock())

    def _remember(self, outcome: Outcome) -> None:
        entry = outcome_json(outcome, self._wall())
        with self._lock:
            self._recent.append(entry)

    def observe(self) -> Observation:
        """One observation (also what `status` and `free` use without the loop)."""
        obs = self._observer.observe()
        serving = self.ollama_gate_serving
        if serving is not None and serving():
            obs = replace(obs, ollama_gated=True)
        with self._lock:
            self._last_obs = obs
        return obs

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
            "docker": docker_word(self._observer.docker_ok),
            "vram_source": obs.source.value if obs else None,
            "services": self._observer.service_states(),
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
            "priority": str(self.settings.priority),
            "last_pass_wall_time": last_wall,
            "docker": {
                "in_use": self._observer.uses_docker,
                "state": docker_word(self._observer.docker_ok),
                "reconnects": self._events.reconnects if self._events is not None else None,
            },
            **observation_json(obs),
            "gate": self._gate_json(),
            "recent_actions": recent,
        }

    def _gate_json(self) -> dict[str, Any] | None:
        """The gate's state (None: the gate is off)."""
        gate_status = self.gate_status
        if gate_status is None:
            return None
        try:
            return gate_status()
        except Exception as exc:  # noqa: BLE001 - /status must answer even so
            logger.debug(f"Reading the gate's state: {exc}")
            return {"error": str(exc)}
