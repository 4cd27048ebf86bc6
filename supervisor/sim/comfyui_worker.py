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
* Dynamic VRAM (api-facts-2026 section 2; the default of ComfyUI >= 0.15, `profile` 2026):
  weights live outside PyTorch's allocator, so torch's reserved figure shows only the
  job's workspace, and torch's cache is emptied after every node: after a job
  `torch_vram_total` is 0 while the weights stay. Weights go back only on `/free` or under
  pressure during ComfyUI's own job (free memory below 256 MiB + `--vram-headroom`); an
  idle ComfyUI releases nothing. `--disable-dynamic-vram`, `--highvram` and `--cpu` turn it
  off. The Linux reserve of 0.15+ is 400 MiB (the 2025 profile keeps 500 MiB).
* `--cpu`: no GPU at all (no CUDA context, nothing allocated); jobs run at CPU speed.
* Nodes run one after another. An interrupt takes effect between nodes; a sampler (or a
  SimJob) also checks at each step, as the real progress hook does. A node that started
  runs to its end otherwise, and the history names the node where the prompt stopped.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.sim.catalog import Catalog, CheckpointSpec
from supervisor.sim.comfyui_prompt import Plan, PlanNode
from supervisor.sim.gpu import GIB, MIB, SimGpu
from supervisor.sim.profiles import DEFAULT_PROFILE, parse_profile

HISTORY_CAP = 10000
# Dynamic VRAM gives weights back during a job when free memory falls below this plus
# --vram-headroom (comfy-aimdo's pressure threshold, api-facts-2026 section 2).
AIMDO_PRESSURE_BYTES = 256 * MIB
AIMDO_VERSION = "0.5.5"


@dataclass
class ComfyConfig:
    """The fake's settings. The defaults are the 2026 profile (ComfyUI 0.38, Dynamic VRAM);
    `ComfyConfig.for_profile("2025")` is ComfyUI 0.3.64 as simulated before."""

    time_scale: float = 1.0
    highvram: bool = False
    pinned: bool = False
    cpu: bool = False  # --cpu: no GPU used at all
    disable_dynamic_vram: bool = False  # --disable-dynamic-vram
    headroom_bytes: int = 0  # --vram-headroom (GB on the command line)
    context_bytes: int = 384 * MIB  # CUDA context + cuBLAS workspace, held until exit
    reserve_bytes: int = 400 * MIB  # --reserve-vram default on Linux (0.15+)
    offload_penalty: float = 3.0  # a job with all weights in RAM runs (1 + this) x slower
    disk_bytes_per_s: float = 2 * GIB  # first load of a checkpoint
    ram_bytes_per_s: float = 12 * GIB  # reload of weights kept in RAM after an unload
    version: str = "0.38.1"
    aimdo_version: str | None = AIMDO_VERSION  # None: comfy-aimdo not installed
    profile: str = DEFAULT_PROFILE
    pid: int | None = None

    @classmethod
    def for_profile(cls, profile: str, **fields: Any) -> ComfyConfig:
        """The settings of one generation: "2026" (default) or "2025" (0.3.64)."""
        if parse_profile(profile, "profile") == "2025":
            base: dict[str, Any] = {
                "version": "0.3.64",
                "aimdo_version": None,
                # 400 MiB + 100 MiB over 15 GiB of VRAM, as 0.3.64 did on every OS.
                "reserve_bytes": 500 * MIB,
                "profile": "2025",
            }
            return cls(**{**base, **fields})
        return cls(**fields)

    @property
    def dynamic_vram(self) -> bool:
        """Dynamic VRAM is on: comfy-aimdo installed and no flag turning it off."""
        return (
            self.aimdo_version is not None
            and not self.disable_dynamic_vram
            and not self.highvram
            and not self.cpu
        )

    @property
    def argv(self) -> list[str]:
        """ComfyUI's command line as /system_stats reports it."""
        argv = ["main.py", "--listen", "0.0.0.0"]
        if self.cpu:
            argv.append("--cpu")
        if self.highvram:
            argv.append("--highvram")
        if self.disable_dynamic_vram:
            argv.append("--disable-dynamic-vram")
        if self.headroom_bytes:
            argv += ["--vram-headroom", f"{self.headroom_bytes / GIB:g}"]
        return argv


@dataclass
class Job:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    plan: Plan
    queued_mono: float = field(default_factory=time.monotonic)

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class LoadedModel:
    spec: CheckpointSpec
    gpu_bytes: int = 0  # weights on the GPU (all of them unless lowvram)
    on_gpu_offload: bool = False  # highvram "unloaded": parked on the GPU itself


LOWVRAM_TRACE_CAP = 1000  # entries kept in ComfyStats.lowvram_jobs


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
    # One entry per job that loaded its weights only in part: what held the GPU then
    # (`ComfyEngine.lowvram_trace`), for the benchmark to say why.
    lowvram_jobs: list[dict[str, Any]] = field(default_factory=list)

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
        # The other tenants' models on the same GPU, for the low-VRAM trace (SimHost wires
        # the fake Ollama's `Scheduler.holders`): model, vram_bytes, busy, loaded_mono.
        self.neighbours: Callable[[], list[dict[str, Any]]] | None = None
        self.workspace_active = False
        self._saved: dict[str, int] = {}  # filename prefix -> images saved so far
        # /ws: called with (event, data, client_id of the prompt or None); `status` events
        # go to every socket, the hub (comfyui.py) routes the rest (api-facts 2.5).
        self.on_event: Callable[[str, dict[str, Any], str | None], None] | None = None
        if not config.cpu:
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
        self._status()
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
        self._status()

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
        """torch's view: reserved, active; the device's view: free, total. Under Dynamic
        VRAM the weights are in neither torch figure (comfy-aimdo maps them itself)."""
        with self._cond:
            weights = sum(m.gpu_bytes for m in self.models.values())
            held = weights + self.workspace_bytes
            if self.config.dynamic_vram:
                weights = 0
            reserved = weights + self.workspace_bytes
            active = weights + (self.workspace_bytes if self.workspace_active else 0)
        snap = self.gpu.snapshot()
        return {
            "total": snap.total_bytes,
            "free": snap.free_bytes,
            "reserved": reserved,
            "active": active,
            "held": held,  # weights + workspace on the GPU, whatever torch reports
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
                self._status()
                self._execute(job)
                with self._cond:
                    self._running = None
                self._status()
            with self._cond:
                flags, self._flags = self._flags, {}
            if flags:
                self._handle_free(flags)

    def _emit(self, event: str, data: dict[str, Any], job: Job | None) -> None:
        on_event = self.on_event
        if on_event is not None:
            client_id = job.extra_data.get("client_id") if job is not None else None
            on_event(event, data, client_id if isinstance(client_id, str) else None)

    def _status(self) -> None:
        """ComfyUI's queue_updated(): `status` to every socket."""
        self._emit("status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}}, None)

    def _sleep(self, sim_s: float, *, interruptible: bool = True) -> bool:
        """Sleep; False if interrupted (when `interruptible`) or stopping meanwhile."""
        deadline = time.monotonic() + sim_s * self.config.time_scale
        with self._cond:
            while not ((self._interrupt and interruptible) or self._stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._cond.wait(timeout=left)
            return False

    def _interrupted(self) -> bool:
        with self._cond:
            return self._interrupt or self._stop

    def _keep_free(self) -> int:
        """What loads leave free: comfy-aimdo's pressure threshold under Dynamic VRAM,
        else the reserve (--reserve-vram)."""
        if self.config.dynamic_vram:
            return AIMDO_PRESSURE_BYTES + self.config.headroom_bytes
        return self.config.reserve_bytes

    def _ensure_workspace(self, need: int) -> None:
        if self.workspace_bytes < need:
            self.workspace_bytes += self.gpu.allocate_partial(
                "comfyui:workspace", self.pid, need - self.workspace_bytes
            )

    def _empty_cache(self) -> int:
        """torch.cuda.empty_cache(): the allocator's cache goes back to the driver."""
        freed = self.gpu.release("comfyui:workspace")
        self.workspace_bytes = 0
        return freed

    def _make_room(self, keep: str, need: int) -> None:
        """free_memory(): unload other models, least recently used first, until `need` fits."""
        for name in list(self.models):
            if self.gpu.free_bytes() - self._keep_free() >= need:
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
        speed = self.config.disk_bytes_per_s if fresh else self.config.ram_bytes_per_s
        if self.config.cpu:
            return 0.0, (spec.size_bytes / speed if fresh else 0.0)
        missing = spec.size_bytes - model.gpu_bytes
        granted = 0
        if missing > 0:
            self._make_room(spec.name, missing + spec.workspace_bytes)
            granted = self.gpu.allocate_partial(
                f"comfyui:model:{spec.name}",
                self.pid,
                missing,
                keep_free_bytes=self._keep_free()
                + max(0, spec.workspace_bytes - self.workspace_bytes),
                step_bytes=64 * MIB,
            )
            model.gpu_bytes += granted
        load_s = (granted if not fresh else spec.size_bytes) / speed
        return model.gpu_bytes / spec.size_bytes, load_s

    def lowvram_trace(self, spec: CheckpointSpec, job: Job) -> dict[str, Any]:
        """What held the GPU when `spec` loaded only in part (under `_cond`)."""
        model = self.models[spec.name]
        others = self.neighbours() if self.neighbours is not None else []
        return {
            "prompt_id": job.prompt_id,
            "checkpoint": spec.name,
            "short_bytes": spec.size_bytes - model.gpu_bytes,
            "free_bytes": self.gpu.free_bytes(),
            "comfy_other_bytes": sum(
                m.gpu_bytes for name, m in self.models.items() if name != spec.name
            ),
            "workspace_bytes": self.workspace_bytes,
            "waited_s": round((time.monotonic() - job.queued_mono) / self.config.time_scale, 2),
            "llm": [
                {
                    "model": o["model"],
                    "vram_bytes": o["vram_bytes"],
                    "busy": o["busy"],
                    "since_queued": o["loaded_mono"] > job.queued_mono,
                }
                for o in others
            ],
        }

    def _run_node(self, node: PlanNode, job: Job, fraction: float) -> tuple[bool, float]:
        """Run one node; (whether it ran to its end, the GPU fraction of the weights)."""
        spec = job.plan.checkpoint
        if node.loads:
            with self._cond:  # the HTTP threads read `models` for /system_stats
                fraction, load_s = self._load(spec)
                traced = self.stats.lowvram_jobs
                if (
                    fraction < 1
                    and not self.config.cpu
                    and len(traced) < LOWVRAM_TRACE_CAP
                    and not (traced and traced[-1]["prompt_id"] == job.prompt_id)
                ):
                    traced.append(self.lowvram_trace(spec, job))
            # Loading has no progress hook: an interrupt waits for the load to end.
            if not self._sleep(load_s, interruptible=False):
                return False, fraction
        if node.steps > 0:
            with self._cond:
                if not self.config.cpu:
                    self._ensure_workspace(spec.workspace_bytes)
                self.workspace_active = True
            slow = 1 + self.config.offload_penalty * (1 - fraction)
            per_step = node.seconds / node.steps * slow
            try:
                for step in range(node.steps):
                    if not self._sleep(per_step):
                        return False, fraction
                    progress = {
                        "value": step + 1,
                        "max": node.steps,
                        "prompt_id": job.prompt_id,
                        "node": node.node_id,
                    }
                    self._emit("progress", progress, job)
            finally:
                with self._cond:
                    self.workspace_active = False
        elif node.seconds > 0 and not self._sleep(node.seconds, interruptible=False):
            return False, fraction
        return True, fraction

    def _execute(self, job: Job) -> None:
        start = time.monotonic()
        with self._cond:
            self._interrupt = False  # a stale flag is cleared when a prompt starts
        messages: list[list[Any]] = [
            ["execution_start", {"prompt_id": job.prompt_id, "timestamp": _ms()}],
            ["execution_cached", {"nodes": [], "prompt_id": job.prompt_id, "timestamp": _ms()}],
        ]
        for event, data in messages:
            self._emit(event, data, job)
        fraction = 1.0
        executed: list[str] = []
        stopped: PlanNode | None = None
        for node in job.plan.nodes:
            if self._interrupted():  # checked before each node runs
                stopped = node
                break
            if node.node_id:
                executing = {"node": node.node_id, "display_node": node.node_id}
                self._emit("executing", {**executing, "prompt_id": job.prompt_id}, job)
            done, fraction = self._run_node(node, job, fraction)
            if self.config.dynamic_vram:
                with self._cond:  # Dynamic VRAM empties torch's cache after every node
                    self._empty_cache()
            if not done:
                stopped = node
                break
            if node.node_id:
                executed.append(node.node_id)
        completed = stopped is None
        with self._cond:
            now = time.monotonic()
            scale = self.config.time_scale
            outputs: dict[str, Any] = {}
            meta: dict[str, Any] = {}
            for node_id in job.outputs:
                if node_id in executed:
                    outputs[node_id] = {"images": self._images(job, node_id)}
                    meta[node_id] = {
                        "node_id": node_id,
                        "display_node": node_id,
                        "parent_node": None,
                        "real_node_id": node_id,
                    }
            if completed:
                self.stats.jobs_done += 1
                self.stats.latencies_s.append(round((now - job.queued_mono) / scale, 4))
                self.stats.run_s.append(round((now - start) / scale, 4))
                messages.append(
                    ["execution_success", {"prompt_id": job.prompt_id, "timestamp": _ms()}]
                )
            else:
                assert stopped is not None
                self.stats.jobs_interrupted += 1
                messages.append(
                    [
                        "execution_interrupted",
                        {
                            "prompt_id": job.prompt_id,
                            "node_id": stopped.node_id,
                            "node_type": stopped.class_type,
                            "executed": executed,
                            "timestamp": _ms(),
                        },
                    ]
                )
            self.stats.jobs_lowvram += int(fraction < 1 and not self.config.cpu)
            self._history[job.prompt_id] = {
                "prompt": job.item(),
                "outputs": outputs,
                "meta": meta,
                "status": {
                    "status_str": "success" if completed else "error",
                    "completed": completed,
                    "messages": messages,
                },
            }
            while len(self._history) > HISTORY_CAP:
                self._history.popitem(last=False)
        for node_id, output in outputs.items():
            shown = {"node": node_id, "display_node": node_id, "output": output}
            self._emit("executed", {**shown, "prompt_id": job.prompt_id}, job)
        self._emit(messages[-1][0], messages[-1][1], job)
        self._emit("executing", {"node": None, "prompt_id": job.prompt_id}, job)

    def _images(self, job: Job, node_id: str) -> list[dict[str, str]]:
        """One file per image of the batch, named with the node's prefix (SaveImage)."""
        node = job.prompt.get(node_id) or {}
        preview = node.get("class_type") == "PreviewImage"
        prefix = "ComfyUI_temp" if preview else job.plan.prefixes.get(node_id, "ComfyUI")
        images = []
        for _ in range(max(1, job.plan.batch_size)):
            self._saved[prefix] = self._saved.get(prefix, 0) + 1
            images.append(
                {
                    "filename": f"{prefix}_{self._saved[prefix]:05d}_.png",
                    "subfolder": "",
                    "type": "temp" if preview else "output",
                }
            )
        return images

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
            freed += self._empty_cache()
            self.stats.frees_handled += 1
            self.stats.freed_bytes += freed

    def new_prompt_id(self) -> str:
        return str(uuid.uuid4())


def _ms() -> int:
    return int(time.time() * 1000)
