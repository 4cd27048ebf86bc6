"""The gate's event loop (VRAM_GATE_LOOP): asyncio's own by default, uvloop when asked
for and installed (the test extra installs it), asyncio with a warning when uvloop is
asked for but missing; a load and a stream relayed alike on both."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator

import httpx
import pytest
from loguru import logger

from supervisor.config import load_settings
from supervisor.errors import ConfigError
from supervisor.gate.loop import loop_name, new_event_loop
from tests.gate.fakes import Env, Timeline, Upstream, make_env

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_asyncio_asked_for_is_asyncios_own_loop() -> None:
    loop = new_event_loop("asyncio")
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_asyncio_is_the_default() -> None:
    loop = new_event_loop()
    try:
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()
    assert load_settings({})[0].gate_loop == "asyncio"


def test_uvloop_when_installed_else_asyncio_with_a_warning() -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        loop = new_event_loop("uvloop")
    finally:
        logger.remove(sink)
    try:
        assert loop_name(loop) == ("uvloop" if HAS_UVLOOP else "asyncio")
    finally:
        loop.close()
    assert bool(lines) == (not HAS_UVLOOP)
    assert all("VRAM_GATE_LOOP=uvloop" in line for line in lines)


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="trio"):
        new_event_loop("trio")
    settings, warnings = load_settings({"VRAM_GATE_LOOP": "UVloop"})
    assert settings.gate_loop == "uvloop" and warnings == []
    with pytest.raises(ConfigError, match="VRAM_GATE_LOOP"):
        load_settings({"VRAM_GATE_LOOP": "trio"})


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_env(
    request: pytest.FixtureRequest, timeline: Timeline, upstream: Upstream
) -> Iterator[Env]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    e = make_env(timeline, upstream, event_loop=request.param)
    try:
        e.gate.start()
    finally:
        logger.remove(sink)
    expected = request.param if request.param == "asyncio" or HAS_UVLOOP else "asyncio"
    assert any(f"gate listening on 127.0.0.1:{e.gate.port} ({expected})" in m for m in lines)
    yield e
    e.gate.stop()


def test_each_loop_relays_a_load_and_a_stream(loop_env: Env) -> None:
    with httpx.Client(timeout=10) as client:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        r = client.post(f"{loop_env.url}/api/generate", json=body)
        assert r.status_code == 200 and r.json()["done"] is True
        assert loop_env.room.calls, "the load got room made first"
        pieces = []
        stream_body = {**body, "stream": True}
        with client.stream("POST", f"{loop_env.url}/api/generate", json=stream_body) as s:
            assert s.status_code == 200
            pieces = [json.loads(line) for line in s.iter_lines() if line]
        assert pieces and pieces[-1]["done"] is True and len(pieces) > 1
        # The same connection carries on (keep-alive on both loops).
        assert client.get(f"{loop_env.url}/api/tags").status_code == 200
