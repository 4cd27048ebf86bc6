"""Reading the services' APIs: one service's read, all of them in parallel.

Policy: an Ollama is read with /api/ps; a ComfyUI with /queue and /system_stats, and it
counts as answering when either answered (one bad endpoint is a partial reading, logged
at DEBUG); a server of any other registry kind with its client's `served()` (a model
server) or `jobs()` (a job server, `Capability.RUNS_JOBS`).
A read never raises: errors, including an adapter breaking its contract,
become `Read.error`. Every running service is read at once on daemon threads, so one slow
service delays no other and a read stuck in a timeout never holds up the process's exit:
when the supervisor stops, the wait for them ends at once (`Interrupted`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from loguru import logger

from supervisor.errors import ServiceError
from supervisor.model import (
    ComfyQueue,
    ComfyStats,
    JobState,
    OllamaModel,
    Role,
    ServedState,
    ServiceHealth,
    ServiceSpec,
)
from supervisor.tenants import Capability, kind_of


def noisy(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th ... occurrence of a repeated failure."""
    return count > 0 and count & (count - 1) == 0


@dataclass
class Service:
    """One known service: its spec, what Docker says, its API client and failure count."""

    spec: ServiceSpec
    is_running: bool
    health: ServiceHealth = ServiceHealth.NONE
    failures: int = 0
    error: str | None = None
    client: Any = None  # OllamaApi | ComfyApi | ModelServerApi, built for spec.url
    version: str | None = None  # Ollama's /api/version, read once per client (container)


@dataclass(frozen=True)
class Read:
    """One read of a service's API; `error` set when nothing answered."""

    models: tuple[OllamaModel, ...] | None = None
    queue: ComfyQueue | None = None
    stats: ComfyStats | None = None
    error: str | None = None
    version: str | None = None  # Ollama's, when it was read this time
    served: ServedState | None = None  # a model server of another registry kind
    jobs: JobState | None = None  # a job server of another registry kind
    broken: Exception | None = None  # the client raised outside its contract (a bug)


def read_service(service: Service) -> Read:
    """One service's API read; never raises (see the module doc)."""
    try:
        if service.spec.role not in (Role.OLLAMA, Role.COMFYUI):
            if kind_of(service.spec.role).can(Capability.RUNS_JOBS):
                return Read(jobs=service.client.jobs())
            return Read(served=service.client.served())
        if service.spec.role == Role.OLLAMA:
            models = service.client.ps()
            version = None
            if service.version is None:  # once per client: a recreated container gets anew
                try:
                    version = str(service.client.version())
                except ServiceError as exc:
                    logger.debug(f"Cannot read {service.spec.key}'s version: {exc}")
            return Read(models=models, version=version)
        queue: ComfyQueue | None = None
        stats: ComfyStats | None = None
        errors: list[str] = []
        try:
            queue = service.client.queue()
        except ServiceError as exc:
            errors.append(str(exc))
        try:
            stats = service.client.system_stats()
        except ServiceError as exc:
            errors.append(str(exc))
        # Dead only when nothing answered; one bad endpoint is a partial reading.
        error = "; ".join(errors) if queue is None and stats is None else None
        if errors and error is None:
            logger.debug(f"Partial reading of {service.spec.key}: {'; '.join(errors)}")
        return Read(queue=queue, stats=stats, error=error)
    except ServiceError as exc:
        return Read(error=str(exc))
    except Exception as exc:  # noqa: BLE001 - an adapter's bug is a failed read; the loop goes on
        return Read(error=f"unexpected {type(exc).__name__}: {exc}", broken=exc)


class Interrupted(Exception):
    """`stop` was set while reads were still waiting: the pass is abandoned."""


# How often a wait for the reads looks at `stop` (a SIGTERM must exit within ~1 s).
STOP_POLL_S = 0.02


def read_all(services: list[Service], stop: threading.Event | None = None) -> list[Read]:
    """Read every service at once, so one slow service does not delay the others. Daemon
    threads (not a pool): a read stuck in a timeout never holds up the process's exit.
    When `stop` is set meanwhile, `Interrupted` is raised at once instead of waiting out
    a hung service's request timeout; the reads left running end on their own."""
    results: list[Read] = [Read(error="not read")] * len(services)
    left = [len(services)]
    lock, done = threading.Lock(), threading.Event()

    def one(i: int) -> None:
        results[i] = read_service(services[i])
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    if not services:
        return []
    for i, s in enumerate(services):
        threading.Thread(target=one, args=(i,), name=f"read-{s.spec.key}", daemon=True).start()
    while not done.wait(STOP_POLL_S if stop is not None else None):
        if stop is not None and stop.is_set():
            raise Interrupted("stopping")
    return list(results)


def contract_break(what: str, exc: Exception, seen: set[tuple[str, str]]) -> None:
    """An adapter raised something outside its contract (not one of `errors.py`): a bug.
    The reading is treated as missing, like a typed failure, but said loudly: at ERROR
    with its traceback, once per place and exception type in `seen` (the Observer's: a
    bug repeats every pass), later at DEBUG."""
    key = (what, type(exc).__name__)
    if key in seen:
        logger.debug(f"{what} failed again (outside its contract): {exc!r}")
        return
    seen.add(key)
    logger.opt(exception=exc).error(
        f"{what} raised {type(exc).__name__} outside its contract (a bug; the reading is "
        f"treated as missing): {exc}"
    )


def close_quietly(thing: object) -> None:
    """Close an adapter if it can be closed; a failure is only worth a DEBUG line."""
    close = getattr(thing, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort, also mid-pass
            logger.debug(f"Closing {thing!r}: {exc}")
