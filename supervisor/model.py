"""Plain data shared by every layer: enums and frozen dataclasses.

This module imports nothing from the package and no I/O library. Adapters build these
objects from what Docker, NVML, Ollama and ComfyUI report; `policy` reads them and returns
`Decision`s; `actions` carries those out and reports `Outcome`s.

Units are in the names (`*_bytes`, `*_s`). Times called `at`/`now` are seconds on the
monotonic clock of the running process unless a name says `wall`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """The roles of the two first tenant kinds. A role is any kind's label value (a str:
    `supervisor.tenants` lists them all); these names exist for the code that is about
    Ollama or ComfyUI in particular (heal, staged frees)."""

    OLLAMA = "ollama"
    COMFYUI = "comfyui"


class Priority(StrEnum):
    """The single-word values of `VRAM_PRIORITY` (it also takes any role or an ordered
    list of roles: `Settings.priority` is the normalised text)."""

    BALANCED = "balanced"
    OLLAMA = "ollama"
    COMFYUI = "comfyui"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class VramSource(StrEnum):
    """Where GPU memory figures come from."""

    NVML = "nvml"  # libnvidia-ml through pynvml: per GPU, per process
    API = "api"  # ComfyUI /system_stats and Ollama /api/ps
    NONE = "none"  # nothing could be read this pass


class ComfyMode(StrEnum):
    """How a ComfyUI keeps its weights (api-facts-2026 sections 2 and 3)."""

    CLASSIC = "classic"  # in PyTorch's allocator: torch_vram_total shows them
    DYNAMIC = "dynamic-vram"  # 0.15+ Dynamic VRAM: outside torch's figures
    CPU = "cpu"  # --cpu or no GPU: holds no VRAM at all
    UNKNOWN = "unknown"  # no /system_stats reading


# ComfyUI's Dynamic VRAM (api-facts-2026 section 2): since which version, the package that
# provides it, and the command-line flags that turn it off.
DYNAMIC_VRAM_SINCE = (0, 15)
DYNAMIC_VRAM_PACKAGE = "comfy-aimdo"
DYNAMIC_VRAM_OFF_FLAGS = frozenset(
    {"--disable-dynamic-vram", "--highvram", "--gpu-only", "--novram", "--cpu"}
)


class FreeStage(StrEnum):
    """The staged ways of taking VRAM back from ComfyUI, gentlest first."""

    SOFT = "soft"  # POST /free {"unload_models": true}
    HARD = "hard"  # POST /free {"unload_models": true, "free_memory": true}
    RESTART = "restart"  # restart the ComfyUI container through Docker


class FreeResult(StrEnum):
    """What a verified free achieved."""

    FREED = "freed"  # VRAM came back within the deadline
    PENDING = "pending"  # a prompt is running; ComfyUI acts on the flags after it: wait
    PINNED = "pinned"  # idle, yet nothing was released: escalate
    FAILED = "failed"  # the API or Docker call failed


class ServiceHealth(StrEnum):
    """Docker's health status for a container; NONE when it has no healthcheck."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STARTING = "starting"
    NONE = "none"


# --------------------------------------------------------------------------- services


@dataclass(frozen=True)
class ServiceSpec:
    """One service the supervisor may talk to, as discovered or configured.

    `key` is stable across container re-creation (role + container name, or role + "url"
    for a fixed endpoint), so cooldowns survive a recreate with a new container id.
    """

    role: str  # the kind's role (`supervisor.tenants`); Role.OLLAMA / Role.COMFYUI compare equal
    name: str  # container name without the slash, or the role name for a fixed URL
    url: str  # base URL, no trailing slash
    container_id: str | None = None  # None: a fixed URL with no container behind it
    restart_allowed: bool | None = None  # `vram-supervisor.restart`; None: use the env default
    # Why a restart is never allowed whatever the label and VRAM_RESTART_FALLBACK say
    # (a Swarm task), named in the restart guard's message; None: no such reason.
    restart_block: str | None = None
    gpu_uuids: tuple[str, ...] = ()  # GPUs granted by Docker (DeviceRequests); () = unknown/all
    # Ollama: the settings of its Config.Env that change a load's need (ollama_profile.ENV_KEYS)
    env: tuple[tuple[str, str], ...] = ()
    priority: int = 0  # `vram-supervisor.priority`: higher keeps its VRAM (breaks role ties)

    @property
    def key(self) -> str:
        return f"{self.role}/{self.name}"

    @property
    def is_container(self) -> bool:
        return self.container_id is not None


@dataclass(frozen=True)
class ServiceStatus:
    """Liveness of one service at one observation."""

    spec: ServiceSpec
    is_running: bool  # Docker State.Status == "running" (always True for a fixed URL)
    health: ServiceHealth = ServiceHealth.NONE
    is_reachable: bool = False  # its API answered during this pass
    failed_checks: int = 0  # consecutive passes in which the API did not answer
    error: str | None = None  # why the API did not answer, for logs and `status`


@dataclass(frozen=True)
class ContainerState:
    """A labelled container as Docker reports it (discovery output)."""

    spec: ServiceSpec
    status: str  # Docker State.Status: created, running, paused, restarting, exited, dead
    health: ServiceHealth = ServiceHealth.NONE
    pid: int = 0  # State.Pid, a host PID; 0 when not running

    @property
    def is_running(self) -> bool:
        return self.status == "running"


# --------------------------------------------------------------------------- readings


@dataclass(frozen=True)
class GpuMemory:
    """Device-wide memory of one GPU. `uuid` is the identity (NVML index is not stable)."""

    uuid: str
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int

    @property
    def used_percent(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True)
class OllamaModel:
    """One entry of Ollama's GET /api/ps."""

    name: str  # always name:tag, as Ollama reports it
    size_bytes: int  # RAM + VRAM used by the runner
    size_vram_bytes: int  # the part on GPUs
    digest: str = ""
    context_length: int | None = None
    expires_at: str | None = None  # RFC 3339 as sent; not an activity signal

    @property
    def gpu_fraction(self) -> float:
        return self.size_vram_bytes / self.size_bytes if self.size_bytes else 1.0

    @property
    def is_spilled(self) -> bool:
        """Partly or wholly on the CPU; sticky until the model is unloaded."""
        return self.size_vram_bytes < self.size_bytes


@dataclass(frozen=True)
class ComfyQueue:
    running: int
    pending: int

    @property
    def is_busy(self) -> bool:
        return self.running > 0 or self.pending > 0


@dataclass(frozen=True)
class ComfyStats:
    """The device entry of ComfyUI's GET /system_stats (bytes).

    `vram_free_bytes` counts torch's cache as free; `torch_reserved_bytes` is what the
    caching allocator holds (the API's misnamed `torch_vram_total`).
    """

    device_name: str
    device_type: str  # "cuda", "cpu", ...
    vram_total_bytes: int
    vram_free_bytes: int
    torch_reserved_bytes: int
    torch_cached_bytes: int  # reserved but not active (the API's `torch_vram_free`)
    version: str = ""  # system.comfyui_version ("" when not reported)
    argv: tuple[str, ...] = ()  # system.argv: its command line
    packages: tuple[str, ...] = ()  # the names in system.comfy_package_versions (0.15+)

    @property
    def mode(self) -> ComfyMode:
        """api-facts-2026 section 3: a non-CUDA device -> CPU (no NVIDIA memory); version
        >= 0.15, `comfy-aimdo` among its packages, none of the flags that turn it off in
        its argv and a CUDA device -> Dynamic VRAM; else classic. No field says Dynamic
        VRAM is active: this is what its version and command line imply."""
        if self.device_type != "cuda":
            return ComfyMode.CPU
        match = re.match(r"v?(\d+)\.(\d+)", self.version.strip())
        version = (int(match.group(1)), int(match.group(2))) if match else None
        flags = {arg.split("=", 1)[0] for arg in self.argv}
        if (
            version is not None
            and version >= DYNAMIC_VRAM_SINCE
            and DYNAMIC_VRAM_PACKAGE in self.packages
            and not flags & DYNAMIC_VRAM_OFF_FLAGS
        ):
            return ComfyMode.DYNAMIC
        return ComfyMode.CLASSIC


EVICT_ABOVE = 0.8  # Ollama >= 0.30 evicts its own runners only while need > this x free


@dataclass(frozen=True)
class Resident:
    """What Ollama's room rule needs of one model in /api/ps."""

    name: str
    size_vram_bytes: int


def evictable_bytes(
    is_llama_server: bool, need_bytes: int, free_bytes: int, residents: Sequence[Resident]
) -> int:
    """VRAM Ollama's own resident models would give back for a load of `need_bytes` with
    `free_bytes` free (api-facts 1.8, api-facts-2026 section 1): before 0.30 all of it (a
    further model must fit fully, so Ollama evicts its own until it does); from 0.30
    (`is_llama_server`) only while the need exceeds 80 % of the free figure, one runner at
    a time, counted smallest first (the least room: Ollama's figure is stale, so an
    overestimate here would mean a spill). The gate, the heal's policy and its actor judge
    the room by this one rule."""
    if not residents:
        return 0
    if not is_llama_server:
        return sum(r.size_vram_bytes for r in residents)
    figure = free_bytes
    freed = 0
    for resident in sorted(residents, key=lambda r: (r.size_vram_bytes, r.name)):
        if need_bytes <= EVICT_ABOVE * figure:
            break
        freed += resident.size_vram_bytes
        figure += resident.size_vram_bytes
    return freed


@dataclass(frozen=True)
class OllamaObservation:
    status: ServiceStatus
    models: tuple[OllamaModel, ...] | None = None  # None: /api/ps could not be read
    vram_bytes: int | None = None  # attributed by NVML PIDs, or the sum of size_vram
    gpu_uuids: tuple[str, ...] = ()  # GPUs where it holds memory; () = unknown/all
    version: str | None = None  # /api/version; None: not read yet
    generation: str = ""  # ollama_profile.OllamaProfile.generation, for status
    fit_target_bytes: int = 0  # what its loads leave free (llama-server's fit target)
    # Its loads run llama-server (Ollama >= 0.30, or a version not known): its own models
    # are evicted for a load only by the 80 % rule (`evictable_bytes`); before 0.30, all.
    is_llama_server: bool = True


@dataclass(frozen=True)
class ComfyObservation:
    status: ServiceStatus
    queue: ComfyQueue | None = None  # None: /queue could not be read
    stats: ComfyStats | None = None
    # Attributed by NVML PIDs (`vram_measured`); else from its API: torch's reserved bytes,
    # or under Dynamic VRAM the bound from the device figures (see vram/api.py).
    vram_bytes: int | None = None
    gpu_uuids: tuple[str, ...] = ()
    vram_measured: bool = False  # vram_bytes is NVML's per-process figure (context included)
    mode: ComfyMode = ComfyMode.UNKNOWN
    # vram_bytes is the Dynamic-VRAM bound from the whole device (no NVML): any other GPU
    # user counts as ComfyUI's, so it may start a soft free but never a hard free or restart.
    vram_is_estimate: bool = False


# States of a served model that hold (or are taking) its VRAM; "sleeping" keeps only a
# process's context and "stopping" is on its way out.
RESIDENT_STATES = frozenset({"loaded", "loading", "ready", "starting"})
# A model server's processes holding less than this share of its one model's weights: the
# model runs partly on the CPU (ModelServerObservation.spilled).
SPILL_SHARE = 0.9
LOADING_STATES = frozenset({"loading", "starting"})


@dataclass(frozen=True)
class ServedModel:
    """One model a model server of a registry kind (llama-server, llama-swap) reports."""

    name: str
    state: str = "loaded"  # as the server says: loaded, loading, ready, starting, sleeping ...
    busy: bool | None = None  # serving a request now; None: this read cannot tell
    size_bytes: int | None = None  # its size as the server reports it (weights); None: unknown

    @property
    def is_resident(self) -> bool:
        return self.state in RESIDENT_STATES

    @property
    def is_loading(self) -> bool:
        return self.state in LOADING_STATES


@dataclass(frozen=True)
class ServedState:
    """One read of a model server of a registry kind."""

    models: tuple[ServedModel, ...]
    can_unload: bool  # it has an unload call (llama-server single-model mode has none)
    mode: str = ""  # how it runs, for `status` (e.g. "router", "single-model")
    busy: bool | None = None  # any request in flight; None: unknown
    # Requests waiting for a model that sleeps (vLLM queues them until woken); None:
    # unknown or it cannot sleep. A sleeping model with waiting requests is woken.
    waiting: int | None = None
    can_wake: bool = False  # it sleeps and must be woken by the supervisor (`WakeModel`)


@dataclass(frozen=True)
class JobState:
    """One read of a job server of a registry kind other than ComfyUI (A1111/Forge,
    InvokeAI ...): whether it works, and whether it can be freed between jobs."""

    busy: bool | None  # a job runs or waits; None: unknown (then it is never freed)
    can_free: bool  # it has a call that gives its VRAM back while idle
    queued: int | None = None  # jobs running plus waiting, when it says
    mode: str = ""  # which product or variant, for `status` (e.g. "forge")
    vram_bytes: int | None = None  # what it says it holds (its own torch figures)
    models: tuple[str, ...] = ()  # the models (checkpoints) it has loaded, when it says
    # A free parked its weights in CPU RAM and its next job will not move them back by
    # itself (A1111's unload-checkpoint): the bytes to reload (0: size unknown), put back
    # with `ReloadJobs` once its GPU has room for them. None: nothing parked.
    parked_bytes: int | None = None


@dataclass(frozen=True)
class ModelServerObservation:
    """A model server of a registry kind other than Ollama (`supervisor.tenants`)."""

    status: ServiceStatus
    title: str  # the kind's product name, for logs and `status`
    state: ServedState | None = None  # None: could not be read this pass
    vram_bytes: int | None = None  # attributed by NVML PIDs; None: not measured
    gpu_uuids: tuple[str, ...] = ()

    @property
    def models(self) -> tuple[ServedModel, ...]:
        return self.state.models if self.state is not None else ()

    @property
    def spilled(self) -> tuple[ServedModel, float] | None:
        """(model, share of its weights on the GPU) when the server's processes hold less
        VRAM (NVML) than the weights of the one model it has loaded: llama.cpp's `--fit`
        left part of them in system RAM. Judged only with one loaded model of known size
        and an NVML figure (the KV cache and context come on top of the weights, so a
        model wholly on the GPU always shows more than its size); None otherwise."""
        loaded = [m for m in self.models if m.is_resident and not m.is_loading]
        if self.vram_bytes is None or len(loaded) != 1 or not loaded[0].size_bytes:
            return None
        share = self.vram_bytes / loaded[0].size_bytes
        return (loaded[0], share) if share < SPILL_SHARE else None


@dataclass(frozen=True)
class JobServerObservation:
    """A job server of a registry kind other than ComfyUI (`supervisor.tenants`)."""

    status: ServiceStatus
    title: str
    state: JobState | None = None  # None: could not be read this pass
    vram_bytes: int | None = None  # NVML attribution, else its own figure; None: unknown
    gpu_uuids: tuple[str, ...] = ()

    @property
    def has_work(self) -> bool:
        return (
            self.status.is_running
            and self.status.is_reachable
            and self.state is not None
            and self.state.busy is True
        )


@dataclass(frozen=True)
class Observation:
    """Everything one pass of the loop read. Built by the daemon, read by the policy."""

    at: float
    source: VramSource
    gpus: tuple[GpuMemory, ...] = ()
    ollamas: tuple[OllamaObservation, ...] = ()
    comfyuis: tuple[ComfyObservation, ...] = ()
    model_servers: tuple[ModelServerObservation, ...] = ()  # the other registry kinds
    job_servers: tuple[JobServerObservation, ...] = ()  # the other registry kinds
    docker_ok: bool | None = None  # None: Docker not in use (fixed URLs only)
    wall_at: float | None = None  # Unix time of the pass (to judge Ollama's expires_at)
    # The Ollama gate (VRAM_GATE_PORT) serves now: it started and listens. VRAM_GATE_PORT
    # alone does not say so (a gate that did not start holds no load for room).
    ollama_gated: bool = False


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class FreeComfy:
    """Take VRAM back from one ComfyUI at one stage (soft/hard; restart is RestartComfy)."""

    target: str  # ServiceSpec.key of a ComfyUI
    stage: FreeStage
    reason: str
    gpu_uuid: str | None = None  # the GPU that needs room, when known


@dataclass(frozen=True)
class RestartComfy:
    target: str
    reason: str


@dataclass(frozen=True)
class UnloadOllama:
    """Unload one Ollama model with keep_alive 0 so ComfyUI gets the room."""

    target: str  # ServiceSpec.key of an Ollama
    model: str
    reason: str


@dataclass(frozen=True)
class HealOllama:
    """Free the listed ComfyUIs, unload `model`, wait until it is gone, preload it."""

    target: str
    model: str
    reason: str
    free_first: tuple[str, ...] = ()  # ComfyUI keys to free (hard stage) before the reload
    before_fraction: float = 0.0
    gpu_uuid: str | None = None  # the GPU the model should land on, when known
    # The second half of a heal whose unload waited for a request to end (`HealWait`):
    # skip the free and the unload, re-free only the `free_first` ComfyUIs, then preload
    # with `keep_alive`. With `withdraw` the model is still loaded: the preload only
    # withdraws the armed unload (its keep-alive replaces the 0).
    reload_only: bool = False
    withdraw: bool = False
    keep_alive: int | str | None = None


@dataclass(frozen=True)
class UnloadModel:
    """Unload one idle model of a model server of a registry kind (llama-server's router,
    llama-swap) so a job server gets the room; the actor checks it is still idle first."""

    target: str  # ServiceSpec.key of the model server
    model: str
    reason: str


@dataclass(frozen=True)
class WakeModel:
    """Wake a sleeping model (vLLM) that requests wait for, once room was made."""

    target: str
    model: str
    reason: str


@dataclass(frozen=True)
class FreeJobs:
    """Free the VRAM of an idle job server of a registry kind (A1111/Forge's
    unload-checkpoint, InvokeAI's empty_model_cache ...); the actor checks it is still
    idle first and verifies by reading VRAM."""

    target: str
    reason: str
    gpu_uuid: str | None = None


@dataclass(frozen=True)
class ReloadJobs:
    """Put back the weights an earlier free parked in CPU RAM of an idle job server whose
    next job would not (`JobState.parked_bytes`; A1111's reload-checkpoint), once its GPU
    has room; the actor checks it is still idle first."""

    target: str
    reason: str


Action = (
    FreeComfy
    | RestartComfy
    | UnloadOllama
    | HealOllama
    | UnloadModel
    | WakeModel
    | FreeJobs
    | ReloadJobs
)


@dataclass(frozen=True)
class Outcome:
    """What carrying out one Action did, measured after the fact."""

    action: Action
    at: float
    ok: bool
    result: FreeResult | None = None  # for FreeComfy / RestartComfy
    before_bytes: int | None = None  # the verified reading before ...
    after_bytes: int | None = None  # ... and after (GPU used bytes or the service's bytes)
    detail: str = ""
    dry_run: bool = False
    after_fraction: float | None = None  # HealOllama: the model's GPU share after reload
    duration_s: float = 0.0
    # HealOllama: a request kept the model busy; the unload stays armed in Ollama and the
    # policy reloads the model once it leaves /api/ps, with this keep-alive.
    awaiting_unload: bool = False
    keep_alive: int | str | None = None
    # False: nothing was sent to the service (refused at the moment of acting, e.g. the
    # model serves a request): the safety limit does not count it.
    sent: bool = True


@dataclass(frozen=True)
class Episode:
    """A free in progress on one ComfyUI: which stage ran last and what it achieved."""

    target: str
    stage: FreeStage
    started_at: float
    reason: str
    gpu_uuid: str | None = None
    last_result: FreeResult | None = None
    last_at: float | None = None


@dataclass(frozen=True)
class Backoff:
    """The policy holds back from one target after an action that did not help.

    `key` is "free|<ComfyUI key>" (it kept its memory after a hard free and may not be
    restarted) or "heal|<Ollama key>|<model>" (a heal that left the model spilled).
    """

    key: str
    at: float  # when the action that did not help was decided
    bytes_then: int = 0  # the reading then: what the ComfyUI held, or the room for the heal
    strikes: int = 0  # actions in a row that did not help
    container_id: str | None = None  # the ComfyUI's container then; another one ends it


@dataclass(frozen=True)
class HealWait:
    """A heal whose keep_alive 0 unload waits inside Ollama for a request to end.

    `key` is "<Ollama key>|<model>"; `since` when the heal started; `keep_alive` what the
    reload (or, past the bound, the withdrawal of the unload) sends.
    """

    key: str
    target: str
    model: str
    since: float
    keep_alive: int | str | None
    before_fraction: float = 0.0
    free_first: tuple[str, ...] = ()
    gpu_uuid: str | None = None


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between passes. Replaced, never mutated."""

    is_initialised: bool = False  # first pass seen (models present then are not "new")
    known_models: frozenset[tuple[str, str]] = frozenset()  # (ollama key, model name)
    last_episode_at: float | None = None  # start of the latest free episode (rate limit)
    last_unload_at: float | None = None  # latest Ollama unload episode (rate limit)
    episodes: tuple[Episode, ...] = ()  # open free episodes, one per ComfyUI at most
    last_restart_at: tuple[tuple[str, float], ...] = ()  # (comfy key, when)
    last_heal_at: tuple[tuple[str, float], ...] = ()  # (ollama key + "|" + model, when)
    # Ollama keys whose /api/ps was read at least once: the first read is a baseline.
    seen_ollamas: frozenset[str] = frozenset()
    # Keys of INFO notes already given (said once until the condition clears).
    noted: frozenset[str] = frozenset()
    backoffs: tuple[Backoff, ...] = ()  # targets held back after actions that did not help
    heal_waits: tuple[HealWait, ...] = ()  # heals waiting for their unload (a busy model)
    # (job server key, when) of the latest free of each job server of the other kinds.
    last_job_free_at: tuple[tuple[str, float], ...] = ()
    # ("server key|model", bytes) of the models this supervisor put to sleep: what each
    # sleep gave back, so a wake waits until that much is free again (SLEEPS).
    slept_bytes: tuple[tuple[str, int], ...] = ()

    def restart_at(self, key: str) -> float | None:
        return dict(self.last_restart_at).get(key)

    def heal_at(self, key: str) -> float | None:
        return dict(self.last_heal_at).get(key)

    def episode_for(self, target: str) -> Episode | None:
        return next((e for e in self.episodes if e.target == target), None)


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    state: PolicyState
    notes: tuple[str, ...] = ()  # sentences to log at INFO (e.g. new models detected)
    wake_in_s: float = 5.0  # when the next pass should run at the latest
    reasons_skipped: tuple[str, ...] = field(default=())  # why a trigger did not act (DEBUG)
