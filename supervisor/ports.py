"""The seams between the daemon and the outside world, as Protocols.

Real adapters (`clients/`, `vram/`, `docker/`) and the hand-written fakes in tests implement
the same Protocols. Every method raises only the package's own errors (`errors.py`):
`ServiceError` for Ollama/ComfyUI, `DockerUnavailable` for Docker, `NvmlUnavailable` for NVML.
Adapters own their retries; callers treat an error as "this reading is missing this pass".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from supervisor.model import (
    Action,
    ComfyQueue,
    ComfyStats,
    ContainerState,
    FreeComfy,
    GpuMemory,
    JobState,
    OllamaModel,
    Outcome,
    ServedState,
    ServiceSpec,
)

if TYPE_CHECKING:  # ollama_profile -> estimate -> ports: types only
    from supervisor.config import Settings
    from supervisor.ollama_profile import OllamaProfile


@dataclass(frozen=True)
class TaggedModel:
    """One installed model from Ollama's GET /api/tags (size is on-disk bytes)."""

    name: str
    size_bytes: int


@dataclass(frozen=True)
class ModelFacts:
    """What POST /api/show says that matters for a VRAM estimate (None: not reported)."""

    name: str
    context_length: int | None = None  # <arch>.context_length (trained context)
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    num_ctx: int | None = None  # a Modelfile PARAMETER num_ctx override


@dataclass(frozen=True)
class GpuProcess:
    """One NVML compute process: a host PID holding memory on a GPU."""

    pid: int
    gpu_uuid: str
    used_bytes: int | None  # NVML may report "not available"


class OllamaApi(Protocol):
    """One Ollama server (`clients/ollama.py`)."""

    base_url: str

    def version(self) -> str: ...
    def ps(self) -> tuple[OllamaModel, ...]: ...
    def tags(self) -> tuple[TaggedModel, ...]: ...
    def show(self, model: str) -> ModelFacts: ...
    def unload(self, model: str) -> None:
        """keep_alive 0; returns at once, the VRAM comes back later (asynchronous)."""
        ...

    def preload(self, model: str, timeout_s: float, keep_alive: int | str | None = None) -> None:
        """Load with an empty prompt; blocks until loaded. Long timeout: a load dies with
        its client. `keep_alive` is sent only when given (it also withdraws a pending
        keep_alive-0 unload)."""
        ...


class ComfyApi(Protocol):
    """One ComfyUI server (`clients/comfyui.py`)."""

    base_url: str

    def system_stats(self) -> ComfyStats: ...
    def queue(self) -> ComfyQueue: ...
    def free(self, *, unload_models: bool, free_memory: bool) -> None:
        """Sets flags only; ComfyUI acts between prompts. Verify by reading VRAM."""
        ...


class ModelServerApi(Protocol):
    """A model server of a registry kind (`supervisor.tenants`: llama-server, llama-swap).
    Every failure raises ServiceError."""

    def served(self) -> ServedState:
        """Its models and their states; whether each is busy where one read can tell
        without side effects (else None)."""
        ...

    def models(self) -> tuple[str, ...]:
        """Every model it would serve a request for now, loaded or not (what a gate in
        front of several servers routes by); read without loading or waking anything."""
        ...

    def busy(self, model: str) -> bool | None:
        """Whether `model` serves a request now, read just before an unload; None when it
        cannot be told (then it is never unloaded)."""
        ...

    def unload(self, model: str) -> None:
        """Ask it to unload `model` (or put it to sleep, for a kind that sleeps); a model
        that is already gone is not an error."""
        ...

    def wake(self, model: str) -> None:
        """Wake a sleeping `model` (kinds whose `ServedState.can_wake`); others raise
        ServiceError."""
        ...

    def close(self) -> None: ...


class JobServerApi(Protocol):
    """A job server of a registry kind other than ComfyUI (A1111/Forge, InvokeAI ...).
    Every failure raises ServiceError."""

    def jobs(self) -> JobState:
        """Whether it works, whether it can be freed, what it holds when it says."""
        ...

    def free(self) -> None:
        """Give its VRAM back (only ever called while it is idle: see `jobs`)."""
        ...

    def close(self) -> None: ...


class ReloadingJobServerApi(JobServerApi, Protocol):
    """A job server whose free can park its weights in CPU RAM (`JobState.parked_bytes`),
    to be put back before its next job is fast (A1111)."""

    def reload(self) -> None:
        """Move the parked weights back to the GPU (only called while it is idle)."""
        ...


class GpuReader(Protocol):
    """Device and process memory (`vram/nvml.py`)."""

    def gpus(self) -> tuple[GpuMemory, ...]: ...
    def processes(self) -> tuple[GpuProcess, ...]: ...
    def close(self) -> None: ...


class DockerApi(Protocol):
    """The Docker calls the supervisor makes (`docker/`)."""

    def ping(self) -> None: ...
    def list_services(self) -> tuple[ContainerState, ...]:
        """Every container carrying `vram-supervisor.role`, running or not. Containers with
        a bad label are left out (and logged once by the adapter)."""
        ...

    def container_pids(self, container_id: str) -> tuple[int, ...]:
        """Host PIDs of the container's processes (`docker top`)."""
        ...

    def restart(self, container_id: str, timeout_s: float) -> None: ...

    def role_label(self, container_id: str) -> str | None:
        """The container's `vram-supervisor.role` label as it is now (inspect); None when
        the container is gone or carries none."""
        ...


class EventSource(Protocol):
    """Follows the Docker events stream in the background and calls `on_event` for each
    relevant container event (and after every reconnect, with "resync")."""

    reconnects: int
    connected: bool  # a stream is open now (for /metrics)

    def start(self, on_event: Callable[[str], None]) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class LoadRoom:
    """The room for an Ollama load: VRAM free now on the GPU Ollama uses, and the VRAM of
    those of Ollama's resident models that its own rule would evict for this load
    (model.evictable_bytes). A load that needs more than `free_bytes` makes
    Ollama evict (or spill): the gate then doubts what its /api/ps cache says is resident
    until the load is in."""

    free_bytes: int
    evictable_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.free_bytes + self.evictable_bytes


class RoomMaker(Protocol):
    """Makes room on the GPU before an Ollama load (used by the gate; implemented by the
    daemon on top of the same staged, verified free path as the loop, honouring
    VRAM_PRIORITY and VRAM_DRY_RUN). Thread-safe: the gate calls it from its own threads."""

    def room_for(self, need_bytes: int) -> LoadRoom | None:
        """The room for a load that needs `need_bytes` (the fit target included): free
        VRAM now on the GPU Ollama uses, and what Ollama's own rule would evict for this
        load. None: unknown."""
        ...

    def load_profile(self) -> OllamaProfile | None:
        """What the gate's Ollama does (generation, estimate params, fit target);
        None: not known, the gate's own defaults apply."""
        ...

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        """Free ComfyUI (soft, then hard) until free VRAM covers `need_bytes` or
        `deadline_s` seconds pass. True when the room is there."""
        ...


# --------------------------------------------------------------------------- acting
# What the action modules (`actions`, `ollama_actions`, `tenant_actions`) share: the
# services that may be acted on now, fresh VRAM readings for verification, and the face of
# the Actor the per-kind action modules call back into (`ActorPort`), so that they depend
# on this module only and `actions` alone imports them.


@dataclass(frozen=True)
class Reading:
    """VRAM attributed to one ComfyUI. `is_device_wide`: the GPU's used bytes (other
    processes included), because nothing narrower could be read."""

    bytes: int
    is_device_wide: bool = False


class Probe(Protocol):
    """Fresh VRAM readings for verification (implemented by the daemon over NVML/APIs)."""

    def comfy_reading(self, key: str, *, fresh_pids: bool = False) -> Reading | None:
        """What one ComfyUI holds. `fresh_pids`: list its container's PIDs again first
        (after a restart its processes are new)."""
        ...

    def free_bytes(self, gpu_uuids: tuple[str, ...] = ()) -> int | None:
        """Free VRAM on the best of these GPUs (where a model would land); () = any GPU."""
        ...


@dataclass(frozen=True)
class Targets:
    """The services that may be acted on now (running ones only), by ServiceSpec.key."""

    comfyuis: Mapping[str, tuple[ServiceSpec, ComfyApi]] = field(default_factory=dict)
    ollamas: Mapping[str, tuple[ServiceSpec, OllamaApi]] = field(default_factory=dict)
    # GPUs Ollama can load onto (granted, else where it holds memory); () = unknown/all.
    ollama_gpus: tuple[str, ...] = ()
    # ComfyUIs whose API has not answered for several passes in a row: a hung ComfyUI may
    # be restarted although its queue cannot be read (the policy's dead-API rule).
    dead_comfyuis: frozenset[str] = frozenset()
    # What each Ollama does (generation, estimate params, fit target), by key.
    ollama_profiles: Mapping[str, OllamaProfile] = field(default_factory=dict)
    # The model servers of the other registry kinds (llama-server, llama-swap ...).
    model_servers: Mapping[str, tuple[ServiceSpec, ModelServerApi]] = field(default_factory=dict)
    # The job servers of the other registry kinds (A1111/Forge, InvokeAI ...).
    job_servers: Mapping[str, tuple[ServiceSpec, JobServerApi]] = field(default_factory=dict)


class ActorPort(Protocol):
    """What the per-kind action modules use of the Actor (`actions.Actor` implements it)."""

    settings: Settings
    probe: Probe
    poll_s: float
    preload_timeout_s: float
    targets: Callable[[], Targets]
    clock: Callable[[], float]
    wall_clock: Callable[[], float]

    @property
    def lock(self) -> AbstractContextManager[bool]: ...

    @property
    def is_stopping(self) -> bool: ...

    def wait(self, seconds: float) -> bool: ...

    def dry(self, action: Action, what: str) -> Outcome: ...

    def announce_unload(self, model: str) -> None: ...

    def sending(self, target: str) -> AbstractContextManager[None]:
        """Around a request that acts on `target`: retried only while it is still ours."""
        ...

    def not_ours(self, target: str) -> str | None:
        """Why `target`'s container may no longer be acted on (None: it may)."""
        ...

    def serving(self, target: str) -> frozenset[str] | None:
        """Models with a request in flight through a gate; None: a gate could not say."""
        ...

    def free_comfy(
        self, action: FreeComfy, *, wait_pending_s: float = 0.0, verify_s: float | None = None
    ) -> Outcome: ...
