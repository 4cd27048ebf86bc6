"""Fixtures for the simulator's own tests: a SimHost on 127.0.0.1 and an HTTP client.

Time runs fast (`time_scale`) so a 5-minute keep-alive or a 4-second image job takes
milliseconds; tests that need to watch something happen slow down only that part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from supervisor.sim import SimHost

WaitUntil = Callable[..., None]


def _wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@pytest.fixture
def wait_until() -> WaitUntil:
    return _wait_until


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


@pytest.fixture
def make_host() -> Iterator[Callable[..., SimHost]]:
    """Build and start SimHosts; all are stopped at teardown."""
    hosts: list[SimHost] = []

    def make(**kwargs: object) -> SimHost:
        kwargs.setdefault("time_scale", 0.01)
        host = SimHost(**kwargs)  # type: ignore[arg-type]
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        host.stop()


@pytest.fixture
def host(make_host: Callable[..., SimHost]) -> SimHost:
    return make_host()
