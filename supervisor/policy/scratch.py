"""The scratch state of one decide() call, shared by the rule modules (pure).

`start_pass` cleans the observation (GPU readings with impossible figures are dropped,
duplicate services keep their first reading) and copies what the rules may change out
of the frozen `PolicyState`; `core.decide` builds the next state from it at the end.
`Pass.emit` never adds the same action twice in one decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.config import Settings
from supervisor.model import (
    Action,
    Backoff,
    ComfyObservation,
    Episode,
    GpuMemory,
    HealWait,
    JobServerObservation,
    ModelServerObservation,
    Observation,
    OllamaObservation,
    PolicyState,
    ServiceSpec,
)
from supervisor.policy.guards import gpu_ok, service_gpus, shares_gpu


@dataclass
class Want:
    """A trigger wants this ComfyUI freed; `dead`: its API is dead, only a restart helps."""

    reason: str
    gpu_uuid: str | None
    dead: bool = False


@dataclass
class Pass:
    """Scratch state of one decide() call."""

    obs: Observation
    state: PolicyState
    settings: Settings
    now: float
    gpus: list[GpuMemory]
    comfys: dict[str, ComfyObservation]
    ollamas: dict[str, OllamaObservation]
    episodes: dict[str, Episode]
    last_episode_at: float | None
    last_unload_at: float | None
    restart_at: dict[str, float]
    heal_at: dict[str, float]
    backoffs: dict[str, Backoff]
    heal_waits: dict[str, HealWait]
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    noted: set[str] = field(default_factory=set)
    keep_noted: set[str] = field(default_factory=set)
    claimed: set[str] = field(default_factory=set)  # ComfyUI keys acted on this pass
    healed: set[tuple[str, str]] = field(default_factory=set)
    unloaded: set[tuple[str, str]] = field(default_factory=set)
    heal_gpus: set[str] = field(default_factory=set)
    wants: dict[str, Want] = field(default_factory=dict)
    new_models: dict[str, list[str]] = field(default_factory=dict)
    wake: list[float] = field(default_factory=list)
    # The model servers of the other registry kinds (llama-server, llama-swap ...), by key.
    servers: dict[str, ModelServerObservation] = field(default_factory=dict)
    # The job servers of the other registry kinds (A1111/Forge, InvokeAI ...), by key,
    # and when each was last freed (one free per VRAM_MIN_FREE_INTERVAL each).
    jobs: dict[str, JobServerObservation] = field(default_factory=dict)
    job_free_at: dict[str, float] = field(default_factory=dict)
    slept: dict[str, int] = field(default_factory=dict)  # PolicyState.slept_bytes

    def emit(self, action: Action) -> None:
        if action not in self.actions:
            self.actions.append(action)

    def skip(self, why: str) -> None:
        if why not in self.skipped:
            self.skipped.append(why)

    def note_once(self, key: str, text: str) -> None:
        self.keep_noted.add(key)
        if key not in self.noted:
            self.noted.add(key)
            self.notes.append(text)

    def soon(self, seconds: float = 0.0) -> None:
        self.wake.append(seconds)

    def comfys_on(self, gpu: GpuMemory) -> list[ComfyObservation]:
        return [c for c in self.comfys.values() if shares_gpu(service_gpus(c), (gpu.uuid,))]

    def gpus_of(self, uuids: tuple[str, ...]) -> list[GpuMemory]:
        return [g for g in self.gpus if shares_gpu(uuids, (g.uuid,))]

    def model_server_specs(self) -> list[tuple[ServiceSpec, tuple[str, ...]]]:
        """Every running model server (Ollama and the registry kinds) and its GPUs."""
        found = [(o.status.spec, service_gpus(o)) for o in self.ollamas.values()]
        found += [(m.status.spec, service_gpus(m)) for m in self.servers.values()]
        return [(spec, gpus) for spec, gpus in found]

    def cuts_work(self, c: ComfyObservation) -> bool:
        """A model server on a GPU this ComfyUI uses ranks above it (VRAM_PRIORITY and
        the `vram-supervisor.priority` label): then its running work does not protect it
        from a free (the flags act when its prompt ends)."""
        mine = service_gpus(c)
        return any(
            self.settings.outranks(spec, c.status.spec)
            for spec, gpus in self.model_server_specs()
            if shares_gpu(mine, gpus)
        )


def usable_ollama(o: OllamaObservation) -> bool:
    return o.status.is_running and o.status.is_reachable and o.models is not None


def start_pass(obs: Observation, state: PolicyState, settings: Settings, now: float) -> Pass:
    gpus: list[GpuMemory] = []
    for g in obs.gpus:
        if gpu_ok(g) and all(g.uuid != h.uuid for h in gpus):
            gpus.append(g)
    comfys: dict[str, ComfyObservation] = {}
    for c in obs.comfyuis:
        comfys.setdefault(c.status.spec.key, c)
    ollamas: dict[str, OllamaObservation] = {}
    for o in obs.ollamas:
        ollamas.setdefault(o.status.spec.key, o)
    p = Pass(
        obs,
        state,
        settings,
        now,
        gpus,
        comfys,
        ollamas,
        episodes={e.target: e for e in state.episodes},
        last_episode_at=state.last_episode_at,
        last_unload_at=state.last_unload_at,
        restart_at=dict(state.last_restart_at),
        heal_at=dict(state.last_heal_at),
        backoffs={b.key: b for b in state.backoffs},
        heal_waits={w.key: w for w in state.heal_waits},
        noted=set(state.noted),
    )
    for m in obs.model_servers:
        p.servers.setdefault(m.status.spec.key, m)
    for j in obs.job_servers:
        p.jobs.setdefault(j.status.spec.key, j)
    p.job_free_at = dict(state.last_job_free_at)
    p.slept = dict(state.slept_bytes)
    if len(gpus) < len(obs.gpus):
        p.skip("ignored GPU reading(s) with impossible figures")
    return p
