"""Several GPUs: the gate and the heal judge room on the GPU(s) Ollama can load onto, and
never free a ComfyUI on a GPU Ollama cannot use."""

from __future__ import annotations

from dataclasses import dataclass, replace

from supervisor.config import Settings
from supervisor.daemon import Daemon
from supervisor.model import HealOllama, Role
from supervisor.ports import LoadRoom
from tests.daemon.fakes import (
    GIB,
    FakeClock,
    FakeComfy,
    FakeDocker,
    FakeEvents,
    FakeGpu,
    FakeGpuReader,
    FakeOllama,
)

OLLAMA = "ollama/ollama"


@dataclass
class Host:
    clock: FakeClock
    gpus: tuple[FakeGpu, ...]
    comfy: FakeComfy
    ollama: FakeOllama
    docker: FakeDocker

    def daemon(self) -> Daemon:
        return Daemon(
            Settings(),
            ollama_client=lambda url: self.ollama,
            comfy_client=lambda url: self.comfy,
            docker=lambda: self.docker,
            events=FakeEvents(),
            gpu=FakeGpuReader(*self.gpus),
            clock=self.clock,
            actor_sleep=self.clock.sleep,
        )


def host(*, ollama_ids: tuple[str, ...], comfy_ids: tuple[str, ...], n_gpus: int = 2) -> Host:
    """Ollama's runners land on GPU 0, ComfyUI (11.3 GiB) is on GPU 1; Docker granted
    them the GPUs given by NVML index."""
    clock = FakeClock()
    gpus = tuple(FakeGpu(uuid=f"GPU-{i}{i}{i}", index=i) for i in range(n_gpus))
    comfy = FakeComfy(gpus[1], clock, models_bytes=10 * GIB, cache_bytes=GIB)
    ollama = FakeOllama(gpus[0], clock)
    docker = FakeDocker()
    c = docker.add(Role.COMFYUI, "comfyui", comfy.base_url, pids=(comfy.pid,))
    c.spec = replace(c.spec, gpu_uuids=comfy_ids)
    o = docker.add(
        Role.OLLAMA, "ollama", ollama.base_url, pids_fn=lambda: (6000, *ollama.pids.values())
    )
    o.spec = replace(o.spec, gpu_uuids=ollama_ids)
    return Host(clock, gpus, comfy, ollama, docker)


def test_before_ollamas_first_load_its_gpus_are_the_ones_docker_granted() -> None:
    h = host(ollama_ids=("0",), comfy_ids=("1",))
    daemon = h.daemon()
    daemon.observe()  # Ollama holds no VRAM yet: NVML lists no process of it
    assert daemon.actor.targets().ollama_gpus == ("GPU-000",)


def test_gate_judges_ollamas_gpu_and_leaves_a_comfyui_on_another_gpu_alone() -> None:
    """Before: free space was the best of all GPUs and the ComfyUI on GPU 1 was freed, so
    the gate answered "room made" while GPU 0, where the model lands, stayed full."""
    h = host(ollama_ids=("0",), comfy_ids=("1",))
    h.gpus[0].held[9999] = 20 * GIB  # something else fills GPU 0: 4 GiB free
    daemon = h.daemon()
    daemon.observe()
    assert h.gpus[0].free_bytes == 4 * GIB
    assert daemon.room_maker.room_for(8 * GIB) == LoadRoom(4 * GIB)
    assert not daemon.room_maker.make_room(8 * GIB, reason="gate: load", deadline_s=5)
    assert h.comfy.free_calls == []


def test_with_several_ollama_gpus_room_is_the_best_of_those_not_of_every_gpu() -> None:
    h = host(ollama_ids=("0", "1"), comfy_ids=("1",), n_gpus=3)
    h.gpus[0].held[9999] = 20 * GIB  # GPU 0: 4 GiB free; GPU 1: 12.7 GiB; GPU 2: 24 GiB
    daemon = h.daemon()
    daemon.observe()
    assert daemon.room_maker.room_for(GIB) == LoadRoom(h.gpus[1].free_bytes)
    need = h.gpus[1].free_bytes + 4 * GIB  # more than GPU 1 has, less than GPU 2 has
    assert daemon.room_maker.make_room(need, reason="gate: load", deadline_s=30)
    assert h.comfy.free_calls == [(True, False)]  # GPU 2 is no room for Ollama: freed


def test_heal_judges_room_on_the_gpu_the_policy_named() -> None:
    """The model sits on GPU 0, which something else fills; GPU 1 is empty. Reloading it
    would put it on GPU 0 again and spill: the heal must judge GPU 0, not the best GPU."""
    h = host(ollama_ids=("0", "1"), comfy_ids=("1",))
    h.comfy.models_bytes = h.comfy.cache_bytes = 0
    h.comfy._sync()
    h.gpus[0].held[9999] = 20 * GIB
    h.gpus[1].held[6000] = GIB  # Ollama holds memory on both GPUs (another runner)
    h.ollama.load("llama3.2:latest", size_bytes=6 * GIB)
    model = h.ollama.models["llama3.2:latest"]
    assert model.is_spilled
    daemon = h.daemon()
    daemon.observe()
    outcome = daemon.actor.execute(
        HealOllama(OLLAMA, model.name, "spilled", (), model.gpu_fraction, gpu_uuid="GPU-000")
    )
    assert not outcome.ok and "not enough room" in outcome.detail
    assert h.ollama.unload_calls == []  # nothing torn down for a reload that would spill
