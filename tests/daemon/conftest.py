"""A small simulated world for the loop tests: one fake GPU, a ComfyUI and an Ollama in
labelled fake containers, NVML, and a fake clock that the Actor's verify loops sleep on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from loguru import logger

from supervisor.config import Settings
from supervisor.daemon import Daemon
from supervisor.model import Role
from tests.daemon.fakes import (
    FakeClock,
    FakeComfy,
    FakeDocker,
    FakeEvents,
    FakeGpu,
    FakeGpuReader,
    FakeOllama,
)


@dataclass
class World:
    clock: FakeClock
    gpu: FakeGpu
    comfy: FakeComfy
    ollama: FakeOllama
    reader: FakeGpuReader
    docker: FakeDocker
    events: FakeEvents
    settings: Settings = field(default_factory=Settings)

    def daemon(self, *, nvml: bool = True, with_docker: bool = True, **kw: Any) -> Daemon:
        settings = kw.pop("settings", self.settings)
        if not with_docker:
            settings = replace(
                settings, ollama_url=self.ollama.base_url, comfyui_url=self.comfy.base_url
            )
        return Daemon(
            settings,
            ollama_client=kw.pop("ollama_client", lambda url: self.ollama),
            comfy_client=kw.pop("comfy_client", lambda url: self.comfy),
            docker=(lambda: self.docker) if with_docker else None,
            events=self.events if with_docker else None,
            gpu=self.reader if nvml else None,
            clock=self.clock,
            actor_sleep=self.clock.sleep,
            **kw,
        )


@pytest.fixture
def world() -> World:
    clock = FakeClock()
    gpu = FakeGpu()
    comfy = FakeComfy(gpu, clock, models_bytes=10 * 1024**3, cache_bytes=1024**3)
    ollama = FakeOllama(gpu, clock)
    docker = FakeDocker()
    docker.add(Role.COMFYUI, "comfyui", comfy.base_url, pids=(comfy.pid,))
    # Ollama's runners are child processes: docker top lists whatever runs now.
    docker.add(
        Role.OLLAMA, "ollama", ollama.base_url, pids_fn=lambda: (6000, *ollama.pids.values())
    )
    return World(clock, gpu, comfy, ollama, FakeGpuReader(gpu), docker, FakeEvents())


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every log message (INFO and up, plus DEBUG) emitted during the test."""
    lines: list[str] = []
    sink: Callable[[Any], None] = lambda message: lines.append(message.record["message"])  # noqa: E731
    handler = logger.add(sink, level="DEBUG", format="{message}")
    yield lines
    logger.remove(handler)


def has(lines: list[str], text: str) -> bool:
    return any(text in line for line in lines)
