"""While the Docker daemon is down or restarting, every failed attempt must close its socket.

The SDK's unix-socket connection keeps the socket it makes in a local variable until its
connect succeeds; a failed connect leaves it referenced from the exception's frames, which
sit in reference cycles that only a full garbage collection breaks. The soak's daemon
restart found one such descriptor still open at the end of a run. The Docker adapter and
the events follower now release those frames (`release_failure`). These tests run with the
cyclic collector off, so a socket that depends on it stays open and is counted: the real
SDK against a socket path nobody listens on (absent, as while dockerd is stopped, or
present and refusing, as while it starts).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from tenacity.wait import wait_fixed

from supervisor.docker.discovery import DockerAdapter, release_failure
from supervisor.docker.events import DockerEvents
from supervisor.errors import DockerUnavailable

ATTEMPTS = 12


def unconnected_unix_sockets() -> set[str]:
    """Inodes of this process's unix sockets that are not connected (a failed connect's)."""
    own = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            own.add(target[8:-1])
    unconnected = set()
    for row in Path("/proc/self/net/unix").read_text().splitlines()[1:]:
        f = row.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; St 01 = unconnected
        if len(f) >= 7 and f[6] in own and f[5] == "01" and f[3] != "00010000":
            unconnected.add(f[6])
    return unconnected


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture(params=["absent", "refusing"])
def dead_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """unix:// URL of a Docker socket that answers nothing: the file missing (dockerd
    stopped), or bound and not listening (connect refused)."""
    path = tmp_path / "docker.sock"
    if request.param == "absent":
        yield f"unix://{path}"
        return
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))
    try:
        yield f"unix://{path}"
    finally:
        bound.close()


@pytest.mark.parametrize("pinned_version", [None, "1.41"], ids=["version-auto", "pinned"])
def test_calls_while_the_daemon_is_down_leave_no_socket_open(
    no_cycle_collector: None, dead_socket: str, pinned_version: str | None
) -> None:
    def build() -> docker.DockerClient:
        # version=None asks the daemon at construction (docker.from_env's way), so the
        # constructor itself fails; a pinned version fails at the first call.
        return docker.DockerClient(base_url=dead_socket, timeout=2, version=pinned_version)

    adapter = DockerAdapter(client_factory=build, own_container_id=lambda: None)
    before = unconnected_unix_sockets()
    for _ in range(ATTEMPTS):
        with pytest.raises(DockerUnavailable, match="Docker ping failed"):
            adapter.ping()
        with pytest.raises(DockerUnavailable, match="Docker container list failed"):
            adapter.list_services()
    left = unconnected_unix_sockets() - before
    adapter.close()
    assert not left, f"{len(left)} sockets of {2 * ATTEMPTS} failed calls still open"


def test_the_events_follower_retrying_a_down_daemon_leaves_no_socket_open(
    no_cycle_collector: None, dead_socket: str
) -> None:
    tries = 0
    enough = threading.Event()

    def build() -> docker.DockerClient:
        nonlocal tries
        tries += 1
        if tries >= ATTEMPTS:
            enough.set()
        return docker.DockerClient(base_url=dead_socket, timeout=2)

    before = unconnected_unix_sockets()
    source = DockerEvents(client_factory=build, wait=wait_fixed(0.01))
    source.start(lambda _: None)
    try:
        assert enough.wait(10), f"only {tries} attempts"
    finally:
        source.stop()
    assert not source.is_alive
    left = unconnected_unix_sockets() - before
    assert not left, f"{len(left)} sockets of {tries} failed attempts still open"


class _Held:
    """Stands for the socket a failed frame holds."""


def test_release_lets_go_of_every_finished_frame_in_the_chain_and_keeps_the_messages() -> None:
    refs: list[weakref.ref[_Held]] = []

    def connect() -> None:
        sock = _Held()
        refs.append(weakref.ref(sock))
        raise OSError("connect failed")

    def call() -> None:
        try:
            connect()
        except OSError as cause:
            during = _Held()
            refs.append(weakref.ref(during))
            raise RuntimeError("Error while fetching server API version") from cause

    try:
        call()
    except RuntimeError as exc:
        assert all(r() is not None for r in refs), "held by the traceback until released"
        release_failure(exc)
        assert [r() for r in refs] == [None, None]
        assert str(exc) == "Error while fetching server API version"
        assert str(exc.__cause__) == "connect failed"
        assert exc.__traceback__ is not None, "the traceback's lines stay for the log"
