"""Right after the supervisor starts, before the loop's first pass knows the services, a
gate in front of a fixed URL forwards there instead of answering 502 (seen under load: a
request in the first second got "no Ollama server is known now")."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from supervisor.config import Settings
from supervisor.gate import start_comfy_gate, start_gate
from supervisor.ports import LoadRoom
from supervisor.sim import SimHost


class NoRoom:
    def room_for(self, need_bytes: int) -> LoadRoom | None:
        return None

    def load_profile(self) -> None:
        return None

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        return False

    def free_bytes(self) -> int | None:
        return None

    def held_bytes(self) -> int | None:
        return None


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost(time_scale=0.01) as sim:
        yield sim


def test_the_ollama_gate_forwards_to_the_fixed_url_before_the_first_pass(host: SimHost) -> None:
    settings = Settings(ollama_url=host.ollama_url, gate_port=0, gate_host="127.0.0.1")
    gate = start_gate(settings, NoRoom(), lambda: None)  # type: ignore[arg-type]
    assert gate is not None
    try:
        r = httpx.get(f"http://127.0.0.1:{gate.port}/api/version", timeout=10)
    finally:
        gate.stop()
    assert r.status_code == 200 and r.json()["version"]


def test_the_image_gate_forwards_to_the_fixed_url_before_the_first_pass(host: SimHost) -> None:
    settings = Settings(comfyui_url=host.comfyui_url, comfyui_gate_port=0, gate_host="127.0.0.1")
    gate = start_comfy_gate(settings, NoRoom(), lambda: None)  # type: ignore[arg-type]
    assert gate is not None
    try:
        r = httpx.get(f"http://127.0.0.1:{gate.port}/system_stats", timeout=10)
    finally:
        gate.stop()
    assert r.status_code == 200 and r.json()["devices"]


def test_the_policy_sees_the_ollama_gate_only_while_it_serves(host: SimHost) -> None:
    """VRAM_GATE_PORT alone is no gate: the loop's observation says Ollama is gated once
    the gate listens, and no longer once it stopped (trigger 4 then acts as without one)."""
    from supervisor.assembly import Assembly

    settings = Settings(
        ollama_url=host.ollama_url,
        comfyui_url=host.comfyui_url,
        gate_port=0,
        gate_host="127.0.0.1",
    )
    assembly = Assembly(settings, nvml=False)
    assert not assembly.daemon.observe().ollama_gated  # not started yet
    assembly.start()
    try:
        assert assembly.daemon.observe().ollama_gated
        assembly.gate.stop()
        assert not assembly.daemon.observe().ollama_gated
    finally:
        assembly.stop()
