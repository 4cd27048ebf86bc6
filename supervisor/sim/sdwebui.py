"""A fake Stable Diffusion web UI on the shared `SimGpu`, in three variants (tenants.md §4
and §6): AUTOMATIC1111 (`a1111`), Forge (`forge`) and SD.Next (`sdnext`).

Common (A1111 and Forge need `--api`, else every `/sdapi/*` route is 404; SD.Next's API
is always on); FastAPI's `{"detail": ...}` errors:

- `POST /sdapi/v1/txt2img {"prompt", "steps", "n_iter", ...}`: blocks until the images are
  made; jobs run one at a time under `queue_lock`, each takes `steps` x 0.1 s x `n_iter`
  (x `--time-scale`) and holds a workspace in VRAM while it runs.
- `GET /sdapi/v1/progress`: `{"progress", "eta_relative", "state": {skipped, interrupted,
  stopping_generation, job, job_count, job_timestamp, job_no, sampling_step,
  sampling_steps}, "current_image", "textinfo"}`; only the RUNNING job shows
  (`job_count` 0 when idle).
- `GET /sdapi/v1/memory`: `{"ram": {free, used, total}, "cuda": {"system": {free, used,
  total} (the whole device), "active", "allocated", "reserved", "inactive": {current,
  peak}, "events": {retries, oom}}}`; the torch figures are this process's allocator only
  (weights on the GPU plus the running job's workspace; the CUDA context is not in them).
- `GET /sdapi/v1/options` (`sd_model_checkpoint`; Forge's own `forge_*` settings),
  `GET /sdapi/v1/sd-models`, `POST /sdapi/v1/interrupt`.
- `POST /sdapi/v1/unload-checkpoint` does not take `queue_lock`: it acts at once, even
  under a running job.
  - a1111: `send_model_to_cpu`: the weights go to CPU RAM (their VRAM comes back) and
    stay there: a job started before `POST /sdapi/v1/reload-checkpoint` fails with
    A1111's device-mismatch RuntimeError (HTTP 500). UNVERIFIED upstream (tenants.md
    says a mid-job unload "can raise device-mismatch errors" and #12971 "stuck on the last
    checkpoint"); the fake takes the worse outcome. Answers 200 `{}`.
  - forge: `unload_all_models()`: every model leaves the device; the next job loads what
    it needs on demand (a load delay). `reload-checkpoint` is a no-op. 200 `{}`.
  - sdnext: unloads the model (and refiner): 204; `reload-checkpoint` loads it: 204; a job
    after an unload loads it on demand.
- Forge also has `GET /internal/pending-tasks` (`{"size", "tasks"}`, the tasks waiting
  for `queue_lock`; UNVERIFIED for A1111, so the fake A1111 has none: 404) and SD.Next
  `GET /sdapi/v1/status` (`{"status": "running"|"idle", "task", "job", "jobs", "step",
  "steps", "queued", "uptime", "eta"}`, "running" while a job runs).

The process holds a CUDA context from start to exit. A1111 and SD.Next load the default
checkpoint at start; Forge loads it at the first job. `/sim/state` (also `/sim/stats`) is
the simulator's own.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from supervisor.sim.gpu import GIB, MIB, SimGpu
from supervisor.sim.httpbase import BadJson, Exchange, Route, SimServer

VARIANTS = ("a1111", "forge", "sdnext")
CONTEXT_BYTES = 400 * MIB
WORKSPACE_BYTES = 1 * GIB
STEP_SECONDS = 0.1
LOAD_SECONDS = 2.0
RAM_TOTAL = 64 * GIB
VERSIONS = {"a1111": "v1.10.1", "forge": "f2.0.1v1.10.1-previous-664", "sdnext": "2026-07-23"}
DEVICE_MISMATCH = (
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"
)


@dataclass
class SdConfig:
    variant: str = "a1111"
    api: bool = True  # --api (SD.Next: always on)
    time_scale: float = 1.0
    checkpoint_gib: float = 6.5
    checkpoint: str = "sd_xl_base_1.0.safetensors [31e35c80fc]"
    pid: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


class FakeSdWebUI:
    def __init__(self, gpu: SimGpu, config: SdConfig | None = None) -> None:
        self.gpu = gpu
        self.config = config or SdConfig()
        self.variant = self.config.variant
        self.pid = self.config.pid if self.config.pid is not None else os.getpid()
        self.weights_bytes = int(self.config.checkpoint_gib * GIB)
        self._owner = f"sd-webui-{self.variant}"
        self._state = threading.Lock()
        self._queue_lock = threading.Lock()  # modules.call_queue.queue_lock
        self._stop = threading.Event()
        self._task_ids = itertools.count(1)
        self._pending: list[str] = []
        self.on_gpu = False  # the checkpoint's weights are in VRAM
        self.parked = False  # a1111: unloaded to CPU RAM, waiting for reload-checkpoint
        self.workspace = 0
        self.job: dict[str, Any] | None = None  # the running job
        self.interrupted = False
        self.unloads = 0
        self.reloads = 0
        self.started_at = time.monotonic()
        self.gpu.allocate_partial(f"{self._owner}:context", self.pid, CONTEXT_BYTES)
        if self.variant in ("a1111", "sdnext"):
            self._load()

    # ------------------------------------------------------------------ serving

    def route(self, method: str, path: str) -> Route | None:
        if path in ("/sim/state", "/sim/stats"):
            return self._only(method, "GET", self.sim_state)
        if path == "/internal/pending-tasks" and self.variant == "forge":
            return self._only(method, "GET", self.pending_tasks)
        if not path.startswith("/sdapi/"):
            return None
        if not (self.config.api or self.variant == "sdnext"):
            return None  # without --api the /sdapi routes are not registered
        routes: dict[str, tuple[str, Route]] = {
            "/sdapi/v1/txt2img": ("POST", self.txt2img),
            "/sdapi/v1/progress": ("GET", self.progress),
            "/sdapi/v1/memory": ("GET", self.memory),
            "/sdapi/v1/options": ("GET", self.options),
            "/sdapi/v1/sd-models": ("GET", self.sd_models),
            "/sdapi/v1/interrupt": ("POST", self.interrupt),
            "/sdapi/v1/unload-checkpoint": ("POST", self.unload_checkpoint),
            "/sdapi/v1/reload-checkpoint": ("POST", self.reload_checkpoint),
        }
        if self.variant == "sdnext":
            routes["/sdapi/v1/status"] = ("GET", self.status)
        if path not in routes:
            return None
        wanted, route = routes[path]
        return self._only(method, wanted, route)

    @staticmethod
    def _only(method: str, wanted: str, route: Route) -> Route:
        if method == wanted or (method == "HEAD" and wanted == "GET"):
            return route
        return lambda ex: ex.send_json(405, {"detail": "Method Not Allowed"})

    def serve(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> SimServer:
        server = SimServer(
            host, port, self.route, server_name="sd-webui", not_found=_not_found, verbose=verbose
        )
        server.start()
        return server

    def close(self) -> None:
        self._stop.set()
        self.gpu.release_prefix(f"{self._owner}:")

    # ------------------------------------------------------------------ memory

    def _load(self) -> bool:
        """Put the checkpoint's weights on the GPU (False: out of memory)."""
        with self._state:
            if self.on_gpu:
                return True
        if not self.gpu.allocate(f"{self._owner}:weights", self.pid, self.weights_bytes):
            return False
        with self._state:
            self.on_gpu, self.parked = True, False
        return True

    def _drop(self) -> None:
        self.gpu.release(f"{self._owner}:weights")
        with self._state:
            self.on_gpu = False

    def torch_bytes(self) -> int:
        with self._state:
            return (self.weights_bytes if self.on_gpu else 0) + self.workspace

    # ------------------------------------------------------------------ jobs

    def txt2img(self, ex: Exchange) -> None:
        try:
            body = ex.json()
        except BadJson:
            ex.send_json(422, {"detail": [{"type": "json_invalid", "msg": "JSON decode error"}]})
            return
        body = body if isinstance(body, dict) else {}
        steps = int(body.get("steps", 20))
        n_iter = max(1, int(body.get("n_iter", 1)))
        task = f"task({next(self._task_ids)})"
        with self._state:
            self._pending.append(task)
        try:
            with self._queue_lock:
                with self._state:
                    self._pending.remove(task)
                error = self._run(task, steps, n_iter)
        finally:
            with self._state:
                if task in self._pending:
                    self._pending.remove(task)
        if error:
            ex.send_json(500, {"error": "RuntimeError", "detail": "", "body": "", "errors": error})
            return
        ex.send_json(
            200,
            {"images": ["" for _ in range(n_iter)], "parameters": body, "info": "{}"},
        )

    def _run(self, task: str, steps: int, n_iter: int) -> str:
        with self._state:
            self.interrupted = False
            self.job = {
                "job": task,
                "job_count": n_iter,
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": steps,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            }
            parked = self.parked
        try:
            if parked:
                return DEVICE_MISMATCH  # a1111: the weights wait in CPU RAM
            if not self.on_gpu:
                self._sleep(LOAD_SECONDS)  # Forge / SD.Next load on demand
                if not self._load():
                    return "CUDA out of memory. Tried to allocate the checkpoint"
            got = self.gpu.allocate_partial(f"{self._owner}:workspace", self.pid, WORKSPACE_BYTES)
            with self._state:
                self.workspace = got
            for n in range(n_iter):
                for step in range(steps):
                    with self._state:
                        if self.interrupted:
                            return ""
                        assert self.job is not None
                        self.job.update(job_no=n, sampling_step=step)
                        if not self.on_gpu and self.variant == "a1111":
                            # unloaded under the running job: A1111's weights are on the CPU
                            return DEVICE_MISMATCH
                    self._sleep(STEP_SECONDS)
                    if not self.on_gpu and self.variant != "a1111":
                        self._load()  # Forge reloads at each stage (load_models_gpu)
            return ""
        finally:
            self.gpu.release(f"{self._owner}:workspace")
            with self._state:
                self.workspace = 0
                self.job = None

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(max(0.0, seconds * self.config.time_scale))

    def interrupt(self, ex: Exchange) -> None:
        with self._state:
            self.interrupted = True
        ex.send_json(200, {})

    # ------------------------------------------------------------------ free and reload

    def unload_checkpoint(self, ex: Exchange) -> None:
        self.unloads += 1
        if self.on_gpu:
            self._drop()
            if self.variant == "a1111":
                with self._state:
                    self.parked = True
        if self.variant == "sdnext":
            ex.send_empty(204)
        else:
            ex.send_json(200, {})

    def reload_checkpoint(self, ex: Exchange) -> None:
        self.reloads += 1
        if self.variant != "forge":  # Forge: send_model_to_device is `pass`
            with self._state:
                must = self.parked or self.variant == "sdnext"
            if must and not self._load():
                ex.send_json(
                    500, {"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA"}
                )
                return
        if self.variant == "sdnext":
            ex.send_empty(204)
        else:
            ex.send_json(200, {})

    # ------------------------------------------------------------------ reads

    def progress(self, ex: Exchange) -> None:
        with self._state:
            job = dict(self.job) if self.job else None
            interrupted = self.interrupted
        if job is None:
            state = {
                "skipped": False,
                "interrupted": interrupted,
                "stopping_generation": False,
                "job": "",
                "job_count": 0,
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            }
            ex.send_json(
                200,
                {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "state": state,
                    "current_image": None,
                    "textinfo": None,
                },
            )
            return
        total = job["job_count"] * job["sampling_steps"]
        done = job["job_no"] * job["sampling_steps"] + job["sampling_step"]
        state = {"skipped": False, "interrupted": interrupted, "stopping_generation": False}
        state.update(job)
        ex.send_json(
            200,
            {
                "progress": done / total if total else 0.0,
                "eta_relative": (total - done) * STEP_SECONDS * self.config.time_scale,
                "state": state,
                "current_image": None,
                "textinfo": None,
            },
        )

    def pending_tasks(self, ex: Exchange) -> None:
        with self._state:
            tasks = list(self._pending)
        ex.send_json(200, {"size": len(tasks), "tasks": tasks})

    def status(self, ex: Exchange) -> None:
        with self._state:
            job = dict(self.job) if self.job else None
            queued = len(self._pending)
        ex.send_json(
            200,
            {
                "status": "running" if job else "idle",
                "task": job["job"] if job else "",
                "timestamp": None,
                "current": "",
                "id": job["job"] if job else "",
                "job": job["job"] if job else "",
                "jobs": job["job_count"] if job else 0,
                "total": 0,
                "step": job["sampling_step"] if job else 0,
                "steps": job["sampling_steps"] if job else 0,
                "queued": queued,
                "uptime": round(time.monotonic() - self.started_at),
                "elapsed": None,
                "eta": None,
                "progress": None,
            },
        )

    def memory(self, ex: Exchange) -> None:
        snap = self.gpu.snapshot()
        torch = self.torch_bytes()
        ram_used = RAM_TOTAL // 8 + (self.weights_bytes if self.parked else 0)

        def figure(value: int) -> dict[str, int]:
            return {"current": value, "peak": max(value, self.weights_bytes)}

        ex.send_json(
            200,
            {
                "ram": {"free": RAM_TOTAL - ram_used, "used": ram_used, "total": RAM_TOTAL},
                "cuda": {
                    "system": {
                        "free": snap.free_bytes,
                        "used": snap.used_bytes,
                        "total": snap.total_bytes,
                    },
                    "active": figure(torch),
                    "allocated": figure(torch),
                    "reserved": figure(torch),
                    "inactive": figure(0),
                    "events": {"retries": 0, "oom": 0},
                },
            },
        )

    def options(self, ex: Exchange) -> None:
        opts: dict[str, Any] = {
            "sd_model_checkpoint": self.config.checkpoint,
            "sd_checkpoint_cache": 0,
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
        }
        if self.variant == "forge":
            opts.update(
                forge_preset="sd", forge_additional_modules=[], forge_unet_storage_dtype="Automatic"
            )
        if self.variant == "sdnext":
            opts.update(diffusers_offload_mode="none", sd_backend="diffusers")
        ex.send_json(200, opts)

    def sd_models(self, ex: Exchange) -> None:
        title = self.config.checkpoint
        name = title.split(" [")[0]
        ex.send_json(
            200,
            [
                {
                    "title": title,
                    "model_name": name.rsplit(".", 1)[0],
                    "hash": "31e35c80fc",
                    "sha256": "31e35c80fc" + "0" * 54,
                    "filename": f"/models/Stable-diffusion/{name}",
                    "config": None,
                }
            ],
        )

    def sim_state(self, ex: Exchange) -> None:
        with self._state:
            state = {
                "variant": self.variant,
                "version": VERSIONS[self.variant],
                "on_gpu": self.on_gpu,
                "parked": self.parked,
                "unloads": self.unloads,
                "reloads": self.reloads,
                "running": self.job is not None,
                "pending": len(self._pending),
            }
        ex.send_json(200, state)


def _not_found(ex: Exchange) -> None:
    ex.send_json(404, {"detail": "Not Found"})
