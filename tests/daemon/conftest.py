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


def comfy_api_figure(world: World, truth: int) -> tuple[int, int]:
    """(low, high) of what the supervisor reads from a ComfyUI's API when it holds `truth`
    bytes of models and cache: exactly torch's reserved bytes in classic mode; under
    Dynamic VRAM the bound from the device figures, which is off by at most a CUDA context
    (the supervisor assumes 384 MiB, the fake process holds 300 MiB)."""
    if not world.comfy.dynamic_vram:
        return truth, truth
    return truth - 512 * 1024**2, truth + 512 * 1024**2


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


@pytest.fixture(params=["classic", "dynamic-vram"])
def world(request: pytest.FixtureRequest) -> World:
    """Every loop test runs against a classic ComfyUI (weights in torch's figures) and a
    ComfyUI >= 0.15 with Dynamic VRAM (torch's figures show only its cache)."""
    clock = FakeClock()
    gpu = FakeGpu()
    comfy = FakeComfy(
        gpu,
        clock,
        models_bytes=10 * 1024**3,
        cache_bytes=1024**3,
        dynamic_vram=request.param == "dynamic-vram",
    )
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
