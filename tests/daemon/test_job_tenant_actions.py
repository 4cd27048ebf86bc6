"""The actor on job servers of the registry's other kinds, against the real fake A1111
over HTTP with the real client: a free only while it is idle (read again at the moment of
acting), verified by the GPU's free memory; a reload of parked weights only while idle,
verified by the server no longer reporting them parked."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from supervisor.actions import Actor
from supervisor.clients.sd_webui import SdWebUiClient
from supervisor.config import Settings
from supervisor.model import FreeJobs, FreeResult, ReloadJobs, ServiceSpec
from supervisor.ports import Targets
from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.sdwebui import FakeSdWebUI, SdConfig

KEY = "sd-webui/webui"


@dataclass
class Probe:
    gpu: MemoryGpu

    def comfy_reading(self, key: str, *, fresh_pids: bool = False) -> None:
        return None

    def free_bytes(self, gpu_uuids: tuple[str, ...] = ()) -> int:
        return self.gpu.free_bytes()


@dataclass
class World:
    fake: FakeSdWebUI
    url: str
    actor: Actor


@pytest.fixture
def world() -> Iterator[World]:
    gpu = MemoryGpu(24 * GIB)
    fake = FakeSdWebUI(gpu, SdConfig(variant="a1111", time_scale=0.05))
    server = fake.serve()
    client = SdWebUiClient(server.url)
    spec = ServiceSpec("sd-webui", "webui", server.url)
    actor = Actor(
        Settings(verify_timeout_s=2.0),
        probe=Probe(gpu),  # type: ignore[arg-type]
        targets=lambda: Targets(job_servers={KEY: (spec, client)}),
        poll_s=0.01,
    )
    yield World(fake, server.url, actor)
    client.close()
    server.stop()
    fake.close()


def test_an_idle_a1111_is_freed_verified_then_reloaded(world: World) -> None:
    out = world.actor.execute(FreeJobs(KEY, "test"))
    assert out.result is FreeResult.FREED, out
    assert out.after_bytes is not None and out.before_bytes is not None
    assert out.after_bytes - out.before_bytes == world.fake.weights_bytes
    assert world.fake.parked
    out = world.actor.execute(ReloadJobs(KEY, "room again"))
    assert out.ok, out
    assert world.fake.on_gpu and not world.fake.parked and world.fake.reloads == 1


def test_a_busy_a1111_is_neither_freed_nor_reloaded(world: World) -> None:
    world.actor.execute(FreeJobs(KEY, "test"))
    httpx.post(f"{world.url}/sdapi/v1/reload-checkpoint")  # the user reloads it
    codes: list[int] = []
    job = threading.Thread(
        target=lambda: codes.append(
            httpx.post(f"{world.url}/sdapi/v1/txt2img", json={"steps": 100}).status_code
        )
    )
    job.start()
    try:
        while world.fake.job is None:
            time.sleep(0.005)
        out = world.actor.execute(FreeJobs(KEY, "test"))
        assert out.result is FreeResult.FAILED and out.detail == "not freed: it has work"
        out = world.actor.execute(ReloadJobs(KEY, "room again"))
        assert not out.ok and out.detail == "not reloaded: it has work"
    finally:
        job.join()
    assert codes == [200]
    assert world.fake.unloads == 1 and world.fake.reloads == 1  # only the test's own reload
