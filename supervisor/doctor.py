"""The `doctor` command: check Docker, each service API, NVML and the local endpoint.

One line per check, OK/WARN/FAIL, each failure with a concrete fix. Essential (a FAIL):
Docker when it is needed, a labelled container per role, every service API answering.
Not essential (a WARN): NVML (the API source works without it), a stopped container, an
unhealthy running supervisor, and no VRAM reading at all (no NVML and no ComfyUI on a
CUDA device): the supervisor then runs but cannot see, so the result is not "all good".
Each ComfyUI's version and memory mode (classic, Dynamic VRAM, CPU) is shown, and each
service of the registry's other kinds (VRAM_SERVICES, labelled containers) with its kind
and mode (e.g. whether a model server can sleep or unload).
It only reads: it never frees, restarts or loads anything.
Heavy imports (docker, httpx, pynvml) happen inside, as in `cli`.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable, Sequence

from supervisor import __version__
from supervisor.config import Settings
from supervisor.errors import ServiceError
from supervisor.model import Role
from supervisor.ollama_profile import ollama_profile
from supervisor.status import get_json, local_url
from supervisor.units import format_bytes


def _line(state: str, text: str, fix: str = "") -> None:
    print(f"{state:<4} {text}" + (f"\n       fix: {fix}" if fix else ""))


def _api_answers(what: str, url: str, describe: Callable[[], str], variable: str) -> bool:
    """One service API check; `describe()` reads the API and says what answered."""
    try:
        _line("OK", f"{what} at {url} answers ({describe()})")
        return True
    except ServiceError as exc:
        _line(
            "FAIL",
            f"{what} at {url}: {exc}",
            "check that this address is reachable from the supervisor (same Docker "
            f"network?); set {variable} or the label vram-supervisor.url",
        )
        return False


def _discover(
    settings: Settings,
    urls: dict[Role, list[tuple[str, str]]],
    others: list[tuple[str, str, str]] | None = None,
) -> bool:
    """Docker reachable, and a running container per role without a fixed URL (added to
    `urls`; running containers of the other kinds to `others`). False when something
    essential failed."""
    from supervisor.docker.discovery import DockerAdapter
    from supervisor.errors import DockerUnavailable

    ok = True
    adapter = DockerAdapter(timeout_s=settings.request_timeout_s)
    try:
        adapter.ping()
        containers = adapter.list_services()
        _line(
            "OK",
            f"Docker reachable ({os.environ.get('DOCKER_HOST') or 'default socket'})"
            f", {len(containers)} labelled container(s)",
        )
        for c in containers:
            if others is not None and c.spec.role not in (Role.OLLAMA, Role.COMFYUI):
                if c.is_running:
                    others.append(
                        (f"{c.spec.role} container {c.spec.name}", c.spec.role, c.spec.url)
                    )
                else:
                    _line("WARN", f"{c.spec.role} container {c.spec.name} is {c.status}")
        for role in (Role.OLLAMA, Role.COMFYUI):
            if urls[role]:
                continue
            found = [c for c in containers if c.spec.role is role]
            for c in found:
                if c.is_running:
                    urls[role].append((f"{role} container {c.spec.name}", c.spec.url))
                else:
                    _line("WARN", f"{role} container {c.spec.name} is {c.status}")
            if not found:
                ok = False
                _line(
                    "FAIL",
                    f"no container labelled vram-supervisor.role={role}",
                    f"add label vram-supervisor.role={role} to the {role} container, "
                    f"or set VRAM_{role.name}_URL",
                )
    except DockerUnavailable as exc:
        ok = False
        _line(
            "FAIL",
            f"Docker is not reachable: {exc}",
            "mount /var/run/docker.sock (-v /var/run/docker.sock:/var/run/docker.sock:ro)"
            " or set DOCKER_HOST; or set both VRAM_OLLAMA_URL and VRAM_COMFYUI_URL",
        )
    finally:
        adapter.close()
    return ok


def _check_other(what: str, role: str, url: str, timeout_s: float) -> bool:
    """A service of the registry's other kinds: its kind, its mode, what it holds."""
    from supervisor.tenants import Capability, kind_of, make_client

    kind = kind_of(role)
    client = make_client(role, url, timeout_s=timeout_s)

    def describe() -> str:
        if kind.can(Capability.RUNS_JOBS):
            jobs = client.jobs()
            work = {True: "has work", False: "idle", None: "work unknown"}[jobs.busy]
            how = "freed between jobs" if jobs.can_free else "no free call: observed only"
            return f"{kind.title}{f' ({jobs.mode})' if jobs.mode else ''}: {work}; {how}"
        served = client.served()
        how = "idle models can be unloaded" if served.can_unload else "no unload: observed only"
        models = ", ".join(f"{m.name} {m.state}" for m in served.models) or "no model loaded"
        mode = f" ({served.mode})" if served.mode else ""
        return f"{kind.title}{mode}: {models}; {how}"

    try:
        return _api_answers(what, url, describe, "VRAM_SERVICES")
    finally:
        client.close()


def _check_nvml() -> bool:
    from supervisor.errors import NvmlUnavailable

    try:
        from supervisor.vram.nvml import NvmlReader

        with NvmlReader() as reader:
            gpus = reader.gpus()
        names = ", ".join(g.name for g in gpus) or "no GPU"
        _line("OK", f"NVML works: {len(gpus)} GPU(s): {names}")
        return True
    except NvmlUnavailable as exc:
        _line(
            "WARN",
            f"NVML missing: {exc}",
            "run with the NVIDIA runtime (--gpus all, capability utility) or rely on the "
            "API source (ComfyUI /system_stats and Ollama /api/ps)",
        )
        return False


def _check_running_supervisor(settings: Settings) -> None:
    health = local_url(settings, "/healthz")
    if health is None:
        return
    try:
        get_json(health)
        _line("OK", f"a supervisor is running and healthy at {health}")
    except urllib.error.HTTPError as exc:
        _line("WARN", f"a supervisor answers at {health} but is unhealthy ({exc.code})")
    except (OSError, ValueError):
        _line("OK", f"no supervisor is running; port {settings.http_port} is free to use")


def run_doctor(settings: Settings, warnings: Sequence[str]) -> bool:
    """Print every check; True when nothing essential failed."""
    _line("OK", f"settings parsed (vram-supervisor {__version__})")
    for warning in warnings:
        _line("WARN", warning)
    urls: dict[Role, list[tuple[str, str]]] = {Role.OLLAMA: [], Role.COMFYUI: []}
    for role, url in ((Role.OLLAMA, settings.ollama_url), (Role.COMFYUI, settings.comfyui_url)):
        if url:
            urls[role].append((f"{role} (VRAM_{role.name}_URL)", url))
    others: list[tuple[str, str, str]] = []
    for name, fixed in settings.services or ():
        if name in (Role.OLLAMA, Role.COMFYUI):
            urls[Role(name)].append((f"{name} (VRAM_SERVICES)", fixed))
        else:
            others.append((f"{name} (VRAM_SERVICES)", name, fixed))
    ok = True
    if not settings.needs_docker:
        _line("OK", "Docker not needed: fixed URLs are set")
    else:
        ok = _discover(settings, urls, others)
    timeout = settings.request_timeout_s
    for what, url in urls[Role.OLLAMA]:
        from supervisor.clients.ollama import OllamaClient

        with OllamaClient(url, timeout) as ollama:

            def describe_ollama() -> str:
                version = ollama.version()
                generation = ollama_profile(version).generation
                return f"Ollama {version} ({generation}), {len(ollama.ps())} model(s) loaded"

            ok &= _api_answers(what, url, describe_ollama, "VRAM_OLLAMA_URL")
    devices: list[str] = []
    for what, url in urls[Role.COMFYUI]:
        from supervisor.clients.comfyui import ComfyClient
        from supervisor.vram.api import describe_comfy

        with ComfyClient(url, timeout) as comfy:

            def describe() -> str:
                stats = comfy.system_stats()
                devices.append(stats.device_type)
                size = "RAM" if stats.device_type != "cuda" else "VRAM"
                return f"{describe_comfy(stats)}, {format_bytes(stats.vram_total_bytes)} {size}"

            ok &= _api_answers(what, url, describe, "VRAM_COMFYUI_URL")
    for what, kind, fixed in others:
        ok &= _check_other(what, kind, fixed, timeout)
    nvml = _check_nvml()
    blind = not nvml and "cuda" not in devices
    if blind:
        _line(
            "WARN",
            "no VRAM reading at all: NVML is missing and no ComfyUI reports a CUDA device "
            f"({', '.join(devices) or 'no ComfyUI answered'}); the supervisor would run "
            "without seeing any GPU memory",
            "give the supervisor NVML (--gpus all, capability utility); a ComfyUI on the "
            "CPU holds no VRAM, so only NVML can show what Ollama holds",
        )
    _check_running_supervisor(settings)
    result = (
        "something essential failed"
        if not ok
        else "runs, but cannot read VRAM (see the WARN above)"
        if blind
        else "all good"
    )
    print("\nResult: " + result)
    return ok
