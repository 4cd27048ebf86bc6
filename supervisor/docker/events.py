"""Follows the Docker events stream in a background thread (`ports.EventSource`).

Each relevant container event (start, die, stop, destroy, rename, health_status, oom,
restart of a container labelled `vram-supervisor.role`) calls `on_event("<Action> <name>")`,
e.g. "start ollama" or "health_status: healthy comfyui". The daemon treats any call as
"something changed: re-list everything" (as traefik does), so no event payload is trusted
beyond the name for the log.

Reconnect policy:
- The SDK's events iterator ENDS SILENTLY when the daemon stops or restarts or the
  connection drops (api-facts gotcha 12), and building a client fails while the daemon is
  down (gotcha 21). So the thread loops forever: build a client and open the stream inside
  a tenacity retry with capped exponential backoff (0.5 s doubling to 10 s by default;
  `wait` is injectable), sleeping on the shutdown event so `stop()` interrupts any wait.
- The backoff starts over after a stream that was useful (it delivered an event or lasted
  `healthy_after_s`); a stream that ends at once counts as a failed attempt, so a daemon or
  proxy that keeps closing the stream is not hammered.
- After every (re)connect `on_event("resync")` is called: events missed while disconnected
  are never replayed (the daemon keeps only 256 in memory, none across its restart), so the
  caller re-lists all containers instead.
- `reconnects` counts connections after the first, `events_seen` the events delivered,
  `connected` tells whether a stream is open (for /metrics and /healthz).
- Logs "Docker events stream ended; reconnecting" (WARNING) and "Reconnected to Docker
  events" (INFO) once per transition; single failed attempts go to DEBUG.
- `stop()` sets the shutdown event and closes the open stream from the calling thread
  (CancellableStream.close), so the thread ends within about a second. It never raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import docker
from loguru import logger
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_when_event_set
from tenacity.wait import WaitBaseT, wait_exponential

from supervisor.docker.discovery import ClientFactory, default_client_factory, release_failure
from supervisor.labels import ROLE

# Actions that can change what the supervisor should do. `health_status` matches both
# "health_status: healthy" and "...: unhealthy" (the daemon's filter is a prefix match).
EVENT_ACTIONS: tuple[str, ...] = (
    "start",
    "die",
    "stop",
    "destroy",
    "rename",
    "health_status",
    "oom",
    "restart",
)
EVENT_FILTERS: Mapping[str, list[str]] = {
    "type": ["container"],
    "label": [ROLE.key],
    "event": list(EVENT_ACTIONS),
}
RESYNC = "resync"


def default_wait() -> WaitBaseT:
    return wait_exponential(multiplier=0.5, max=10)


class _Stream(Protocol):
    """What the SDK's CancellableStream offers (and test fakes imitate)."""

    def __iter__(self) -> Iterator[Any]: ...
    def close(self) -> None: ...


class _StreamEnded(Exception):
    """The stream ended before it was useful: retry with backoff."""


class DockerEvents:
    """`ports.EventSource` on the docker SDK's events stream."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        client_factory: ClientFactory | None = None,
        wait: WaitBaseT | None = None,
        healthy_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = client_factory or default_client_factory(base_url, timeout_s)
        self._wait = wait if wait is not None else default_wait()
        self._healthy_after_s = healthy_after_s
        self._clock = clock
        self._shutdown = threading.Event()
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._client: docker.DockerClient | None = None
        self._thread: threading.Thread | None = None
        self._on_event: Callable[[str], None] = lambda _: None
        self._ever_connected = False
        self._outage_logged = False
        self.reconnects = 0
        self.events_seen = 0
        self.connected = False

    # ------------------------------------------------------------------ EventSource

    def start(self, on_event: Callable[[str], None]) -> None:
        """Starts the background thread (once). `on_event` runs on that thread."""
        if self._thread is not None:
            raise RuntimeError("DockerEvents.start() called twice")
        self._on_event = on_event
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the thread: sets the shutdown event, closes the open stream, joins."""
        with self._lock:
            self._shutdown.set()
            stream = self._stream
        if stream is not None:
            self._close_stream(stream)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._shutdown.is_set():
            retrying = Retrying(
                wait=self._wait,
                stop=stop_when_event_set(self._shutdown),
                sleep=self._sleep,
                retry=retry_if_exception_type(Exception),
                before_sleep=self._before_sleep,
            )
            try:
                retrying(self._follow_once)
            except RetryError:
                break  # shutdown was requested while waiting to retry
        self._drop_client()

    def _sleep(self, seconds: float) -> None:
        self._shutdown.wait(seconds)

    def _before_sleep(self, state: Any) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        logger.debug(
            "Docker events: attempt {} failed ({}); next try in {:.1f} s",
            state.attempt_number,
            exc,
            state.upcoming_sleep,
        )

    def _follow_once(self) -> None:
        """One connection: build the client, open the stream, resync, read until it ends.

        Returns normally after a useful stream (or on shutdown) so the caller starts a
        fresh backoff; raises to make tenacity wait before the next attempt."""
        if self._shutdown.is_set():
            return
        self._drop_client()
        try:
            client = self._factory()
            self._client = client
            stream: _Stream = client.events(decode=True, filters=dict(EVENT_FILTERS))
        except Exception as exc:
            self._note_outage(exc)
            release_failure(exc)  # the failed connect's socket, closed now (see there)
            raise
        with self._lock:
            if self._shutdown.is_set():
                self._close_stream(stream)
                return
            self._stream = stream
        self._note_connected()
        self._deliver(RESYNC)
        started = self._clock()
        seen_before = self.events_seen
        try:
            for event in stream:
                self._handle(event)
        except Exception as exc:  # noqa: BLE001 - any break (StreamParseError ...) ends it
            logger.debug("Docker events stream broke: {}", exc)
            release_failure(exc)
        finally:
            with self._lock:
                self._stream = None
            self.connected = False
            self._close_stream(stream)
        if self._shutdown.is_set():
            return
        self._note_outage(None)
        useful = self.events_seen > seen_before or (
            self._clock() - started >= self._healthy_after_s
        )
        if not useful:
            raise _StreamEnded("the Docker events stream ended at once")

    def _handle(self, event: Any) -> None:
        if not isinstance(event, Mapping) or event.get("Type", "container") != "container":
            return
        action = str(event.get("Action") or "")
        if not action:
            return
        actor = event.get("Actor")
        actor = actor if isinstance(actor, Mapping) else {}
        attributes = actor.get("Attributes")
        attributes = attributes if isinstance(attributes, Mapping) else {}
        name = str(attributes.get("name") or str(actor.get("ID") or "?")[:12])
        self.events_seen += 1
        self._deliver(f"{action} {name}")

    def _deliver(self, message: str) -> None:
        try:
            self._on_event(message)
        except Exception:  # noqa: BLE001 - a handler bug must not end the thread
            logger.exception("Docker event handler failed on {!r}", message)

    def _note_connected(self) -> None:
        self.connected = True
        if self._ever_connected:
            self.reconnects += 1
            if self._outage_logged:
                logger.info("Reconnected to Docker events")
        else:
            logger.info("Following Docker events")
        self._ever_connected = True
        self._outage_logged = False

    def _note_outage(self, exc: BaseException | None) -> None:
        """Logs the start of an outage once; later failed attempts only at DEBUG."""
        if self._outage_logged:
            return
        self._outage_logged = True
        if exc is None:
            logger.warning("Docker events stream ended; reconnecting")
        elif self._ever_connected:
            logger.warning("Docker events stream ended; reconnecting ({})", exc)
        else:
            logger.warning("Cannot follow Docker events yet ({}); retrying", exc)

    # ------------------------------------------------------------------ resources

    def _close_stream(self, stream: _Stream) -> None:
        try:
            stream.close()
        except Exception as exc:  # noqa: BLE001 - SSH transport, torn socket: all fine
            logger.debug("Closing the Docker events stream: {}", exc)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - a new client is built anyway
                logger.debug("Closing the Docker client of the events stream: {}", exc)
