"""`SimHost`: a whole simulated GPU host (GPU, fake Ollama, fake ComfyUI) in threads.

A fake llama.cpp `llama-server` and a fake llama-swap join on request (`llama_server=` /
`llama_swap=` configs; off by default) on the same GPU; `time_scale` overrides theirs too.

For tests, the demo and benchmarks: everything binds 127.0.0.1 on ephemeral ports, starts
in well under a second and stops cleanly. Ollama and ComfyUI share one `SimGpu`, so memory
one of them holds is memory the other cannot use, exactly as on a real card.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import TracebackType

from supervisor.sim.catalog import Catalog
from supervisor.sim.comfyui import FakeComfyUI
from supervisor.sim.comfyui_worker import ComfyConfig
from supervisor.sim.gpu import GIB, SimGpu, open_gpu
from supervisor.sim.httpbase import SimServer
from supervisor.sim.llama_server import FakeLlamaServer, LlamaServerConfig
from supervisor.sim.llama_swap import FakeLlamaSwap, LlamaSwapConfig
from supervisor.sim.ollama import FakeOllama
from supervisor.sim.ollama_sched import OllamaConfig, ollama_config
from supervisor.sim.profiles import parse_profile, sim_profile


class SimHost:
    """Start with `with SimHost(time_scale=0.01) as host:` or `.start()` / `.stop()`.

    `time_scale`, `highvram` and `pinned` override the same fields of the given configs.
    A `gpu_state` path makes the GPU file-backed, so other processes can share it.
    `profile` ("2026" or "2025"; default VRAM_SIM_PROFILE, else "2026") picks the services'
    generation where no config is given (sim/profiles.py).
    """

    def __init__(
        self,
        *,
        gpu_total_gib: float = 24.0,
        time_scale: float = 1.0,
        gpu_state: str | os.PathLike[str] | None = None,
        highvram: bool = False,
        pinned: bool = False,
        catalog: Catalog | None = None,
        ollama: OllamaConfig | None = None,
        comfyui: ComfyConfig | None = None,
        start_ollama: bool = True,
        start_comfyui: bool = True,
        host: str = "127.0.0.1",
        profile: str | None = None,
        llama_server: LlamaServerConfig | None = None,
        llama_swap: LlamaSwapConfig | None = None,
    ) -> None:
        self._host = host
        self.profile = parse_profile(profile, "profile") if profile else sim_profile(os.environ)
        self.catalog = catalog or Catalog()
        self.ollama_config = dataclasses.replace(
            ollama or ollama_config(self.profile), time_scale=time_scale
        )
        self.comfyui_config = dataclasses.replace(
            comfyui or ComfyConfig.for_profile(self.profile),
            time_scale=time_scale,
            highvram=highvram,
            pinned=pinned,
        )
        self.gpu: SimGpu = open_gpu(
            Path(gpu_state) if gpu_state is not None else None, int(gpu_total_gib * GIB)
        )
        self.fake_ollama: FakeOllama | None = None
        self.fake_comfyui: FakeComfyUI | None = None
        self._ollama_server: SimServer | None = None
        self._comfyui_server: SimServer | None = None
        self._start_ollama = start_ollama
        self._start_comfyui = start_comfyui
        self.llama_server_config = (
            dataclasses.replace(llama_server, time_scale=time_scale) if llama_server else None
        )
        self.fake_llama_server: FakeLlamaServer | None = None
        self._llama_server: SimServer | None = None
        self.llama_swap_config = (
            dataclasses.replace(llama_swap, time_scale=time_scale) if llama_swap else None
        )
        self.fake_llama_swap: FakeLlamaSwap | None = None
        self._llama_swap: SimServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SimHost:
        if self._start_ollama and self.fake_ollama is None:
            self.fake_ollama = FakeOllama(self.gpu, self.catalog, self.ollama_config)
            self._ollama_server = self.fake_ollama.serve(self._host, 0)
        if self._start_comfyui and self.fake_comfyui is None:
            self._start_comfy(0)
        self._wire_trace()
        if self.llama_server_config is not None and self.fake_llama_server is None:
            self.fake_llama_server = FakeLlamaServer(
                self.gpu, self.catalog, self.llama_server_config
            )
            self._llama_server = self.fake_llama_server.serve(self._host, 0)
        if self.llama_swap_config is not None and self.fake_llama_swap is None:
            self.fake_llama_swap = FakeLlamaSwap(self.gpu, self.catalog, self.llama_swap_config)
            self._llama_swap = self.fake_llama_swap.serve(self._host, 0)
        return self

    def _start_comfy(self, port: int) -> None:
        self.fake_comfyui = FakeComfyUI(self.gpu, self.catalog, self.comfyui_config)
        self._comfyui_server = self.fake_comfyui.serve(self._host, port)
        self._wire_trace()

    def _wire_trace(self) -> None:
        """ComfyUI's low-VRAM trace names the fake Ollama's models on the GPU then."""
        if self.fake_comfyui is not None and self.fake_ollama is not None:
            self.fake_comfyui.engine.neighbours = self.fake_ollama.sched.holders

    def stop_comfyui(self) -> None:
        """Like stopping the ComfyUI container: the server goes and its VRAM comes back."""
        if self._comfyui_server is not None:
            self._comfyui_server.stop()
        if self.fake_comfyui is not None:
            self.fake_comfyui.close()
        self.fake_comfyui = None

    def restart_comfyui(self) -> None:
        """Like `docker restart comfyui`: same URL, all VRAM released, fresh state."""
        port = self._comfyui_server.server_address[1] if self._comfyui_server else 0
        self.stop_comfyui()
        self._start_comfy(int(port))

    def stop_llama_server(self) -> None:
        """Like stopping the llama-server container: its children exit, VRAM comes back."""
        if self._llama_server is not None:
            self._llama_server.stop()
            self._llama_server = None
        if self.fake_llama_server is not None:
            self.fake_llama_server.close()
        self.fake_llama_server = None

    def stop_llama_swap(self) -> None:
        """Like stopping the llama-swap container: its upstreams exit, VRAM comes back."""
        if self._llama_swap is not None:
            self._llama_swap.stop()
            self._llama_swap = None
        if self.fake_llama_swap is not None:
            self.fake_llama_swap.close()
        self.fake_llama_swap = None

    def stop(self) -> None:
        self.stop_llama_server()
        self.stop_llama_swap()
        for server in (self._ollama_server, self._comfyui_server):
            if server is not None:
                server.stop()
        if self.fake_ollama is not None:
            self.fake_ollama.close()
        if self.fake_comfyui is not None:
            self.fake_comfyui.close()
        self.gpu.close()

    def __enter__(self) -> SimHost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def ollama_url(self) -> str:
        if self._ollama_server is None:
            raise RuntimeError("the fake Ollama is not running")
        return self._ollama_server.url

    @property
    def comfyui_url(self) -> str:
        if self._comfyui_server is None:
            raise RuntimeError("the fake ComfyUI is not running")
        return self._comfyui_server.url

    @property
    def llama_server_url(self) -> str:
        if self._llama_server is None:
            raise RuntimeError("the fake llama-server is not running")
        return self._llama_server.url

    @property
    def llama_swap_url(self) -> str:
        if self._llama_swap is None:
            raise RuntimeError("the fake llama-swap is not running")
        return self._llama_swap.url
