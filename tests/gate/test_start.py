"""start_gate: what cli gets for VRAM_GATE_PORT, following the Ollama the daemon uses."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from loguru import logger

from supervisor.config import Settings
from supervisor.gate import start_gate
from supervisor.ports import OllamaApi
from tests.gate.fakes import FakeOllamaApi, FakeRoom, Timeline, Upstream


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    yield lines
    logger.remove(sink)


def test_no_gate_port_means_no_gate(timeline: Timeline) -> None:
    assert start_gate(Settings(gate_port=None), FakeRoom(timeline)) is None


def test_without_any_ollama_address_the_gate_stays_off(
    timeline: Timeline, warnings: list[str]
) -> None:
    gate = start_gate(Settings(gate_port=0, ollama_url=None), FakeRoom(timeline))

    assert gate is None
    assert any("set VRAM_OLLAMA_URL" in w for w in warnings)


def test_the_gate_follows_the_current_ollama(timeline: Timeline, upstream: Upstream) -> None:
    api = FakeOllamaApi(upstream)
    api.base_url = upstream.url
    current: list[OllamaApi | None] = [api]
    upstream.resident.add("llama3.2:latest")
    room = FakeRoom(timeline)
    settings = Settings(gate_port=0, gate_host="127.0.0.1", gate_wait_s=1.5)

    gate = start_gate(settings, room, lambda: current[0])
    assert gate is not None
    try:
        url = f"http://127.0.0.1:{gate.port}"
        body = {"model": "llama3.2", "prompt": "x", "stream": False}
        with httpx.Client(timeout=10) as client:
            resident = client.post(f"{url}/api/generate", json=body)
            gated = client.post(f"{url}/api/generate", json={**body, "model": "qwen3:8b"})
            current[0] = None  # the Ollama container went away
            gone = client.get(f"{url}/api/tags")
    finally:
        gate.stop()

    assert resident.status_code == 200 and gated.status_code == 200
    assert [(c.reason, c.deadline_s) for c in room.calls] == [("gate: load of qwen3:8b", 1.5)]
    assert gone.status_code == 502
