"""The seams between the daemon and the outside world, as Protocols.

Real adapters (`clients/`, `vram/`, `docker/`) and the hand-written fakes in tests implement
the same Protocols. Every method raises only the package's own errors (`errors.py`):
`ServiceError` for Ollama/ComfyUI, `DockerUnavailable` for Docker, `NvmlUnavailable` for NVML.
Adapters own their retries; callers treat an error as "this reading is missing this pass".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from supervisor.model import (
    ComfyQueue,
    ComfyStats,
    ContainerState,
    GpuMemory,
    JobState,
    OllamaModel,
    ServedState,
)

if TYPE_CHECKING:  # ollama_profile -> estimate -> ports: types only
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


class EventSource(Protocol):
    """Follows the Docker events stream in the background and calls `on_event` for each
    relevant container event (and after every reconnect, with "resync")."""

    reconnects: int
    connected: bool  # a stream is open now (for /metrics)

    def start(self, on_event: Callable[[str], None]) -> None: ...
    def stop(self) -> None: ...


class RoomMaker(Protocol):
    """Makes room on the GPU before an Ollama load (used by the gate; implemented by the
    daemon on top of the same staged, verified free path as the loop, honouring
    VRAM_PRIORITY and VRAM_DRY_RUN). Thread-safe: the gate calls it from its own threads."""

    def room_for(self, need_bytes: int) -> int | None:
        """The room for a load that needs `need_bytes` (the fit target included): free
        VRAM now on the GPU Ollama uses (None: unknown), plus the VRAM of those of
        Ollama's resident models that its own rule would evict for this load
        (ollama_profile.evictable_bytes)."""
        ...

    def load_profile(self) -> OllamaProfile | None:
        """What the gate's Ollama does (generation, estimate params, fit target);
        None: not known, the gate's own defaults apply."""
        ...

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        """Free ComfyUI (soft, then hard) until free VRAM covers `need_bytes` or
        `deadline_s` seconds pass. True when the room is there."""
        ...
