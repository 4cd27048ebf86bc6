"""The soak's simulated host: one file-backed GPU, the fake Ollama and ComfyUI (restartable,
as a crashed service comes back), a fault proxy in front of each, the fake NVML library and
its fault file, and an outside process's allocation on the GPU.

The supervisor reads the services through the proxies (`ollama_url`, `comfyui_url`) and the
GPU through the fake `libnvidia-ml.so.1` (`nvml_env`). Image clients post to ComfyUI
directly, so image work goes on while only the supervisor's view is broken.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.sim import Catalog
from supervisor.sim.comfyui import FakeComfyUI
from supervisor.sim.comfyui_worker import ComfyConfig
from supervisor.sim.gpu import GIB, SimGpu, open_gpu
from supervisor.sim.httpbase import SimServer
from supervisor.sim.nvml_build import STATE_ENV, build_fake_nvml
from supervisor.sim.ollama import FakeOllama
from supervisor.sim.ollama_sched import OllamaConfig
from tests.soak.proxy import FaultProxy, ProxyLoop

OUTSIDER = "outsider:cuda-app"
NVML_FAULT_ENV = "SIM_NVML_FAULT"


class GpuFaults:
    """The GPU side of a soak host, for either form: the fake NVML library (built under
    `workdir`) and its fault file, and a process outside every tenant that takes VRAM on
    the GPU state file `state` (through `gpu`, or a handle of its own opened when first
    needed: the Docker-backed form's services create that file)."""

    def __init__(self, workdir: Path, state: Path, gpu: SimGpu | None = None) -> None:
        self.state = state
        self.fault_file = workdir / "nvml-fault"
        self.fault_file.unlink(missing_ok=True)
        self.libdir = build_fake_nvml(workdir / "nvml").parent
        self._gpu = gpu
        self._own_gpu: SimGpu | None = None

    def nvml_env(self) -> dict[str, str]:
        """The supervisor's environment for the fake library, its state and fault files."""
        return {
            "LD_LIBRARY_PATH": str(self.libdir),
            STATE_ENV: str(self.state),
            NVML_FAULT_ENV: str(self.fault_file),
        }

    def nvml_fail(self, how: str) -> None:
        self.fault_file.write_text("lost" if how == "lost" else "error")

    def nvml_ok(self) -> None:
        self.fault_file.unlink(missing_ok=True)

    def outsider_fill(self, nbytes: int) -> int:
        """Another program takes VRAM (as much as is free, up to `nbytes`)."""
        if self._gpu is None:
            self._gpu = self._own_gpu = open_gpu(self.state)
        return self._gpu.allocate_partial(OUTSIDER, os.getpid(), nbytes)

    def outsider_leave(self) -> None:
        if self._gpu is not None:
            self._gpu.release(OUTSIDER)

    def close(self) -> None:
        """The outside process leaves; a handle of its own is closed."""
        self.outsider_leave()
        if self._own_gpu is not None:
            self._own_gpu.close()
            self._own_gpu = self._gpu = None


@dataclass
class Placement:
    """One Ollama load's placement, as the fake Ollama made it: what it needed, what the
    GPU granted, and who held the rest of the GPU at that moment (owner -> bytes, the new
    runner left out) and whether ComfyUI was running or holding a job then."""

    t: float  # monotonic
    model: str
    need: int
    granted: int
    holders: dict[str, int]
    comfy_jobs: int  # running + pending in ComfyUI at that moment (-1: ComfyUI down)

    @property
    def spilled(self) -> bool:
        return self.granted < self.need

    def to_json(self, sim: Any) -> dict[str, Any]:
        return {
            "sim_s": round(sim(self.t), 1),
            "model": self.model,
            "need_gib": round(self.need / GIB, 2),
            "granted_gib": round(self.granted / GIB, 2),
            "holders_gib": {k: round(v / GIB, 2) for k, v in self.holders.items()},
            "comfy_jobs": self.comfy_jobs,
        }


class SoakHost:
    def __init__(self, workdir: Path, *, catalog: Catalog, time_scale: float, gpu_gib: float):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.catalog = catalog
        self.scale = time_scale
        self.state = workdir / "gpu.json"
        self.state.unlink(missing_ok=True)
        self.gpu: SimGpu = open_gpu(self.state, int(gpu_gib * GIB))
        self.gpu_faults = GpuFaults(workdir, self.state, self.gpu)
        self._lock = threading.Lock()
        self.placements: list[Placement] = []
        self.ollama: FakeOllama | None = None
        self.comfy: FakeComfyUI | None = None
        self._ollama_server: SimServer | None = None
        self._comfy_server: SimServer | None = None
        self._start_ollama()
        self._start_comfy()
        self._loop = ProxyLoop()
        assert self._ollama_server is not None and self._comfy_server is not None
        self.ollama_proxy: FaultProxy = self._loop.proxy("ollama", _address(self._ollama_server))
        self.comfy_proxy: FaultProxy = self._loop.proxy("comfyui", _address(self._comfy_server))

    # ------------------------------------------------------------------ services

    def _start_ollama(self) -> None:
        self.ollama = FakeOllama(self.gpu, self.catalog, OllamaConfig(time_scale=self.scale))
        self._record_placements(self.ollama)
        self._ollama_server = self.ollama.serve("127.0.0.1", 0)

    def _record_placements(self, ollama: FakeOllama) -> None:
        """Every placement the fake Ollama makes lands in `placements`, with who held the
        GPU then: a spilled load is told apart by what took its room."""
        sched = ollama.sched
        place = sched._place

        def recording(spec: Any, ctx: int, num_gpu: int | None, owner: str, pid: int) -> Any:
            need, granted = place(spec, ctx, num_gpu, owner, pid)
            holders: dict[str, int] = {}
            for alloc in self.gpu.snapshot().allocations:
                if alloc.owner != owner:
                    holders[alloc.owner] = holders.get(alloc.owner, 0) + alloc.bytes
            comfy = self.comfy
            jobs = comfy.engine.remaining() if comfy is not None else -1
            self.placements.append(
                Placement(time.monotonic(), spec.name, need, granted or 0, holders, jobs)
            )
            return need, granted

        setattr(sched, "_place", recording)  # noqa: B010 (an instance's method, wrapped)

    def _start_comfy(self) -> None:
        self.comfy = FakeComfyUI(self.gpu, self.catalog, ComfyConfig(time_scale=self.scale))
        self._comfy_server = self.comfy.serve("127.0.0.1", 0)

    def crash(self, service: str) -> None:
        """The service's process dies: its port refuses, its VRAM comes back."""
        fake: FakeOllama | FakeComfyUI | None
        with self._lock:
            if service == "ollama":
                self.ollama_proxy.set("down")
                server, fake = self._ollama_server, self.ollama
                self._ollama_server, self.ollama = None, None
            else:
                self.comfy_proxy.set("down")
                server, fake = self._comfy_server, self.comfy
                self._comfy_server, self.comfy = None, None
        if server is not None:
            server.stop()
        if fake is not None:
            fake.close()

    def come_back(self, service: str) -> None:
        """A fresh process of the service (nothing loaded), behind the same URL."""
        with self._lock:
            if service == "ollama":
                if self.ollama is None:
                    self._start_ollama()
                assert self._ollama_server is not None
                self.ollama_proxy.upstream = _address(self._ollama_server)
                self.ollama_proxy.set("pass")
            else:
                if self.comfy is None:
                    self._start_comfy()
                assert self._comfy_server is not None
                self.comfy_proxy.upstream = _address(self._comfy_server)
                self.comfy_proxy.set("pass")

    def proxy(self, service: str) -> FaultProxy:
        return self.ollama_proxy if service == "ollama" else self.comfy_proxy

    # ------------------------------------------------------------------ addresses

    @property
    def ollama_url(self) -> str:
        return self.ollama_proxy.url

    @property
    def comfyui_url(self) -> str:
        return self.comfy_proxy.url

    def direct_url(self, service: str) -> str | None:
        """The service itself (None while it is down): for clients and for counters."""
        with self._lock:
            server = self._ollama_server if service == "ollama" else self._comfy_server
            return server.url if server is not None else None

    def nvml_env(self) -> dict[str, str]:
        return self.gpu_faults.nvml_env()

    def close(self) -> None:
        self._loop.close()
        for server in (self._ollama_server, self._comfy_server):
            if server is not None:
                server.stop()
        for fake in (self.ollama, self.comfy):
            if fake is not None:
                fake.close()
        self.gpu.close()


def _address(server: SimServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return (host.decode() if isinstance(host, bytes) else str(host), int(port))
