"""The `doctor` command: check Docker, each service API, NVML and the local endpoint.

One line per check, OK/WARN/FAIL, each failure with a concrete fix. Essential (a FAIL):
Docker when it is needed, every service API answering, and an Ollama and a ComfyUI unless
at least two tenants of any kinds share the GPU (then a missing one is a WARN). Each
tenant of the registry's other kinds is described by its kind: its mode, what it has
loaded or whether it works, and whether it can be unloaded or freed.
Not essential (a WARN): NVML (the API source works without it), a stopped container, an
unhealthy running supervisor, and no VRAM reading at all (no NVML and no ComfyUI on a
CUDA device): the supervisor then runs but cannot see, so the result is not "all good".
Each ComfyUI's version and memory mode (classic, Dynamic VRAM, CPU) is shown.
It only reads: it never frees, restarts or loads anything.
Heavy imports (docker, httpx, pynvml) happen inside, as in `cli`.
"""

from __future__ import annotations

import functools
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


def _discover(settings: Settings, urls: dict[str, list[tuple[str, str]]]) -> bool:
    """Docker reachable, and the running labelled containers of every role without a
    fixed URL (added to `urls`). False when something essential failed."""
    from supervisor.docker.discovery import DockerAdapter
    from supervisor.errors import DockerUnavailable

    ok = True
    fixed = set(urls)
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
            if c.spec.role in fixed:
                continue
            if c.is_running:
                urls.setdefault(c.spec.role, []).append(
                    (f"{c.spec.role} container {c.spec.name}", c.spec.url)
                )
            else:
                _line("WARN", f"{c.spec.role} container {c.spec.name} is {c.status}")
        for role in (Role.OLLAMA, Role.COMFYUI):
            if role not in urls and not any(c.spec.role == role for c in containers):
                _line(
                    "WARN" if len(urls) >= 2 else "FAIL",
                    f"no container labelled vram-supervisor.role={role}",
                    f"add label vram-supervisor.role={role} to the {role} container, "
                    f"or set VRAM_{role.name}_URL"
                    + ("" if len(urls) < 2 else " (not needed: other tenants share the GPU)"),
                )
                ok &= len(urls) >= 2
    except DockerUnavailable as exc:
        ok = False
        _line(
            "FAIL",
            f"Docker is not reachable: {exc}",
            "mount /var/run/docker.sock (-v /var/run/docker.sock:/var/run/docker.sock:ro)"
            " or set DOCKER_HOST; or give the services fixed URLs (VRAM_SERVICES)",
        )
    finally:
        adapter.close()
    return ok


def _describe_tenant(role: str, client: object) -> str:
    """What a server of the registry's other kinds says of itself, for one doctor line."""
    from supervisor.tenants import Capability, kind_of

    kind = kind_of(role)
    if kind.can(Capability.RUNS_JOBS):
        jobs = client.jobs()  # type: ignore[attr-defined]
        work = {True: "has work", False: "idle", None: "work unknown"}[jobs.busy]
        free = "can be freed between jobs" if jobs.can_free else "has no free call"
        return f"{kind.title}{f' ({jobs.mode})' if jobs.mode else ''}, {work}, {free}"
    served = client.served()  # type: ignore[attr-defined]
    loaded = sum(1 for m in served.models if m.is_resident)
    how = "idle models can be unloaded" if served.can_unload else "no unload: observed only"
    mode = f" ({served.mode})" if served.mode else ""
    return f"{kind.title}{mode}, {loaded} model(s) loaded, {how}"


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
    urls: dict[str, list[tuple[str, str]]] = {}
    given = [("ollama", settings.ollama_url, "VRAM_OLLAMA_URL")]
    given += [("comfyui", settings.comfyui_url, "VRAM_COMFYUI_URL")]
    given += [(role, url, "VRAM_SERVICES") for role, url in settings.services or ()]
    for role, fixed_url, source in given:
        if fixed_url:
            urls.setdefault(role, []).append((f"{role} ({source})", fixed_url))
    ok = True
    if not settings.needs_docker:
        which = "VRAM_SERVICES" if settings.services else "VRAM_OLLAMA_URL and VRAM_COMFYUI_URL"
        _line("OK", f"Docker not needed: fixed URLs ({which})")
    else:
        ok = _discover(settings, urls)
    timeout = settings.request_timeout_s
    for what, url in urls.get(Role.OLLAMA, []):
        from supervisor.clients.ollama import OllamaClient

        with OllamaClient(url, timeout) as ollama:

            def describe_ollama() -> str:
                version = ollama.version()
                generation = ollama_profile(version).generation
                return f"Ollama {version} ({generation}), {len(ollama.ps())} model(s) loaded"

            ok &= _api_answers(what, url, describe_ollama, "VRAM_OLLAMA_URL")
    devices: list[str] = []
    for what, url in urls.get(Role.COMFYUI, []):
        from supervisor.clients.comfyui import ComfyClient
        from supervisor.vram.api import describe_comfy

        with ComfyClient(url, timeout) as comfy:

            def describe() -> str:
                stats = comfy.system_stats()
                devices.append(stats.device_type)
                size = "RAM" if stats.device_type != "cuda" else "VRAM"
                return f"{describe_comfy(stats)}, {format_bytes(stats.vram_total_bytes)} {size}"

            ok &= _api_answers(what, url, describe, "VRAM_COMFYUI_URL")
    for role, found in urls.items():
        if role in (Role.OLLAMA, Role.COMFYUI):
            continue
        from supervisor.tenants import make_client

        for what, url in found:
            client = make_client(role, url, timeout_s=timeout)
            try:
                describe = functools.partial(_describe_tenant, role, client)
                ok &= _api_answers(what, url, describe, "VRAM_SERVICES")
            finally:
                client.close()
    if sum(len(v) for v in urls.values()) < 2:
        _line(
            "WARN",
            "fewer than two tenants found: there is nothing to share the GPU with",
            "label every GPU service (vram-supervisor.role) or list them in VRAM_SERVICES",
        )
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
