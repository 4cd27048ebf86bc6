"""Prometheus metrics, registered on a registry the caller passes in (never the global one).

Counters count what was sent (dry-run outcomes are not counted: nothing was sent). Gauges
that describe the world (GPU memory, per-container VRAM, model GPU share, queue lengths)
are produced at scrape time from the latest observation by a custom collector, so a
container that went away disappears from /metrics instead of keeping a stale value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor.model import (
    FreeComfy,
    FreeJobs,
    FreeResult,
    FreeStage,
    HealOllama,
    Observation,
    Outcome,
    RestartComfy,
    UnloadModel,
    UnloadOllama,
)

FREE_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)


class Metrics:
    """Every metric of the supervisor. Thread-safe (prometheus-client is)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.frees = Counter(
            "vram_supervisor_frees",
            "ComfyUI frees sent, by stage (soft/hard) and verified result "
            "(freed/pending/pinned/failed).",
            ["stage", "result"],
            registry=registry,
        )
        self.restarts = Counter(
            "vram_supervisor_restarts", "ComfyUI containers restarted.", registry=registry
        )
        self.heals = Counter(
            "vram_supervisor_heals",
            "Ollama models healed (unloaded and reloaded), by result (ok/failed).",
            ["result"],
            registry=registry,
        )
        self.job_frees = Counter(
            "vram_supervisor_job_server_frees",
            "Frees of job servers of other kinds (A1111/Forge, InvokeAI ...), by role and "
            "result (freed, pinned, failed).",
            labelnames=["role", "result"],
            registry=registry,
        )
        self.model_unloads = Counter(
            "vram_supervisor_model_unloads",
            "Models of other model servers (llama-server, llama-swap ...) unloaded to make "
            "room for a job server, by the server's role.",
            labelnames=["role"],
            registry=registry,
        )
        self.unloads = Counter(
            "vram_supervisor_ollama_unloads",
            "Ollama models unloaded to make room for ComfyUI.",
            registry=registry,
        )
        self.docker_events = Counter(
            "vram_supervisor_docker_events",
            "Docker container events received.",
            registry=registry,
        )
        self.docker_reconnects = Counter(
            "vram_supervisor_docker_reconnects",
            "Reconnections of the Docker events stream.",
            registry=registry,
        )
        self.free_duration = Histogram(
            "vram_supervisor_free_duration_seconds",
            "Seconds from the observation that triggered a free to the verified free.",
            buckets=FREE_BUCKETS_S,
            registry=registry,
        )
        self.last_pass = Gauge(
            "vram_supervisor_last_pass_timestamp_seconds",
            "Unix time at which the loop last completed a pass.",
            registry=registry,
        )
        # Every label combination exists from the start (at 0), so the first failure is an
        # increase Prometheus can see (a series born at 1 shows no increase).
        for stage in (FreeStage.SOFT, FreeStage.HARD):
            for result in FreeResult:
                self.frees.labels(stage=stage.value, result=result.value)
        for heal_result in ("ok", "failed"):
            self.heals.labels(result=heal_result)
        self._lock = threading.Lock()
        self._observation: Observation | None = None
        self._reconnects_seen = 0
        registry.register(_ObservationCollector(self))

    def record_outcome(self, outcome: Outcome, trigger_at: float | None = None) -> None:
        if outcome.dry_run:
            return
        action = outcome.action
        if isinstance(action, FreeComfy):
            result = outcome.result or FreeResult.FAILED
            self.frees.labels(stage=action.stage.value, result=result.value).inc()
            if result is FreeResult.FREED and trigger_at is not None:
                end = outcome.at + outcome.duration_s
                self.free_duration.observe(max(0.0, end - trigger_at))
        elif isinstance(action, RestartComfy):
            if outcome.ok:
                self.restarts.inc()
        elif isinstance(action, HealOllama) and not outcome.awaiting_unload:
            # A heal waiting for its unload is counted when its reload is judged.
            self.heals.labels(result="ok" if outcome.ok else "failed").inc()
        elif isinstance(action, UnloadOllama) and outcome.ok:
            self.unloads.inc()
        elif isinstance(action, FreeJobs):
            result = outcome.result or FreeResult.FAILED
            self.job_frees.labels(role=action.target.partition("/")[0], result=result.value).inc()
        elif isinstance(action, UnloadModel) and outcome.ok:
            self.model_unloads.labels(role=action.target.partition("/")[0]).inc()

    def docker_event(self) -> None:
        self.docker_events.inc()

    def set_docker_reconnects(self, total: int) -> None:
        """Counters only go up: add what the event source counted since the last call."""
        with self._lock:
            delta = total - self._reconnects_seen
            self._reconnects_seen = max(total, self._reconnects_seen)
        if delta > 0:
            self.docker_reconnects.inc(delta)

    def observed(self, observation: Observation, wall_time: float) -> None:
        with self._lock:
            self._observation = observation
        self.last_pass.set(wall_time)

    def latest(self) -> Observation | None:
        with self._lock:
            return self._observation

    def watch_gate(self, stats: Callable[[], Any]) -> None:
        """Export the gate's counters (`Gate.stats`, read at scrape time)."""
        self.registry.register(_GateCollector(stats))

    def watch_comfyui_gate(self, stats: Callable[[], Any]) -> None:
        """Export the image gate's counters (`ComfyGate.stats`, read at scrape time)."""
        self.registry.register(_GateCollector(stats, _COMFYUI_GATE_COUNTERS))

    def watch_docker_events(self, connected: Callable[[], bool]) -> None:
        """Export whether the Docker events stream is open now (read at scrape time).
        Only registered when the supervisor uses Docker: with two fixed URLs there is no
        stream to lose."""
        self.registry.register(_DockerEventsCollector(connected))


class _DockerEventsCollector(Collector):
    def __init__(self, connected: Callable[[], bool]) -> None:
        self._connected = connected

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "vram_supervisor_docker_events_connected",
            "1 while the Docker events stream is open, 0 while it is being reconnected.",
            value=1.0 if self._connected() else 0.0,
        )


# (attribute of GateStats, metric name without _total, help)
_GATE_COUNTERS = (
    ("requests_total", "vram_supervisor_gate_requests", "Requests the Ollama gate received."),
    (
        "express_total",
        "vram_supervisor_gate_express_requests",
        "Of those, requests served by the express lane (plain, and nothing to wait for).",
    ),
    (
        "gated_total",
        "vram_supervisor_gate_gated_requests",
        "Load requests for a model that was not resident (room checked first).",
    ),
    ("waits_total", "vram_supervisor_gate_waits", "Times the gate held a request to make room."),
    (
        "wait_seconds_total",
        "vram_supervisor_gate_wait_seconds",
        "Seconds requests were held while room was made.",
    ),
    (
        "forwarded_anyway_total",
        "vram_supervisor_gate_forwarded_anyway",
        "Requests forwarded without enough free VRAM after VRAM_GATE_WAIT.",
    ),
    (
        "upstream_errors_total",
        "vram_supervisor_gate_upstream_errors",
        "Requests answered 502 because Ollama could not be reached.",
    ),
)


_COMFYUI_GATE_COUNTERS = (
    (
        "requests_total",
        "vram_supervisor_comfyui_gate_requests",
        "Requests the image gate received.",
    ),
    (
        "express_total",
        "vram_supervisor_comfyui_gate_express_requests",
        "Of those, requests served by the express lane (plain, and nothing to wait for).",
    ),
    (
        "prompts_total",
        "vram_supervisor_comfyui_gate_prompts",
        "Prompts (POST /prompt with a graph) the image gate admitted.",
    ),
    (
        "waits_total",
        "vram_supervisor_comfyui_gate_waits",
        "Times the image gate held a prompt to make room.",
    ),
    (
        "wait_seconds_total",
        "vram_supervisor_comfyui_gate_wait_seconds",
        "Seconds prompts were held while room was made.",
    ),
    (
        "forwarded_anyway_total",
        "vram_supervisor_comfyui_gate_forwarded_anyway",
        "Prompts forwarded without the room (VRAM_GATE_WAIT passed, or VRAM_PRIORITY=ollama).",
    ),
    (
        "upstream_errors_total",
        "vram_supervisor_comfyui_gate_upstream_errors",
        "Requests answered 502 because ComfyUI could not be reached.",
    ),
    (
        "websockets_total",
        "vram_supervisor_comfyui_gate_websockets",
        "WebSocket connections relayed to ComfyUI.",
    ),
)


class _GateCollector(Collector):
    def __init__(
        self, stats: Callable[[], Any], counters: tuple[tuple[str, str, str], ...] = _GATE_COUNTERS
    ) -> None:
        self._stats = stats
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        snapshot = self._stats()
        for attribute, name, help_text in self._counters:
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], float(getattr(snapshot, attribute)))
            yield family


class _ObservationCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        obs = self._metrics.latest()
        used = GaugeMetricFamily(
            "vram_supervisor_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "vram_supervisor_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"]
        )
        container = GaugeMetricFamily(
            "vram_supervisor_container_vram_bytes",
            "VRAM held by each supervised service (NVML PIDs, or the service's API).",
            labels=["role", "name"],
        )
        ratio = GaugeMetricFamily(
            "vram_supervisor_ollama_model_gpu_ratio",
            "Share of each loaded Ollama model that is on the GPU (1 = fully).",
            labels=["model"],
        )
        loaded = GaugeMetricFamily(
            "vram_supervisor_models_loaded",
            "Models loaded (or loading) on each model server of the other kinds "
            "(llama-server, llama-swap ...).",
            labels=["role", "name"],
        )
        queue = GaugeMetricFamily(
            "vram_supervisor_comfyui_queue_length",
            "ComfyUI prompts running plus pending.",
            labels=["name"],
        )
        if obs is not None:
            for gpu in obs.gpus:
                used.add_metric([gpu.uuid], gpu.used_bytes)
                total.add_metric([gpu.uuid], gpu.total_bytes)
            ratios: dict[str, float] = {}
            for o in obs.ollamas:
                if o.vram_bytes is not None:
                    container.add_metric([o.status.spec.role, o.status.spec.name], o.vram_bytes)
                for m in o.models or ():
                    ratios[m.name] = m.gpu_fraction  # one series per name, even with 2 Ollamas
            for name, value in ratios.items():
                ratio.add_metric([name], value)
            for c in obs.comfyuis:
                if c.vram_bytes is not None:
                    container.add_metric([c.status.spec.role, c.status.spec.name], c.vram_bytes)
                if c.queue is not None:
                    queue.add_metric([c.status.spec.name], c.queue.running + c.queue.pending)
            for srv in obs.model_servers:
                labels = [srv.status.spec.role, srv.status.spec.name]
                if srv.vram_bytes is not None:
                    container.add_metric(labels, srv.vram_bytes)
                if srv.state is not None:
                    loaded.add_metric(labels, sum(1 for x in srv.models if x.is_resident))
            for job in obs.job_servers:
                if job.vram_bytes is not None:
                    container.add_metric(
                        [job.status.spec.role, job.status.spec.name], job.vram_bytes
                    )
        yield from (used, total, container, ratio, queue, loaded)
