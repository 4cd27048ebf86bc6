"""Fixtures for the gate tests: a fake Ollama upstream, a scripted raw one, a fake
RoomMaker, a started gate (the fakes live in fakes.py and rawnet.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gate.fakes import GIB, MIB, Env, Timeline, Upstream, make_env
from tests.gate.rawnet import RawUpstream


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@pytest.fixture
def upstream(timeline: Timeline) -> Iterator[Upstream]:
    up = Upstream(timeline)
    up.install("llama3.2:latest", size=2 * GIB, runner_size=3 * GIB, context_length=4096)
    up.install("qwen3:8b", size=5 * GIB, runner_size=6 * GIB, context_length=8192)
    up.install("nomic-embed-text:latest", size=300 * MIB, runner_size=600 * MIB)
    up.start()
    yield up
    up.stop()


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    """A scripted raw upstream (rawnet.py)."""
    up = RawUpstream()
    yield up
    up.close()


@pytest.fixture
def env(timeline: Timeline, upstream: Upstream) -> Iterator[Env]:
    e = make_env(timeline, upstream)
    e.gate.start()
    yield e
    e.gate.stop()
