"""DockerEvents against a fake events stream that behaves like docker-py's (api-facts 3.3):
it ends silently when the daemon goes away, and building a client fails while it is down."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any, cast

import docker.errors
import pytest
from loguru import logger
from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_fixed, wait_none

from supervisor.docker.events import EVENT_FILTERS, DockerEvents, default_wait

TIMEOUT = 5.0  # generous: only ever reached when something is broken
_END = object()


def event(action: str, name: str, **attributes: str) -> dict[str, Any]:
    """A container event as the engine sends it at API >= 1.52 (no legacy fields)."""
    return {
        "Type": "container",
        "Action": action,
        "Actor": {
            "ID": "f" * 64,
            "Attributes": {
                "vram-supervisor.role": "ollama",
                "image": "ollama/ollama:latest",
                "name": name,
                **attributes,
            },
        },
        "scope": "local",
        "time": 1761000000,
        "timeNano": 1761000000123456789,
    }


class FakeStream:
    """Like CancellableStream: blocks for the next event; ends with StopIteration."""

    def __init__(self) -> None:
        self._items: queue.Queue[Any] = queue.Queue()
        self.closed = False

    def push(self, *events: Any) -> None:
        for e in events:
            self._items.put(e)

    def end(self) -> None:
        """The daemon went away: the iterator just stops (gotcha 12)."""
        self._items.put(_END)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._items.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:  # from another thread: the reader ends
        self.closed = True
        self._items.put(_END)


class FakeDaemon:
    def __init__(self) -> None:
        self.up = True
        self.up_after_failures: int | None = None  # comes back after this many failed tries
        self.failures = 0
        self.attempted = threading.Event()
        self.opened: queue.Queue[FakeStream] = queue.Queue()
        self.filters: list[Any] = []

    def client_factory(self) -> FakeClient:
        self.attempted.set()
        if not self.up:
            self.failures += 1
            if self.up_after_failures is not None and self.failures >= self.up_after_failures:
                self.up = True
            raise docker.errors.DockerException(
                "Error while fetching server API version: ('Connection aborted.', "
                "FileNotFoundError(2, 'No such file or directory'))"
            )
        return FakeClient(self)

    def next_stream(self) -> FakeStream:
        return self.opened.get(timeout=TIMEOUT)


class FakeClient:
    def __init__(self, daemon: FakeDaemon) -> None:
        self._daemon = daemon
        self.closed = False

    def events(self, decode: bool | None = None, filters: Any = None) -> FakeStream:
        assert decode is True
        self._daemon.filters.append(filters)
        stream = FakeStream()
        self._daemon.opened.put(stream)
        return stream

    def close(self) -> None:
        self.closed = True


class Recorder:
    """The on_event callback: collects messages for the test thread to wait on."""

    def __init__(self) -> None:
        self.messages: queue.Queue[str] = queue.Queue()

    def __call__(self, message: str) -> None:
        self.messages.put(message)

    def next(self) -> str:
        return self.messages.get(timeout=TIMEOUT)


class RecordingWait(wait_base):
    """Records which attempt each backoff wait was for; waits not at all."""

    def __init__(self) -> None:
        self.attempts: list[int] = []

    def __call__(self, retry_state: RetryCallState) -> float:
        self.attempts.append(retry_state.attempt_number)
        return 0.0


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO"
    )
    yield lines
    logger.remove(sink)


@pytest.fixture
def running() -> Iterator[list[DockerEvents]]:
    """Stops every DockerEvents a test started, even when the test fails."""
    started: list[DockerEvents] = []
    yield started
    for source in started:
        source.stop()


def start(
    daemon: FakeDaemon, running: list[DockerEvents], **kwargs: Any
) -> tuple[DockerEvents, Recorder]:
    kwargs.setdefault("wait", wait_none())
    source = DockerEvents(client_factory=daemon.client_factory, **kwargs)
    recorder = Recorder()
    source.start(recorder)
    running.append(source)
    return source, recorder


def test_relevant_events_reach_the_callback_after_a_resync(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    source, got = start(daemon, running)
    stream = daemon.next_stream()
    assert got.next() == "resync"
    assert source.connected and source.reconnects == 0

    stream.push(
        event("start", "ollama"),
        event("health_status: healthy", "comfyui"),
        event("rename", "comfy-new", oldName="/comfy-old"),
        {"Type": "network", "Action": "connect", "Actor": {"ID": "n", "Attributes": {}}},
        event("die", "comfyui", exitCode="137", execDuration="3600"),
    )
    assert [got.next() for _ in range(4)] == [
        "start ollama",
        "health_status: healthy comfyui",
        "rename comfy-new",
        "die comfyui",
    ]
    assert source.events_seen == 4


def test_asks_only_for_labelled_container_events_that_matter(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    start(daemon, running)
    daemon.next_stream()
    assert daemon.filters == [
        {
            "type": ["container"],
            "label": ["vram-supervisor.role"],
            "event": [
                "start",
                "die",
                "stop",
                "destroy",
                "rename",
                "health_status",
                "oom",
                "restart",
            ],
        }
    ]
    assert daemon.filters[0] == dict(EVENT_FILTERS)


def test_silent_end_and_daemon_down_reconnect_with_resync_and_counters(
    daemon: FakeDaemon, running: list[DockerEvents], logs: list[tuple[str, str]]
) -> None:
    source, got = start(daemon, running)
    first = daemon.next_stream()
    assert got.next() == "resync"
    first.push(event("start", "ollama"))
    assert got.next() == "start ollama"

    daemon.up = False  # the daemon restarts: the stream just ends, clients cannot be built
    daemon.up_after_failures = 4
    first.end()

    second = daemon.next_stream()
    assert got.next() == "resync"  # the caller re-lists everything
    assert daemon.failures == 4
    assert source.reconnects == 1 and source.connected
    second.push(event("start", "comfyui"))
    assert got.next() == "start comfyui"
    assert source.events_seen == 2

    # One line per transition, not one per failed attempt.
    assert [m for lvl, m in logs if lvl == "WARNING"] == [
        "Docker events stream ended; reconnecting"
    ]
    assert [m for lvl, m in logs if lvl == "INFO"] == [
        "Following Docker events",
        "Reconnected to Docker events",
    ]


def test_starting_while_the_daemon_is_down_waits_for_it(
    daemon: FakeDaemon, running: list[DockerEvents], logs: list[tuple[str, str]]
) -> None:
    daemon.up = False
    daemon.up_after_failures = 3
    source, got = start(daemon, running)
    daemon.next_stream()
    assert got.next() == "resync"
    assert source.connected and source.reconnects == 0
    warnings = [m for lvl, m in logs if lvl == "WARNING"]
    assert len(warnings) == 1 and "Cannot follow Docker events yet" in warnings[0]


def test_backoff_grows_over_useless_streams_and_resets_after_a_useful_one(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    wait = RecordingWait()
    _, got = start(daemon, running, wait=wait)
    for _ in range(2):  # a proxy that closes the stream at once, twice
        daemon.next_stream().end()
        assert got.next() == "resync"
    useful = daemon.next_stream()
    useful.push(event("start", "ollama"))
    useful.end()
    assert got.next() == "resync"
    assert got.next() == "start ollama"
    daemon.next_stream().end()  # ends at once again
    assert got.next() == "resync"
    daemon.next_stream()
    assert wait.attempts == [1, 2, 1]


def test_a_long_quiet_stream_counts_as_useful(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    wait = RecordingWait()
    ticks = itertools.count(step=100.0)  # every reading of the clock is 100 s later
    _, got = start(daemon, running, wait=wait, clock=lambda: next(ticks))
    daemon.next_stream().end()
    assert got.next() == "resync"
    daemon.next_stream()
    assert got.next() == "resync"
    assert wait.attempts == []  # reconnected at once, no backoff


def test_a_broken_document_or_a_failing_callback_does_not_kill_the_thread(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    got = Recorder()

    def on_event(message: str) -> None:
        got(message)
        if message == "start bad":
            raise RuntimeError("handler bug")

    source = DockerEvents(client_factory=daemon.client_factory, wait=wait_none())
    running.append(source)
    source.start(on_event)
    stream = daemon.next_stream()
    stream.push(event("start", "bad"), docker.errors.StreamParseError("half a document"))
    assert [got.next() for _ in range(2)] == ["resync", "start bad"]
    second = daemon.next_stream()  # the parse error ended that stream; it reconnected
    assert got.next() == "resync"
    second.push(event("stop", "good"))
    assert got.next() == "stop good"
    assert source.is_alive and source.events_seen == 2


def test_a_client_or_stream_that_fails_to_close_is_logged_and_changes_nothing(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    """Closing is best effort: a stream that cannot be cancelled (the SDK raises
    DockerException on an SSH transport) or a client whose close() raises (anything)
    is said at DEBUG; the thread reconnects and stop() still ends it without raising."""
    debug: list[str] = []
    sink = logger.add(lambda m: debug.append(m.record["message"]), level="DEBUG")

    class StuckStream(FakeStream):
        def close(self) -> None:
            self._items.put(_END)  # the reader ends all the same, as the socket goes
            raise docker.errors.DockerException("Cancellable streams not supported")

    class StuckClient(FakeClient):
        def events(self, decode: bool | None = None, filters: Any = None) -> FakeStream:
            stream = StuckStream()
            daemon.opened.put(stream)
            return stream

        def close(self) -> None:
            raise RuntimeError("client close bug")

    source = DockerEvents(client_factory=lambda: StuckClient(daemon), wait=wait_none())
    running.append(source)
    got = Recorder()
    try:
        source.start(got)
        daemon.next_stream().end()
        assert got.next() == "resync"
        daemon.next_stream()
        assert got.next() == "resync"  # reconnected with a new client
        source.stop(timeout_s=TIMEOUT)
        assert not source.is_alive
    finally:
        logger.remove(sink)
    assert any("client close bug" in m for m in debug), debug
    assert any("Cancellable streams not supported" in m for m in debug), debug


def test_stop_closes_a_blocked_stream_and_ends_the_thread(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    source, got = start(daemon, running)
    stream = daemon.next_stream()
    assert got.next() == "resync"
    source.stop(timeout_s=TIMEOUT)
    assert stream.closed
    assert not source.is_alive
    assert not source.connected
    assert daemon.opened.empty()  # no reconnect after stop


def test_stop_interrupts_a_long_backoff_wait(
    daemon: FakeDaemon, running: list[DockerEvents]
) -> None:
    daemon.up = False
    source, _ = start(daemon, running, wait=wait_fixed(3600))
    assert daemon.attempted.wait(TIMEOUT)
    source.stop(timeout_s=TIMEOUT)
    assert not source.is_alive
    assert daemon.failures == 1


def test_stop_without_start_is_harmless() -> None:
    DockerEvents(client_factory=FakeDaemon().client_factory).stop()


def test_default_backoff_doubles_from_half_a_second_to_a_ten_second_cap() -> None:
    wait = default_wait()
    waits = [
        wait(cast(RetryCallState, type("S", (), {"attempt_number": n})())) for n in range(1, 8)
    ]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
