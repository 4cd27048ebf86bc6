"""Hand-written fakes of the daemon's Protocols, following api-facts.md.

One `FakeGpu` holds what each process has on the device; the fakes move bytes on it:
- FakeComfy: `/free` only sets flags and answers at once (api-facts 2.3). The flags act
  immediately when the worker is idle, otherwise when the running prompt ends (on the fake
  clock). `unload_models` releases the models unless `highvram` (the models are offloaded
  to the GPU itself, gotcha 9); `free_memory` also drops the cache. The CUDA context stays.
- FakeOllama: `unload` answers at once; the model leaves /api/ps at once but its VRAM comes
  back `release_delay_s` later (api-facts 1.3, gotcha 2). While a request is in flight
  (`busy_until`) the unload is only armed (keep-alive 0) and happens when the request ends,
  unless a request with a keep_alive replaces it first (api-facts 1.6/1.7). `preload`
  places as many bytes on the GPU as fit (partial offload, gotcha 3), with the keep-alive
  given or OLLAMA_KEEP_ALIVE's default 5m; `expires_at` is about year 2318 for forever.
- FakeGpuReader: NVML-like device and per-process figures (host PIDs).
- FakeDocker: labelled containers, `docker top` PIDs and restarts.
Every fake can be told to fail (`fail = ServiceError(...)` etc.) or to return garbage.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from supervisor.errors import DockerUnavailable, NvmlUnavailable, ServiceError
from supervisor.model import (
    ComfyQueue,
    ComfyStats,
    ContainerState,
    GpuMemory,
    OllamaModel,
    Role,
    ServiceSpec,
)
from supervisor.ports import GpuProcess, ModelFacts, TaggedModel
from supervisor.units import GIB, MIB

GPU_UUID = "GPU-fake-0"
WALL_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the wall time at FakeClock 0


class FakeClock:
    """Monotonic time that moves only when someone sleeps; sleeping runs the tickers."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.tickers: list[Callable[[float], None]] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        """Unix time that moves with the fake clock."""
        return WALL_EPOCH + self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += max(seconds, 0.0)
            now = self.now
        for tick in list(self.tickers):
            tick(now)


@dataclass
class FakeGpu:
    total_bytes: int = 24 * GIB
    held: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    uuid: str = GPU_UUID
    index: int = 0  # NVML index

    @property
    def used_bytes(self) -> int:
        return sum(self.held.values())

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    def memory(self) -> GpuMemory:
        return GpuMemory(
            self.uuid, self.index, "Fake RTX", self.total_bytes, self.used_bytes, self.free_bytes
        )


class FakeComfy:
    CONTEXT_BYTES = 300 * MIB

    def __init__(
        self,
        gpu: FakeGpu,
        clock: FakeClock,
        *,
        pid: int = 4242,
        models_bytes: int = 10 * GIB,
        cache_bytes: int = 1 * GIB,
        highvram: bool = False,
        base_url: str = "http://comfyui:8188",
        dynamic_vram: bool = False,
    ) -> None:
        self.gpu, self.clock, self.pid = gpu, clock, pid
        self.models_bytes, self.cache_bytes = models_bytes, cache_bytes
        self.highvram = highvram
        # ComfyUI >= 0.15 with Dynamic VRAM: the weights are outside torch's figures.
        self.dynamic_vram = dynamic_vram
        self.stuck = False  # a leak: /free releases nothing at all
        self.base_url = base_url
        self.running_until: float | None = None
        self.pending = 0
        self.flags: set[str] = set()
        self.free_calls: list[tuple[bool, bool]] = []
        self.queue_calls = 0
        self.fail: Exception | None = None
        self.fail_free: Exception | None = None
        clock.tickers.append(self._tick)
        self._sync()

    # test helpers
    def start_prompt(self, seconds: float) -> None:
        self.running_until = self.clock.now + seconds

    def restart(self, new_pid: int) -> None:
        """A container restart: a new process with nothing loaded, only its CUDA context
        (the old process's memory goes with it), its queue empty, its API answering."""
        self.gpu.held.pop(self.pid, None)
        self.pid = new_pid
        self.models_bytes = self.cache_bytes = 0
        self.running_until, self.pending, self.fail, self.stuck = None, 0, None, False
        self.flags.clear()
        self._sync()

    def _sync(self) -> None:
        self.gpu.held[self.pid] = self.CONTEXT_BYTES + self.models_bytes + self.cache_bytes

    def _tick(self, now: float) -> None:
        if self.running_until is not None and now >= self.running_until:
            self.running_until = None
            self._apply_flags()

    def _apply_flags(self) -> None:
        # api-facts 2.3: unload_models defaults to free_memory; both act between prompts.
        if self.flags & {"unload_models", "free_memory"} and not self.stuck:
            if "free_memory" in self.flags or not self.highvram:
                self.models_bytes = 0
            self.cache_bytes = 0
        self.flags.clear()
        self._sync()

    # ComfyApi
    def system_stats(self) -> ComfyStats:
        if self.fail:
            raise self.fail
        dynamic = self.dynamic_vram
        reserved = (0 if dynamic else self.models_bytes) + self.cache_bytes
        return ComfyStats(
            "cuda:0 Fake RTX : cudaMallocAsync",
            "cuda",
            self.gpu.total_bytes,
            self.gpu.free_bytes + self.cache_bytes,
            reserved,
            self.cache_bytes,
            version="0.38.1" if dynamic else "0.3.64",
            argv=("main.py", "--listen", "0.0.0.0"),
            packages=("comfy-aimdo",) if dynamic else (),
        )

    def queue(self) -> ComfyQueue:
        self.queue_calls += 1
        if self.fail:
            raise self.fail
        return ComfyQueue(running=1 if self.running_until is not None else 0, pending=self.pending)

    def free(self, *, unload_models: bool, free_memory: bool) -> None:
        if self.fail or self.fail_free:
            raise (self.fail or self.fail_free)  # type: ignore[misc]
        self.free_calls.append((unload_models, free_memory))
        self.flags |= {
            name
            for name, on in (("unload_models", unload_models), ("free_memory", free_memory))
            if on
        }
        if self.running_until is None:
            self._apply_flags()  # idle worker: processed within milliseconds

    def close(self) -> None:
        pass


class FakeOllama:
    def __init__(
        self,
        gpu: FakeGpu,
        clock: FakeClock,
        *,
        runner_pid_base: int = 7000,
        release_delay_s: float = 1.0,
        base_url: str = "http://ollama:11434",
        installed: dict[str, int] | None = None,
    ) -> None:
        self.gpu, self.clock = gpu, clock
        self.base_url = base_url
        self.version_text = "0.12.5"  # /api/version
        self.version_calls = 0
        self.release_delay_s = release_delay_s
        self.installed = installed or {"llama3.2:latest": 4 * GIB}
        self.models: dict[str, OllamaModel] = {}
        self.pids: dict[str, int] = {}
        self._next_pid = runner_pid_base
        self._releasing: list[tuple[float, int]] = []
        self.unload_calls: list[str] = []
        self.preload_calls: list[str] = []
        self.fail: Exception | None = None
        self.garbage = False
        self.busy_until: dict[str, float] = {}  # a request in flight defers the unload
        self.default_keep_alive_s = 300.0  # OLLAMA_KEEP_ALIVE's default, 5m
        self.keep_alive_s: dict[str, float] = {}  # each runner's session; <0 forever, 0 armed
        self.preload_keep_alives: list[int | str | None] = []
        # Ollama before 0.30: a model that does not fit beside the others makes Ollama
        # unload them first (api-facts 1.8); off: it places what fits beside them.
        self.evicts_own = False
        clock.tickers.append(self._tick)

    def load(
        self,
        name: str,
        size_bytes: int | None = None,
        margin: int = 512 * MIB,
        keep_alive_s: float | None = None,
    ) -> None:
        """What Ollama does on a request: place what fits now, the rest on the CPU."""
        size = size_bytes or self.installed[name]
        if self.evicts_own and size > self.gpu.free_bytes - margin:
            for other in [m for m in self.models if m != name]:
                self._unload_now(other)
                self.gpu.held.pop(self.pids.get(other, -1), None)
            for _, pid in self._releasing:  # Ollama waits for their memory to come back
                self.gpu.held.pop(pid, None)
        on_gpu = max(0, min(size, self.gpu.free_bytes - margin))
        pid = self._next_pid
        self._next_pid += 1
        self.pids[name] = pid
        self.gpu.held[pid] = on_gpu
        self.models[name] = OllamaModel(name, size, on_gpu, digest="d" * 64)
        self._set_keep_alive(
            name, self.default_keep_alive_s if keep_alive_s is None else keep_alive_s
        )

    def _set_keep_alive(self, name: str, seconds: float) -> None:
        self.keep_alive_s[name] = seconds
        now = datetime.fromtimestamp(self.clock.wall(), UTC)
        # A negative keep-alive is Go's longest duration, 2^63-1 ns (~292 years, gotcha 6).
        forever = timedelta(microseconds=(2**63 - 1) // 1000)
        expires = now + (forever if seconds < 0 else timedelta(seconds=seconds))
        text = expires.isoformat(timespec="microseconds").replace("+00:00", "Z")
        self.models[name] = replace(self.models[name], expires_at=text)

    def _unload_now(self, model: str) -> None:
        del self.models[model]
        self.keep_alive_s.pop(model, None)
        pid = self.pids.pop(model)
        self._releasing.append((self.clock.now + self.release_delay_s, pid))

    def _tick(self, now: float) -> None:
        for name, until in list(self.busy_until.items()):
            if now >= until:
                del self.busy_until[name]
                # The request ended: an armed unload happens now, else the timer restarts.
                if name in self.models and self.keep_alive_s.get(name) == 0:
                    self._unload_now(name)
                elif name in self.models:
                    self._set_keep_alive(name, self.keep_alive_s[name])
        for due, pid in list(self._releasing):
            if now >= due:
                self.gpu.held.pop(pid, None)
                self._releasing.remove((due, pid))

    # OllamaApi
    def version(self) -> str:
        if self.fail:
            raise self.fail
        self.version_calls += 1
        return self.version_text

    def ps(self) -> tuple[OllamaModel, ...]:
        if self.fail:
            raise self.fail
        if self.garbage:
            raise ServiceError("ollama", "GET /api/ps: expected an object, got a list")
        return tuple(self.models.values())

    def tags(self) -> tuple[TaggedModel, ...]:
        return tuple(TaggedModel(n, s) for n, s in self.installed.items())

    def show(self, model: str) -> ModelFacts:
        return ModelFacts(model)

    def unload(self, model: str) -> None:
        if self.fail:
            raise self.fail
        self.unload_calls.append(model)
        if model in self.busy_until and model in self.models:
            self._set_keep_alive(model, 0)  # armed: unloads when the request ends (1.6)
            return
        if model in self.models:
            self._unload_now(model)

    def preload(self, model: str, timeout_s: float, keep_alive: int | str | None = None) -> None:
        if self.fail:
            raise self.fail
        self.preload_calls.append(model)
        self.preload_keep_alives.append(keep_alive)
        seconds = None if keep_alive is None else go_seconds(keep_alive)
        if model not in self.models:
            self.load(model, keep_alive_s=seconds)
        elif seconds is not None:
            # A request with keep_alive replaces the runner's session (api-facts 1.7),
            # which also withdraws an armed unload.
            self._set_keep_alive(model, seconds)

    def close(self) -> None:
        pass


def go_seconds(keep_alive: int | str) -> float:
    """Ollama's keep_alive: a number is seconds, a string a Go duration ("5m", "-1")."""
    if isinstance(keep_alive, int):
        return float(keep_alive)
    total, found = 0.0, False
    for number, unit in re.findall(r"(-?\d+(?:\.\d+)?)(h|m|s)?", keep_alive):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
        found = True
    if not found:
        raise ValueError(f"not a Go duration: {keep_alive!r}")
    return total


class FakeGpuReader:
    """NVML over one or more fake GPUs (each process listed on the GPU it holds)."""

    def __init__(self, gpu: FakeGpu, *more: FakeGpu) -> None:
        self.gpu = gpu
        self.all = (gpu, *more)
        self.fail: Exception | None = None
        # WSL2 / Docker Desktop: NVML lists no processes. WDDM: it lists them, but
        # usedGpuMemory is None (api-facts 4, gotcha 20). Device memory works in both.
        self.lists_processes = True
        self.process_memory = True

    def gpus(self) -> tuple[GpuMemory, ...]:
        if self.fail:
            raise self.fail
        return tuple(g.memory() for g in self.all)

    def processes(self) -> tuple[GpuProcess, ...]:
        if self.fail:
            raise self.fail
        if not self.lists_processes:
            return ()
        return tuple(
            GpuProcess(pid, g.uuid, b if self.process_memory else None)
            for g in self.all
            for pid, b in g.held.items()
        )

    def close(self) -> None:
        pass


@dataclass
class FakeContainer:
    spec: ServiceSpec
    status: str = "running"
    pids: tuple[int, ...] = ()
    pids_fn: Callable[[], tuple[int, ...]] | None = None
    unlabelled: bool = False  # its role label was removed (recreated without it)


class FakeDocker:
    def __init__(self) -> None:
        self.containers: dict[str, FakeContainer] = {}
        self.fail: Exception | None = None
        self.restarts: list[str] = []
        self.on_restart: Callable[[str], None] | None = None
        self.on_list: Callable[[], None] | None = None  # runs while a listing is under way
        self.list_calls = 0
        self.top_calls = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def add(
        self,
        role: Role,
        name: str,
        url: str,
        *,
        pids: tuple[int, ...] = (),
        pids_fn: Callable[[], tuple[int, ...]] | None = None,
        restart_allowed: bool | None = None,
    ) -> FakeContainer:
        spec = ServiceSpec(
            role, name, url, container_id=f"id-{name}", restart_allowed=restart_allowed
        )
        container = FakeContainer(spec, pids=pids, pids_fn=pids_fn)
        self.containers[name] = container
        return container

    def ping(self) -> None:
        if self.fail:
            raise self.fail

    def list_services(self) -> tuple[ContainerState, ...]:
        self.list_calls += 1
        if self.fail:
            raise self.fail
        if self.on_list:
            self.on_list()
        return tuple(
            ContainerState(c.spec, c.status, pid=c.pids[0] if c.pids else 0)
            for c in self.containers.values()
        )

    def container_pids(self, container_id: str) -> tuple[int, ...]:
        self.top_calls += 1
        if self.fail:
            raise self.fail
        for c in self.containers.values():
            if c.spec.container_id == container_id:
                return c.pids_fn() if c.pids_fn else c.pids
        raise DockerUnavailable(f"no such container {container_id}")

    def role_label(self, container_id: str) -> str | None:
        if self.fail:
            raise self.fail
        for c in self.containers.values():
            if c.spec.container_id == container_id:
                return None if c.unlabelled else str(c.spec.role)
        return None

    def restart(self, container_id: str, timeout_s: float) -> None:
        if self.fail:
            raise self.fail
        self.restarts.append(container_id)
        if self.on_restart:
            self.on_restart(container_id)


class FakeEvents:
    def __init__(self) -> None:
        self.reconnects = 0
        self.connected = True
        self.on_event: Callable[[str], None] | None = None
        self.stopped = False

    def start(self, on_event: Callable[[str], None]) -> None:
        self.on_event = on_event

    def stop(self) -> None:
        self.stopped = True

    def emit(self, kind: str) -> None:
        assert self.on_event is not None
        self.on_event(kind)


NVML_DOWN = NvmlUnavailable("NVML call failed: GPU is lost")
