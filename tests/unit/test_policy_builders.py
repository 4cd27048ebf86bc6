"""Builders for the policy tables: one short call per service, sizes in GiB.

Defaults describe the common host: one 24 GiB GPU ("GPU-0"), an Ollama container and an
idle ComfyUI container holding 8 GiB that a /free could return. No tests live here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from supervisor.config import Settings
from supervisor.model import (
    ComfyMode,
    ComfyObservation,
    ComfyQueue,
    ComfyStats,
    Decision,
    Episode,
    FreeComfy,
    FreeJobs,
    FreeResult,
    FreeStage,
    GpuMemory,
    HealOllama,
    Observation,
    OllamaModel,
    OllamaObservation,
    PolicyState,
    ReloadJobs,
    RestartComfy,
    Role,
    ServiceHealth,
    ServiceSpec,
    ServiceStatus,
    UnloadModel,
    UnloadOllama,
    VramSource,
    WakeModel,
)
from supervisor.policy import decide
from supervisor.units import GIB

NOW = 1000.0
COMFY = "comfyui/comfyui"
OLLAMA = "ollama/ollama"


def gpu(used: float = 10, total: float = 24, uuid: str = "GPU-0", index: int = 0) -> GpuMemory:
    t, u = int(total * GIB), int(used * GIB)
    return GpuMemory(uuid, index, "NVIDIA RTX 4090", t, u, t - u)


def model(
    name: str = "llama3:8b", size: float = 5, vram: float | None = None, expires: str | None = None
) -> OllamaModel:
    """A model in /api/ps; `vram` below `size` means it spilled to the CPU."""
    vram_bytes = int((size if vram is None else vram) * GIB)
    return OllamaModel(name, int(size * GIB), vram_bytes, expires_at=expires)


def ollama(
    *models: OllamaModel,
    name: str = "ollama",
    running: bool = True,
    reachable: bool = True,
    unreadable: bool = False,
    gpus: tuple[str, ...] = (),
    on: tuple[str, ...] = (),
    fit: float = 0,
    llama_server: bool = True,
) -> OllamaObservation:
    """An Ollama; `gpus`: what Docker granted it, `on`: where NVML saw it hold memory,
    `fit`: the GiB its loads leave free (llama-server's fit target, Ollama >= 0.30),
    `llama_server`: False for an Ollama before 0.30 (it evicts all its own models for a
    load that does not fit beside them)."""
    spec = ServiceSpec(Role.OLLAMA, name, f"http://{name}:11434", f"id-{name}", gpu_uuids=gpus)
    status = ServiceStatus(spec, is_running=running, is_reachable=running and reachable)
    readable = running and reachable and not unreadable
    return OllamaObservation(
        status,
        models=tuple(models) if readable else None,
        gpu_uuids=on,
        fit_target_bytes=int(fit * GIB),
        is_llama_server=llama_server,
    )


def comfy(
    name: str = "comfyui",
    held: float = 8,
    running: int = 0,
    pending: int = 0,
    *,
    queue: bool = True,
    reachable: bool = True,
    is_running: bool = True,
    failed: int = 0,
    container: bool = True,
    restart: bool | None = None,
    gpus: tuple[str, ...] = (),
    health: ServiceHealth = ServiceHealth.NONE,
    stats: bool = True,
    device: str = "cuda",
    vram: float | None = None,
    cid: str | None = None,
    mode: ComfyMode = ComfyMode.CLASSIC,
    measured: bool = False,
    estimate: bool | None = None,
) -> ComfyObservation:
    """A ComfyUI; `held` GiB is torch's reserved memory (what a /free could return in
    classic mode); `cid` replaces its container id (default "id-<name>", a recreated
    container differs). `mode` DYNAMIC: a ComfyUI 0.38 with Dynamic VRAM (its weights are
    not in `held`); `vram` is then NVML's figure (`measured`) or the device bound
    (`estimate`, by default for a DYNAMIC `vram` that is not `measured`)."""
    spec = ServiceSpec(
        Role.COMFYUI,
        name,
        f"http://{name}:8188",
        (cid or f"id-{name}") if container else None,
        restart_allowed=restart,
        gpu_uuids=gpus,
    )
    up = is_running and reachable
    status = ServiceStatus(spec, is_running, health, is_reachable=up, failed_checks=failed)
    dynamic = mode is ComfyMode.DYNAMIC
    st = (
        ComfyStats(
            "cuda:0 RTX",
            device,
            24 * GIB,
            10 * GIB,
            int(held * GIB),
            0,
            version="0.38.1" if dynamic else "0.3.64",
            argv=("main.py",),
            packages=("comfy-aimdo",) if dynamic else (),
        )
        if up and stats
        else None
    )
    q = ComfyQueue(running, pending) if up and queue else None
    vram_bytes = int(vram * GIB) if vram is not None else None
    return ComfyObservation(
        status,
        queue=q,
        stats=st,
        vram_bytes=vram_bytes,
        vram_measured=measured,
        mode=st.mode if st is not None else ComfyMode.UNKNOWN,
        vram_is_estimate=(
            estimate if estimate is not None else dynamic and vram is not None and not measured
        ),
    )


def obs(
    *services: OllamaObservation | ComfyObservation,
    gpus: tuple[GpuMemory, ...] | None = None,
    docker_ok: bool | None = True,
    wall_at: float | None = None,
    source: VramSource = VramSource.NVML,
) -> Observation:
    return Observation(
        at=NOW,
        source=source,
        gpus=(gpu(),) if gpus is None else gpus,
        ollamas=tuple(s for s in services if isinstance(s, OllamaObservation)),
        comfyuis=tuple(s for s in services if isinstance(s, ComfyObservation)),
        docker_ok=docker_ok,
        wall_at=wall_at,
    )


def settings(**changes: Any) -> Settings:
    return replace(Settings(), **changes)


def baseline(*ollamas: OllamaObservation, **changes: Any) -> PolicyState:
    """The state after a first pass that saw these Ollamas and their models."""
    known = frozenset(
        (o.status.spec.key, m.name) for o in ollamas for m in (o.models or ()) if o.models
    )
    seen = frozenset(o.status.spec.key for o in ollamas)
    state = PolicyState(is_initialised=True, known_models=known, seen_ollamas=seen)
    return replace(state, **changes)


def episode(
    stage: FreeStage = FreeStage.SOFT,
    result: FreeResult | None = FreeResult.FREED,
    target: str = COMFY,
    started: float = NOW - 6,
    gpu_uuid: str | None = "GPU-0",
) -> Episode:
    return Episode(
        target, stage, started, "GPU 0 at 80% (threshold 75%)", gpu_uuid, result, started + 1
    )


def run(
    o: Observation,
    state: PolicyState | None = None,
    s: Settings | None = None,
    now: float = NOW,
) -> Decision:
    """decide(), checking the invariant that no action is emitted twice for one target."""
    d = decide(o, state or PolicyState(is_initialised=True), s or Settings(), now)
    keys = [_identity(a) for a in d.actions]
    assert len(keys) == len(set(keys)), f"duplicate actions: {d.actions}"
    return d


def _identity(a: object) -> tuple[str, str]:
    if isinstance(a, FreeComfy | RestartComfy):
        return ("comfy", a.target)
    if isinstance(a, UnloadOllama | HealOllama | UnloadModel):
        return ("model", f"{a.target}|{a.model}")
    if isinstance(a, WakeModel):
        return ("wake", f"{a.target}|{a.model}")
    if isinstance(a, FreeJobs | ReloadJobs):
        return ("jobs", a.target)
    raise AssertionError(f"unknown action {a!r}")


def summary(d: Decision) -> list[str]:
    """Actions as short words: free:soft:comfyui, unload:llama3:8b, heal:m[comfyui], ..."""
    out: list[str] = []
    for a in d.actions:
        if isinstance(a, FreeComfy):
            out.append(f"free:{a.stage.value}:{a.target.split('/')[1]}")
        elif isinstance(a, RestartComfy):
            out.append(f"restart:{a.target.split('/')[1]}")
        elif isinstance(a, UnloadOllama):
            out.append(f"unload:{a.model}")
        elif isinstance(a, UnloadModel):
            out.append(f"unload:{a.target}:{a.model}")
        elif isinstance(a, HealOllama):
            names = ",".join(k.split("/")[1] for k in a.free_first)
            if a.withdraw:
                out.append(f"withdraw:{a.model}")
            else:
                out.append(f"{'reload' if a.reload_only else 'heal'}:{a.model}[{names}]")
    return out


def skipped(d: Decision) -> str:
    return "\n".join(d.reasons_skipped)
