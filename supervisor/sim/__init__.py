"""A simulated GPU host: a shared fake GPU, a fake Ollama and a fake ComfyUI (and, on
request, a fake llama.cpp llama-server and a fake llama-swap).

Stdlib only, so it runs in a bare container with just this package installed. Use
`SimHost` in tests, the demo and benchmarks; `python -m supervisor.sim` runs the fakes as
processes (containers). The fakes follow /work/shared/reference/api-facts.md: placement at
load time, sticky CPU spill, asynchronous unloads, /free acted on between prompts.
"""

from supervisor.sim.catalog import Catalog, CheckpointSpec, ModelSpec, load_catalog
from supervisor.sim.comfyui import FakeComfyUI
from supervisor.sim.comfyui_worker import ComfyConfig
from supervisor.sim.gpu import FileGpu, GpuSnapshot, MemoryGpu, SimGpu, open_gpu
from supervisor.sim.host import SimHost
from supervisor.sim.llama_server import FakeLlamaServer, LlamaServerConfig
from supervisor.sim.llama_swap import FakeLlamaSwap, LlamaSwapConfig, parse_swap_config
from supervisor.sim.ollama import FakeOllama
from supervisor.sim.ollama_sched import OllamaConfig, ollama_config
from supervisor.sim.profiles import DEFAULT_PROFILE, PROFILES, sim_profile

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "Catalog",
    "CheckpointSpec",
    "ComfyConfig",
    "FakeComfyUI",
    "FakeLlamaServer",
    "FakeLlamaSwap",
    "FakeOllama",
    "FileGpu",
    "GpuSnapshot",
    "LlamaServerConfig",
    "LlamaSwapConfig",
    "MemoryGpu",
    "ModelSpec",
    "OllamaConfig",
    "SimGpu",
    "SimHost",
    "load_catalog",
    "ollama_config",
    "open_gpu",
    "parse_swap_config",
    "sim_profile",
]
