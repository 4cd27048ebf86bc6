"""The JSON shapes of `/status`, `/healthz` and `vram-supervisor status --json`.

Pure functions from model objects to JSON-able dicts; the field names are an interface
(the `status` table, scripts and the e2e tests read them), so change them only additively.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from supervisor.model import (
    ComfyObservation,
    GpuMemory,
    JobServerObservation,
    ModelServerObservation,
    Observation,
    OllamaObservation,
    Outcome,
    ServiceStatus,
)
from supervisor.units import format_bytes


def docker_word(ok: bool | None) -> str:
    return "not used" if ok is None else "ok" if ok else "unreachable"


def observation_json(obs: Observation | None) -> dict[str, Any]:
    """VRAM source, GPUs and services of one observation (empty before the first)."""
    return {
        "vram_source": obs.source.value if obs else None,
        "gpus": [gpu_json(g) for g in obs.gpus] if obs else [],
        "ollama": [ollama_json(o) for o in obs.ollamas] if obs else [],
        "comfyui": [comfy_json(c) for c in obs.comfyuis] if obs else [],
        # The model servers of the registry's other kinds (llama-server, llama-swap ...).
        "model_servers": [server_json(m) for m in obs.model_servers] if obs else [],
        # The job servers of the registry's other kinds (A1111/Forge, InvokeAI ...).
        "job_servers": [job_server_json(j) for j in obs.job_servers] if obs else [],
    }


def outcome_json(outcome: Outcome, wall_time: float) -> dict[str, Any]:
    """One entry of `recent_actions`."""
    action = outcome.action
    entry: dict[str, Any] = {
        "wall_time": wall_time,
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
    return entry


def gate_json(stats: Any, *, host: str, port: int, wait_s: float) -> dict[str, Any]:
    """The `gate` entry: where it listens, how long it may hold a request, and its
    counters since start (a `GateStats`; the same figures as /metrics)."""
    return {"host": host, "port": port, "wait_s": wait_s, **dataclasses.asdict(stats)}


def gpu_json(g: GpuMemory) -> dict[str, Any]:
    return {
        "uuid": g.uuid,
        "index": g.index,
        "name": g.name,
        "total_bytes": g.total_bytes,
        "used_bytes": g.used_bytes,
        "free_bytes": g.free_bytes,
        "used_percent": round(g.used_percent, 1),
    }


def status_json(s: ServiceStatus) -> dict[str, Any]:
    return {
        "key": s.spec.key,
        "name": s.spec.name,
        "url": s.spec.url,
        "container_id": s.spec.container_id,
        # A fixed URL has no container: it "runs" only if it answers.
        "running": s.is_running if s.spec.is_container else s.is_reachable,
        "state": service_state(s),
        "health": s.health.value,
        "reachable": s.is_reachable,
        "failed_checks": s.failed_checks,
        "error": s.error,
    }


def service_state(s: ServiceStatus) -> str:
    """running / stopped for a container; answers / unreachable for a fixed URL."""
    if not s.spec.is_container:
        return "answers" if s.is_reachable else "unreachable"
    return "running" if s.is_running else "stopped"


def ollama_json(o: OllamaObservation) -> dict[str, Any]:
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
        **status_json(o.status),
        "vram_bytes": o.vram_bytes,
        "gpu_uuids": list(o.gpu_uuids),
        "models": models if o.models is not None else None,
        "vram": format_bytes(o.vram_bytes),
        "version": o.version,
        "generation": o.generation,
        "fit_target_bytes": o.fit_target_bytes,
    }


def server_json(m: ModelServerObservation) -> dict[str, Any]:
    state = m.state
    models = [
        {"name": x.name, "state": x.state, "busy": x.busy, "size_bytes": x.size_bytes}
        for x in m.models
    ]
    return {
        **status_json(m.status),
        "role": m.status.spec.role,
        "kind": m.title,
        "priority": m.status.spec.priority,
        "vram_bytes": m.vram_bytes,
        "vram": format_bytes(m.vram_bytes),
        "gpu_uuids": list(m.gpu_uuids),
        "mode": state.mode if state else None,
        "can_unload": state.can_unload if state else None,
        "busy": state.busy if state else None,
        "models": models if state is not None else None,
        # (model, share of its weights on the GPU) when it runs partly on the CPU (NVML).
        "spilled": (
            {"model": m.spilled[0].name, "gpu_percent": round(100 * m.spilled[1], 1)}
            if m.spilled is not None
            else None
        ),
    }


def job_server_json(j: JobServerObservation) -> dict[str, Any]:
    state = j.state
    return {
        **status_json(j.status),
        "role": j.status.spec.role,
        "kind": j.title,
        "priority": j.status.spec.priority,
        "vram_bytes": j.vram_bytes,
        "vram": format_bytes(j.vram_bytes),
        "gpu_uuids": list(j.gpu_uuids),
        "mode": state.mode if state else None,
        "can_free": state.can_free if state else None,
        "busy": state.busy if state else None,
        "queued": state.queued if state else None,
        "models": list(state.models) if state else None,
    }


def comfy_json(c: ComfyObservation) -> dict[str, Any]:
    queue = {"running": c.queue.running, "pending": c.queue.pending} if c.queue else None
    stats = c.stats
    return {
        **status_json(c.status),
        "vram_bytes": c.vram_bytes,
        "gpu_uuids": list(c.gpu_uuids),
        "queue": queue,
        "vram": format_bytes(c.vram_bytes),
        # How it keeps its weights: classic, dynamic-vram, cpu or unknown (no stats).
        "mode": c.mode.value,
        "version": stats.version or None if stats else None,
        "device_type": stats.device_type if stats else None,
        "device_name": stats.device_name if stats else None,
        "vram_measured": c.vram_measured,
        # vram_bytes is the Dynamic-VRAM bound from the whole device (no NVML).
        "vram_is_estimate": c.vram_is_estimate,
    }
