"""Run the fakes as a process: `python -m supervisor.sim ollama|comfyui|all|healthcheck`.

    python -m supervisor.sim ollama  [--host 127.0.0.1] [--port 11434] [options]
    python -m supervisor.sim comfyui [--host 127.0.0.1] [--port 8188] [--highvram] [--pinned]
                                     [--cpu] [--disable-dynamic-vram] [--vram-headroom GB]
    python -m supervisor.sim all     [--ollama-port 11434] [--comfyui-port 8188]
    python -m supervisor.sim healthcheck URL     # exit 0 if GET URL answers 200
    python -m supervisor.sim build-nvml DIR      # DIR/libnvidia-ml.so.1 reading --gpu-state
    python -m supervisor.sim vllm --help         # a fake vLLM (its own options: sim/vllm.py)
    python -m supervisor.sim speaches --help     # a fake speaches (sim/speaches.py)

The fake NVML library reads the file named by SIM_GPU_STATE (default
/var/lib/vram-sim/gpu.json): put DIR on LD_LIBRARY_PATH and pynvml sees the simulated GPU.

Shared options: --gpu-state FILE (file-backed GPU shared with other processes),
--gpu-total-gib, --time-scale, --catalog JSON-or-path, --verbose, and --profile 2026|2025:
the generation of the services simulated (default: VRAM_SIM_PROFILE, else 2026:
Ollama 0.33 and ComfyUI 0.38 with Dynamic VRAM; 2025: Ollama 0.12 and ComfyUI 0.3.64;
see supervisor/sim/profiles.py). Ollama reads OLLAMA_KEEP_ALIVE, OLLAMA_NUM_PARALLEL,
OLLAMA_MAX_LOADED_MODELS and OLLAMA_CONTEXT_LENGTH like the real server, and in the 2026
profile also OLLAMA_GPU_OVERHEAD (bytes) and LLAMA_ARG_FIT_TARGET (MiB). The host
defaults to 127.0.0.1; SIGTERM and SIGINT stop the servers within a fraction of a second
(containers get `docker stop` right).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType

from supervisor.sim.catalog import load_catalog, parse_env_keep_alive
from supervisor.sim.comfyui import FakeComfyUI
from supervisor.sim.comfyui_worker import ComfyConfig
from supervisor.sim.gpu import GIB, MIB, open_gpu
from supervisor.sim.httpbase import SimServer
from supervisor.sim.nvml_build import BuildError, build_fake_nvml
from supervisor.sim.ollama import FakeOllama
from supervisor.sim.ollama_sched import OllamaConfig, ollama_config
from supervisor.sim.profiles import (
    ProfileError,
    add_profile_argument,
    profile_from_args,
    sim_profile,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=["ollama", "comfyui", "all", "healthcheck", "build-nvml"])
    parser.add_argument("target", nargs="?", help="healthcheck: URL to GET; build-nvml: a dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="port of a single service")
    parser.add_argument("--ollama-port", type=int, default=11434)
    parser.add_argument("--comfyui-port", type=int, default=8188)
    parser.add_argument("--gpu-state", help="JSON state file shared by processes")
    parser.add_argument("--gpu-total-gib", type=float, default=None)
    parser.add_argument("--gpu-name")
    parser.add_argument("--gpu-uuid")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--highvram", action="store_true")
    parser.add_argument("--pinned", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="ComfyUI on the CPU (no GPU)")
    parser.add_argument(
        "--disable-dynamic-vram", action="store_true", help="ComfyUI 0.15+: classic memory"
    )
    parser.add_argument(
        "--vram-headroom", type=float, default=0.0, help="GB kept free by Dynamic VRAM"
    )
    parser.add_argument(
        "--catalog", help="inline JSON or a path: {models: [...], checkpoints: [...]}"
    )
    parser.add_argument("--unload-delay", type=float, default=None, help="seconds (Ollama)")
    parser.add_argument("--timeout", type=float, default=3.0, help="healthcheck timeout, s")
    parser.add_argument("--verbose", action="store_true", help="access logs on stderr")
    add_profile_argument(parser)
    return parser


def _ollama_config(args: argparse.Namespace) -> OllamaConfig:
    env = os.environ
    config = ollama_config(profile_from_args(args, env), time_scale=args.time_scale)
    if env.get("OLLAMA_KEEP_ALIVE"):
        config.keep_alive_s = parse_env_keep_alive(env["OLLAMA_KEEP_ALIVE"])
    if env.get("OLLAMA_NUM_PARALLEL"):
        config.num_parallel = int(env["OLLAMA_NUM_PARALLEL"])
    if env.get("OLLAMA_MAX_LOADED_MODELS") and int(env["OLLAMA_MAX_LOADED_MODELS"]) > 0:
        config.max_loaded_models = int(env["OLLAMA_MAX_LOADED_MODELS"])
    if env.get("OLLAMA_CONTEXT_LENGTH"):
        config.num_ctx = int(env["OLLAMA_CONTEXT_LENGTH"])
        config.context_by_vram = False
    if config.is_2026 and env.get("OLLAMA_GPU_OVERHEAD"):
        config.gpu_overhead_bytes = int(env["OLLAMA_GPU_OVERHEAD"])
    if config.is_2026 and env.get("LLAMA_ARG_FIT_TARGET"):
        config.fit_margin_bytes = int(env["LLAMA_ARG_FIT_TARGET"]) * MIB
    if args.unload_delay is not None:
        config.unload_delay_s = args.unload_delay
    return config


def healthcheck(url: str, timeout_s: float) -> int:
    """0 if GET `url` answers 200, else 1: a HEALTHCHECK for images without curl."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    total = int(args.gpu_total_gib * GIB) if args.gpu_total_gib is not None else None
    gpu = open_gpu(args.gpu_state, total, name=args.gpu_name, uuid=args.gpu_uuid)
    catalog = load_catalog(args.catalog)
    servers: list[SimServer] = []
    closers = []
    try:
        if args.mode in ("ollama", "all"):
            ollama = FakeOllama(gpu, catalog, _ollama_config(args))
            closers.append(ollama.close)
            port = (
                args.port if args.mode == "ollama" and args.port is not None else args.ollama_port
            )
            servers.append(ollama.serve(args.host, port, verbose=args.verbose))
            print(f"sim: fake Ollama listening on {servers[-1].url}", flush=True)
        if args.mode in ("comfyui", "all"):
            comfy_config = ComfyConfig.for_profile(
                args.profile,
                time_scale=args.time_scale,
                highvram=args.highvram,
                pinned=args.pinned,
                cpu=args.cpu,
                disable_dynamic_vram=args.disable_dynamic_vram,
                headroom_bytes=int(args.vram_headroom * GIB),
            )
            comfy = FakeComfyUI(gpu, catalog, comfy_config)
            closers.append(comfy.close)
            port = (
                args.port if args.mode == "comfyui" and args.port is not None else args.comfyui_port
            )
            servers.append(comfy.serve(args.host, port, verbose=args.verbose))
            mode = (
                "CPU"
                if comfy_config.cpu
                else "Dynamic VRAM"
                if comfy_config.dynamic_vram
                else "classic VRAM"
            )
            print(f"sim: fake ComfyUI listening on {servers[-1].url}", flush=True)
            print(f"sim: ComfyUI {comfy_config.version}, {mode}", flush=True)
        snap = gpu.snapshot()
        print(f"sim: GPU {snap.name} {snap.uuid}, {snap.total_bytes / GIB:.1f} GiB", flush=True)
        while not stop.wait(0.5):
            pass
        print("sim: stopping", flush=True)
        return 0
    finally:
        for server in servers:
            server.stop()
        for close in closers:
            close()
        gpu.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["vllm"]:  # a mode with options of its own (supervisor/sim/vllm.py)
        from supervisor.sim import vllm

        return vllm.main(argv[1:])
    if argv[:1] == ["speaches"]:  # a mode with options of its own (supervisor/sim/speaches.py)
        from supervisor.sim import speaches

        return speaches.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.profile is None:
        try:
            args.profile = sim_profile(os.environ)
        except ValueError as exc:
            parser.error(str(exc))
    if args.mode in ("healthcheck", "build-nvml") and not args.target:
        print(
            f"{args.mode} needs a {'URL' if args.mode == 'healthcheck' else 'directory'}",
            file=sys.stderr,
        )
        return 2
    if args.mode == "healthcheck":
        return healthcheck(args.target, args.timeout)
    if args.mode == "build-nvml":
        try:
            print(build_fake_nvml(args.target))
        except BuildError as exc:
            print(f"build-nvml: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        profile_from_args(args, os.environ)
    except ProfileError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
