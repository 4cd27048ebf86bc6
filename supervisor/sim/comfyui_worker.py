"""The fake ComfyUI's engine: prompt queue, the worker thread, model memory and /free.

Behaviour follows api-facts 2.3, 2.4 and 2.7:
* One worker runs prompts in queue order. `/free` only stores flags; the worker acts on them
  between prompts (at once when idle, after the running prompt otherwise). It never
  interrupts a prompt; `/interrupt` does, at the next sampler step.
* `unload_models` defaults to `free_memory`. Unloading moves weights to the offload device:
  system RAM normally, the GPU itself under `highvram`, where only `free_memory` (which drops
  the cached models) gives the VRAM back. Either flag empties torch's cache.
* Smart memory: a model stays on the GPU after its job until `/free` or until another
  model needs the room. A job whose model does not fit loads what fits (lowvram) and runs
  slower; it never fails for lack of VRAM. Unlike Ollama, a later job loads more of a partly
  loaded model when room has come back.
* The process holds a CUDA context from start to exit, so it always shows in the GPU's
  process list with a few hundred MiB.
* `pinned` makes the worker drop /free flags: a ComfyUI that will not let go (the case that
  only a restart fixes).

Every duration is simulated seconds times `time_scale`.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from supervisor.sim.catalog import Catalog, CheckpointSpec
from supervisor.sim.gpu import GIB, MIB, SimGpu

HISTORY_CAP = 10000


@dataclass
class ComfyConfig:
    time_scale: float = 1.0
    highvram: bool = False
    pinned: bool = False
    context_bytes: int = 384 * MIB  # CUDA context + cuBLAS workspace, held until exit
    reserve_bytes: int = 500 * MIB  # --reserve-vram default: 400 MiB + 100 MiB over 15 GiB
    offload_penalty: float = 3.0  # a job with all weights in RAM runs (1 + this) x slower
    disk_bytes_per_s: float = 2 * GIB  # first load of a checkpoint
    ram_bytes_per_s: float = 12 * GIB  # reload of weights kept in RAM after an unload
    version: str = "0.3.64"
    pid: int | None = None


@dataclass
class Job:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    checkpoint: CheckpointSpec
    seconds: float
    steps: int
    queued_mono: float = field(default_factory=time.monotonic)

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class LoadedModel:
    spec: CheckpointSpec
    gpu_bytes: int = 0  # weights on the GPU (all of them unless lowvram)
    on_gpu_offload: bool = False  # highvram "unloaded": parked on the GPU itself


@dataclass
class ComfyStats:
    jobs_done: int = 0
    jobs_interrupted: int = 0
    jobs_lowvram: int = 0
    frees_requested: int = 0
    frees_handled: int = 0
    frees_ignored: int = 0
    freed_bytes: int = 0
    latencies_s: list[float] = field(default_factory=list)  # queued -> finished, simulated
    run_s: list[float] = field(default_factory=list)  # execution only, simulated

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        lat = self.latencies_s
        data["mean_latency_s"] = sum(lat) / len(lat) if lat else None
        data["max_latency_s"] = max(lat) if lat else None
        return data


class ComfyEngine:
    def __init__(self, gpu: SimGpu, catalog: Catalog, config: ComfyConfig) -> None:
        self.gpu = gpu
        self.catalog = catalog
        self.config = config
        self.pid = config.pid if config.pid is not None else os.getpid()
        self.stats = ComfyStats()
        self._cond = threading.Condition()
        self._pending: list[tuple[float, int, Job]] = []
        self._seq = 0
        self._number = 0
        self._running: Job | None = None
        self._flags: dict[str, bool] = {}
        self._interrupt = False
        self._stop = False
        self._history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.models: dict[str, LoadedModel] = {}
        self.workspace_bytes = 0
        self.workspace_active = False
        # torch initialises CUDA at startup: the context exists before any prompt.
        self.gpu.allocate_partial("comfyui:context", self.pid, config.context_bytes)
        self._worker = threading.Thread(target=self._work, daemon=True, name="sim-comfy-worker")
        self._worker.start()

    # ------------------------------------------------------------------ queue API

    def submit(self, job_fields: dict[str, Any], front: bool) -> Job:
        with self._cond:
            number = job_fields.pop("number", None)
            if number is None:
                number = -self._number if front else self._number
                self._number += 1
            job = Job(number=number, **job_fields)
            self._seq += 1
            heapq.heappush(self._pending, (job.number, self._seq, job))
            self._cond.notify_all()
            return job

    def queue(self) -> tuple[list[Job], list[Job]]:
        with self._cond:
            running = [self._running] if self._running else []
            return running, [entry[2] for entry in self._pending]

    def remaining(self) -> int:
        with self._cond:
            return len(self._pending) + (1 if self._running else 0)

    def edit_queue(self, clear: bool, delete: list[str]) -> None:
        with self._cond:
            keep = [e for e in self._pending if not clear and e[2].prompt_id not in delete]
            heapq.heapify(keep)
            self._pending = keep

    def interrupt(self, prompt_id: str | None) -> None:
        with self._cond:
            if prompt_id is None or (self._running and self._running.prompt_id == prompt_id):
                self._interrupt = True

    def set_flags(self, flags: dict[str, Any]) -> None:
        with self._cond:
            self.stats.frees_requested += 1
            for key in ("unload_models", "free_memory"):
                if flags.get(key):  # only truthy values are stored (api-facts 2.3)
                    self._flags[key] = True
            self._cond.notify_all()

    def history(self, prompt_id: str | None = None) -> dict[str, Any]:
        with self._cond:
            if prompt_id is not None:
                entry = self._history.get(prompt_id)
                return {prompt_id: entry} if entry else {}
            return dict(self._history)

    def edit_history(self, clear: bool, delete: list[str]) -> None:
        with self._cond:
            if clear:
                self._history.clear()
            for pid in delete:
                self._history.pop(pid, None)

    # ------------------------------------------------------------------ memory view

    def memory(self) -> dict[str, int]:
        """torch's view: reserved, active; the device's view: free, total."""
        with self._cond:
            weights = sum(m.gpu_bytes for m in self.models.values())
            reserved = weights + self.workspace_bytes
            active = weights + (self.workspace_bytes if self.workspace_active else 0)
        snap = self.gpu.snapshot()
        return {
            "total": snap.total_bytes,
            "free": snap.free_bytes,
            "reserved": reserved,
            "active": active,
        }

    def stats_json(self) -> dict[str, Any]:
        with self._cond:
            data = self.stats.to_json()
            data["models"] = {n: m.gpu_bytes for n, m in self.models.items()}
        data["memory"] = self.memory()
        return data

    def reset_stats(self) -> None:
        with self._cond:
            self.stats = ComfyStats()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._interrupt = True
            self._cond.notify_all()
        self._worker.join(timeout=5)
        self.gpu.release_prefix("comfyui:")

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._flags and not self._stop:
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    return
                job = heapq.heappop(self._pending)[2] if self._pending else None
                self._running = job
            if job is not None:
                self._execute(job)
                with self._cond:
                    self._running = None
            with self._cond:
                flags, self._flags = self._flags, {}
            if flags:
                self._handle_free(flags)

    def _sleep(self, sim_s: float) -> bool:
        """Sleep; False if interrupted or stopping meanwhile."""
        deadline = time.monotonic() + sim_s * self.config.time_scale
        with self._cond:
            while not (self._interrupt or self._stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(timeout=left)
            return False

    def _ensure_workspace(self, need: int) -> None:
        if self.workspace_bytes < need:
            self.workspace_bytes += self.gpu.allocate_partial(
                "comfyui:workspace", self.pid, need - self.workspace_bytes
            )

    def _make_room(self, keep: str, need: int) -> None:
        """free_memory(): unload other models, least recently used first, until `need` fits."""
        for name in list(self.models):
            if self.gpu.free_bytes() - self.config.reserve_bytes >= need:
                return
            if name != keep and not self.config.highvram:
                self._unload_model(name)

    def _unload_model(self, name: str) -> int:
        model = self.models[name]
        freed = self.gpu.release(f"comfyui:model:{name}")
        model.gpu_bytes = 0
        return freed

    def _load(self, spec: CheckpointSpec) -> tuple[float, float]:
        """Load weights for a job; returns (fraction on GPU, simulated load seconds)."""
        model = self.models.pop(spec.name, None)
        fresh = model is None
        model = model or LoadedModel(spec)
        self.models[spec.name] = model  # most recently used last
        missing = spec.size_bytes - model.gpu_bytes
        if missing > 0:
            self._make_room(spec.name, missing + spec.workspace_bytes)
        self._ensure_workspace(spec.workspace_bytes)
        granted = 0
        if missing > 0:
            granted = self.gpu.allocate_partial(
                f"comfyui:model:{spec.name}",
                self.pid,
                missing,
                keep_free_bytes=self.config.reserve_bytes,
                step_bytes=64 * MIB,
            )
            model.gpu_bytes += granted
        speed = self.config.disk_bytes_per_s if fresh else self.config.ram_bytes_per_s
        load_s = (granted if not fresh else spec.size_bytes) / speed
        return model.gpu_bytes / spec.size_bytes, load_s

    def _execute(self, job: Job) -> None:
        start = time.monotonic()
        with self._cond:
            self._interrupt = False  # a stale flag is cleared when a prompt starts
        messages: list[list[Any]] = [
            ["execution_start", {"prompt_id": job.prompt_id, "timestamp": _ms()}]
        ]
        with self._cond:  # the HTTP threads read `models` for /system_stats
            fraction, load_s = self._load(job.checkpoint)
            self.workspace_active = True
        completed = self._sleep(load_s)
        per_step = (
            job.seconds / max(1, job.steps) * (1 + self.config.offload_penalty * (1 - fraction))
        )
        for _ in range(job.steps):
            if not completed or not self._sleep(per_step):
                completed = False
                break
        with self._cond:
            self.workspace_active = False
            now = time.monotonic()
            scale = self.config.time_scale
            outputs: dict[str, Any] = {}
            if completed:
                self.stats.jobs_done += 1
                self.stats.latencies_s.append(round((now - job.queued_mono) / scale, 4))
                self.stats.run_s.append(round((now - start) / scale, 4))
                messages.append(
                    ["execution_success", {"prompt_id": job.prompt_id, "timestamp": _ms()}]
                )
                for node in job.outputs:
                    name = f"ComfyUI_{self.stats.jobs_done:05d}_.png"
                    outputs[node] = {
                        "images": [{"filename": name, "subfolder": "", "type": "output"}]
                    }
            else:
                self.stats.jobs_interrupted += 1
                messages.append(
                    [
                        "execution_interrupted",
                        {
                            "prompt_id": job.prompt_id,
                            "node_id": job.outputs[0] if job.outputs else "",
                            "node_type": "KSampler",
                            "executed": [],
                            "timestamp": _ms(),
                        },
                    ]
                )
            self.stats.jobs_lowvram += int(fraction < 1)
            self._history[job.prompt_id] = {
                "prompt": job.item(),
                "outputs": outputs,
                "meta": {},
                "status": {
                    "status_str": "success" if completed else "error",
                    "completed": completed,
                    "messages": messages,
                },
            }
            while len(self._history) > HISTORY_CAP:
                self._history.popitem(last=False)

    def _handle_free(self, flags: dict[str, bool]) -> None:
        if self.config.pinned:
            with self._cond:
                self.stats.frees_ignored += 1
            return
        freed = 0
        free_memory = flags.get("free_memory", False)
        with self._cond:  # the HTTP threads read `models` for /system_stats
            if flags.get("unload_models", free_memory):
                for name, model in self.models.items():
                    if self.config.highvram:
                        model.on_gpu_offload = True  # the offload device is the GPU itself
                    else:
                        freed += self._unload_model(name)
            if free_memory:
                # Dropping the executor's caches drops the model objects, wherever they sit.
                for name in list(self.models):
                    freed += self._unload_model(name)
                self.models.clear()
            # gc.collect() + torch.cuda.empty_cache(): the allocator's cache goes back.
            freed += self.gpu.release("comfyui:workspace")
            self.workspace_bytes = 0
            self.stats.frees_handled += 1
            self.stats.freed_bytes += freed

    def new_prompt_id(self) -> str:
        return str(uuid.uuid4())


def _ms() -> int:
    return int(time.time() * 1000)
