"""Command line: `vram-supervisor [run|status|free|doctor|healthcheck|demo]` (also
`python -m supervisor`).

Exit codes: 0 fine; 1 a command's check failed (doctor, healthcheck, free); 2 bad
configuration (the message names the variable, its value and what is accepted); 3 a
startup failure that cannot heal by waiting (the HTTP port is taken). Docker being down is
not a startup failure: the loop keeps retrying it.

Heavy imports (docker, httpx, pynvml, loguru) happen inside the commands, so `healthcheck`
(run by Docker every few seconds) starts fast, and a supervisor with two fixed URLs never
imports the Docker SDK. The `status` data and table are in `status`, the `doctor` checks in
`doctor`; this module parses argv, sets up logging and wires the daemon.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from supervisor import __version__
from supervisor.config import Settings, load_settings
from supervisor.errors import ConfigError
from supervisor.status import fetch_snapshot, local_url, render_status
from supervisor.units import format_bytes

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.metrics import Metrics

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3
SHUTDOWN_GRACE_S = 1.5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-supervisor",
        description="Keeps Ollama and ComfyUI sharing one GPU. Configured by VRAM_* "
        "environment variables (see docs/configuration.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the supervisor (the default)")
    status = sub.add_parser(
        "status",
        help="show GPUs, services, models and recent actions (asks the running "
        "supervisor, else observes once)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    free = sub.add_parser("free", help="free ComfyUI's VRAM now and verify it")
    free.add_argument(
        "--hard", action="store_true", help='also drop caches ({"free_memory": true})'
    )
    sub.add_parser("doctor", help="check Docker, each service API and NVML; print fixes")
    sub.add_parser("healthcheck", help="exit 0 if the running supervisor is healthy")
    sub.add_parser("demo", help="run the supervisor against a simulated GPU host")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        settings, warnings = load_settings(os.environ)
    except ConfigError as exc:
        print(f"vram-supervisor: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "healthcheck":
        return healthcheck(settings)
    if command == "demo":
        return demo()
    from loguru import logger

    from supervisor.logs import configure_logging

    quiet = command in ("status", "doctor")  # their output is the table, not the log
    configure_logging(debug=settings.debug and not quiet, log_format=settings.log_format)
    if quiet:
        logger.remove()
        logger.add(sys.stderr, level="ERROR", format="{message}")
    for warning in warnings:
        logger.warning(warning)
    if command == "status":
        return status(settings, as_json=args.json)
    if command == "free":
        return free(settings, hard=args.hard)
    if command == "doctor":
        return doctor(settings, warnings)
    return run(settings)


# ----------------------------------------------------------------------------- wiring


def build_daemon(settings: Settings, metrics: Metrics | None = None) -> Daemon:
    """The daemon with its real adapters (assembly.build_daemon)."""
    from supervisor.assembly import build_daemon as build

    return build(settings, metrics)


# ----------------------------------------------------------------------------- run


def run(settings: Settings) -> int:
    from loguru import logger
    from prometheus_client import CollectorRegistry

    from supervisor.assembly import Assembly
    from supervisor.metrics import Metrics

    logger.info(
        f"vram-supervisor {__version__} starting: check every {settings.check_interval_s:g} s, "
        f"threshold {settings.threshold_percent:g}%/{settings.aggressive_threshold_percent:g}%,"
        f" priority {settings.priority}, heal {'on' if settings.heal else 'off'}, "
        f"restart fallback {'on' if settings.restart_fallback else 'off'}"
        + (", DRY RUN (nothing is sent)" if settings.dry_run else "")
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assembly = Assembly(settings, metrics=metrics, registry=registry)
    try:
        assembly.start()
    except OSError as exc:
        logger.error(
            f"Cannot start: {assembly.binding}: {exc}. Is another supervisor (or another "
            "program) using that port? Choose another one."
        )
        return EXIT_STARTUP

    should_exit = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Flags only: the main loop below does the work (uvicorn's habit).
        should_exit.set()
        assembly.daemon.stop()

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: the terminal went
    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    try:
        while not should_exit.wait(0.5):
            if assembly.loop is not None and not assembly.loop.is_alive():
                logger.error("The loop ended unexpectedly; exiting")
                break
    finally:
        logger.info("Stopping")
        # An in-flight request may still be waiting: the loop gets a grace.
        assembly.stop(loop_grace_s=SHUTDOWN_GRACE_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


# ----------------------------------------------------------------------------- status


def status(settings: Settings, *, as_json: bool) -> int:
    def observe_once() -> dict[str, Any]:
        daemon = build_daemon(settings)
        try:
            daemon.observe()
            return daemon.snapshot()
        finally:
            daemon.close()

    origin, snapshot = fetch_snapshot(settings, observe_once)
    if as_json:
        print(json.dumps(snapshot, indent=2, default=str))
    else:
        print(f"From {origin}:")
        print(render_status(snapshot))
    return EXIT_OK


# ----------------------------------------------------------------------------- free


def free(settings: Settings, *, hard: bool) -> int:
    from supervisor.model import ComfyMode, FreeComfy, FreeResult, FreeStage

    daemon = build_daemon(settings)
    try:
        obs = daemon.observe()
        on_cpu = {c.status.spec.key for c in obs.comfyuis if c.mode is ComfyMode.CPU}
        comfyuis = daemon.actor.targets().comfyuis
        if not comfyuis:
            print(
                "No running ComfyUI found (set VRAM_COMFYUI_URL or label its container "
                "vram-supervisor.role=comfyui).",
                file=sys.stderr,
            )
            return EXIT_FAILED
        stage = FreeStage.HARD if hard else FreeStage.SOFT
        failed = False
        for key, (spec, _) in comfyuis.items():
            if key in on_cpu:
                # Its "vram" figures are system RAM: no GPU memory to give back, no wait.
                print(f"ComfyUI {spec.name} runs on the CPU: it holds no VRAM, nothing to free")
                continue
            outcome = daemon.actor.execute(FreeComfy(key, stage, "requested by hand"))
            took = f"{outcome.duration_s:.1f} s"
            if outcome.dry_run:
                print(f"ComfyUI {spec.name}: dry run, nothing sent ({outcome.detail})")
            elif outcome.result is FreeResult.FREED:
                print(
                    f"ComfyUI {spec.name}: freed ({stage}) "
                    f"{format_bytes(outcome.before_bytes)} -> "
                    f"{format_bytes(outcome.after_bytes)} in {took}"
                    + (f" ({outcome.detail})" if outcome.detail else "")
                )
            elif outcome.result is FreeResult.PENDING:
                print(
                    f"ComfyUI {spec.name}: a prompt is running; it frees its memory when "
                    "the prompt ends"
                )
            else:
                failed = True
                result = outcome.result.value if outcome.result else "failed"
                hint = " (try --hard)" if outcome.result is FreeResult.PINNED and not hard else ""
                print(f"ComfyUI {spec.name}: {result}: {outcome.detail}{hint}")
        return EXIT_FAILED if failed else EXIT_OK
    finally:
        daemon.close()


# ----------------------------------------------------------------------------- doctor


def doctor(settings: Settings, warnings: Sequence[str]) -> int:
    """Exit 1 when something essential (Docker when needed, a service API) fails."""
    from supervisor.doctor import run_doctor

    return EXIT_OK if run_doctor(settings, warnings) else EXIT_FAILED


# ----------------------------------------------------------------------------- small ones


def healthcheck(settings: Settings) -> int:
    """For Docker's HEALTHCHECK: GET /healthz, exit 0 on 200. Stdlib only."""
    url = local_url(settings, "/healthz")
    if url is None:
        print("healthcheck skipped: VRAM_HTTP_PORT=0 disables the endpoint")
        return EXIT_OK
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            print(response.read().decode(errors="replace").strip())
            return EXIT_OK if response.status == 200 else EXIT_FAILED
    except urllib.error.HTTPError as exc:
        print(f"unhealthy ({exc.code}): {exc.read().decode(errors='replace').strip()}")
    except OSError as exc:
        print(f"no answer from {url}: {exc}")
    return EXIT_FAILED


def demo() -> int:
    """The simulated-host demo lives in supervisor/demo.py (written separately)."""
    if importlib.util.find_spec("supervisor.demo") is None:
        print(
            "The demo is not part of this build (supervisor/demo.py is missing).", file=sys.stderr
        )
        return EXIT_FAILED
    demo_module = importlib.import_module("supervisor.demo")
    result = demo_module.main()
    return int(result) if isinstance(result, int) else EXIT_OK
