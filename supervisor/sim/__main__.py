"""Run the fakes as a process: `python -m supervisor.sim MODE`.

    python -m supervisor.sim ollama  [--host 127.0.0.1] [--port 11434] [options]
    python -m supervisor.sim comfyui [--host 127.0.0.1] [--port 8188] [--highvram] [--pinned]
                                     [--cpu] [--disable-dynamic-vram] [--vram-headroom GB]
    python -m supervisor.sim all     [--ollama-port 11434] [--comfyui-port 8188]
    python -m supervisor.sim llama-server [--port 8080] [-m MODEL [--alias NAME]]
                                     [--models M1,M2,... [--models-max 4]
                                      [--no-models-autoload] [--stop-timeout 10]]
                                     [--fit on|off] [--fit-target 1024] [--fit-ctx 4096]
                                     [-c CTX] [-np 4] [--sleep-idle-seconds N] [--metrics]
    python -m supervisor.sim llama-swap [--port 8080] --config JSON-or-path
    python -m supervisor.sim invokeai [--port 9090] [--model-gib GB]
    python -m supervisor.sim sd-webui [--port 7860] [--variant a1111|forge|sdnext] [--api]
                                      [--checkpoint-gib GB]
    python -m supervisor.sim healthcheck URL     # exit 0 if GET URL answers 200
    python -m supervisor.sim build-nvml DIR      # DIR/libnvidia-ml.so.1 reading --gpu-state
    python -m supervisor.sim vllm --help         # a fake vLLM (its own options: sim/vllm.py)
    python -m supervisor.sim speaches --help     # a fake speaches (sim/speaches.py)

llama-server: with `-m` one model (a catalog name, or a path whose stem is one) loads at
start (single mode; its VRAM is held under this process's PID); without it the server is a
router over `--models`, each model a child process with its own PID, loaded by
`POST /models/load` or on demand (supervisor/sim/llama_server.py). llama-swap: `--config`
takes llama-swap's config keys as JSON (models with ttl/aliases/name/description/
unloadTimeout, groups with swap/exclusive/persistent/members, globalTTL), plus the sim's
`model` (catalog name), `size_bytes` and `ctx_size` per model (supervisor/sim/llama_swap.py).

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
import dataclasses
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
from supervisor.sim.gpu import GIB, MIB, MemoryGpu, add_gpu_args, gpu_from_args
from supervisor.sim.httpbase import SimServer
from supervisor.sim.llama_server import FakeLlamaServer, LlamaServerConfig, resolve_spec
from supervisor.sim.llama_swap import FakeLlamaSwap, LlamaSwapConfig, parse_swap_config
from supervisor.sim.nvml_build import BuildError, build_fake_nvml
from supervisor.sim.ollama import FakeOllama
from supervisor.sim.ollama_sched import OllamaConfig, ollama_config
from supervisor.sim.profiles import (
    ProfileError,
    add_profile_argument,
    profile_from_args,
    sim_profile,
)
from supervisor.sim.tenant_modes import EXTRA_ARGUMENTS, EXTRA_MODES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "mode",
        choices=[
            "ollama",
            "comfyui",
            "all",
            "llama-server",
            "llama-swap",
            "healthcheck",
            "build-nvml",
            *EXTRA_MODES,
        ],
    )
    parser.add_argument("target", nargs="?", help="healthcheck: URL to GET; build-nvml: a dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="port of a single service")
    parser.add_argument("--ollama-port", type=int, default=11434)
    parser.add_argument("--comfyui-port", type=int, default=8188)
    add_gpu_args(parser)
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
    llama = parser.add_argument_group("llama-server (flags as the real server's)")
    llama.add_argument("-m", "--model", help="single mode: the model to serve")
    llama.add_argument("--alias", help="single mode: the id /v1/models shows")
    llama.add_argument("--models", default="", help="router mode: comma-separated models")
    llama.add_argument("--models-max", type=int, default=4, help="router: 0 = unlimited")
    llama.add_argument("--no-models-autoload", action="store_true")
    llama.add_argument("--stop-timeout", type=float, default=10.0, help="router: seconds")
    llama.add_argument("--fit", choices=["on", "off"], default="on")
    llama.add_argument("--fit-target", type=int, default=1024, help="MiB kept free")
    llama.add_argument("--fit-ctx", type=int, default=4096)
    llama.add_argument("-c", "--ctx-size", type=int, default=0, help="0 = trained context")
    llama.add_argument("-np", "--parallel", type=int, default=4)
    llama.add_argument("--sleep-idle-seconds", type=float, default=-1.0)
    llama.add_argument("--metrics", action="store_true")
    parser.add_argument("--config", help="llama-swap: its config as inline JSON or a path")
    add_profile_argument(parser)
    for add_arguments in EXTRA_ARGUMENTS:
        add_arguments(parser)
    return parser


def _llama_swap_config(args: argparse.Namespace) -> LlamaSwapConfig:
    if not args.config:
        raise ValueError("llama-swap needs --config (inline JSON or a path)")
    return dataclasses.replace(parse_swap_config(args.config), time_scale=args.time_scale)


def _llama_server_config(args: argparse.Namespace) -> LlamaServerConfig:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.model is None and not models:
        raise ValueError("llama-server needs -m/--model (single mode) or --models (router)")
    return LlamaServerConfig(
        model=args.model,
        alias=args.alias,
        models=models,
        models_max=args.models_max,
        models_autoload=not args.no_models_autoload,
        stop_timeout_s=args.stop_timeout,
        fit=args.fit == "on",
        fit_target_mib=args.fit_target,
        fit_ctx=args.fit_ctx,
        ctx_size=args.ctx_size,
        parallel=args.parallel,
        sleep_idle_s=args.sleep_idle_seconds,
        metrics=args.metrics,
        time_scale=args.time_scale,
        pid=os.getpid() if args.model is not None else None,
    )


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
    gpu = gpu_from_args(args)
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
        if args.mode == "llama-server":
            llama = FakeLlamaServer(gpu, catalog, _llama_server_config(args))
            closers.append(llama.close)
            port = args.port if args.port is not None else 8080
            servers.append(llama.serve(args.host, port, verbose=args.verbose))
            kind = "router" if llama.is_router else "single model"
            print(f"sim: fake llama-server listening on {servers[-1].url}", flush=True)
            print(f"sim: llama-server {kind}", flush=True)
        if args.mode == "llama-swap":
            swap = FakeLlamaSwap(gpu, catalog, _llama_swap_config(args))
            closers.append(swap.close)
            port = args.port if args.port is not None else 8080
            servers.append(swap.serve(args.host, port, verbose=args.verbose))
            print(f"sim: fake llama-swap listening on {servers[-1].url}", flush=True)
        if args.mode in EXTRA_MODES:
            fake, server = EXTRA_MODES[args.mode](gpu, args)
            closers.append(fake.close)
            servers.append(server)
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
    if args.mode == "llama-server":
        try:
            config = _llama_server_config(args)
            catalog = load_catalog(args.catalog)
            for name in (config.model,) if config.model else config.models:
                resolve_spec(catalog, name)
        except ValueError as exc:
            print(f"llama-server: {exc}", file=sys.stderr)
            return 2
    if args.mode == "llama-swap":
        try:
            FakeLlamaSwap(MemoryGpu(), load_catalog(args.catalog), _llama_swap_config(args)).close()
        except (ValueError, OSError) as exc:
            print(f"llama-swap: --config: {exc}", file=sys.stderr)
            return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
