"""The supervisor's own small HTTP endpoint: /healthz, /status, /metrics and the status
page (`/` and `/ui`, the packaged file supervisor/ui/index.html, which polls /status).

A stdlib threaded server (a thread per connection, daemon threads) so a slow scraper can
never block the loop, with bounds: at most `max_connections` connections are served at
once; a request's head must arrive whole within `timeout_s` of the connection (a client
trickling bytes is dropped then, not kept for ever), and each later read or write times
out after `timeout_s` of silence. When every slot is taken, RESERVED_HEALTH more
connections are read (with a head deadline of at most HEALTH_HEAD_S) and answered only
for /healthz, so slow clients cannot make Docker's healthcheck fail; beyond those a
connection gets an immediate 503 without a thread. A client that leaves early is a
debug line, not a traceback.
It only reads: health and status come from callables the daemon provides, metrics from
the registry passed in. Binding fails loudly (OSError) at
construction, so the CLI can exit 3 when the port is taken.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Health = Callable[[], tuple[bool, dict[str, Any]]]
Snapshot = Callable[[], dict[str, Any]]


MAX_CONNECTIONS = 16
TIMEOUT_S = 10.0
# Connections beyond MAX_CONNECTIONS kept for /healthz, and their head deadline.
RESERVED_HEALTH = 2
HEALTH_HEAD_S = 2.0
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 29\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    b'{"error": "too many clients"}'
)
_BUSY_BODY = b'{"error": "too many clients"}'
_CLIENT_LEFT = (ConnectionError, TimeoutError)


def _answer_busy(request: socket.socket) -> None:
    with contextlib.suppress(OSError):  # busy: answered at once, no thread
        request.settimeout(1.0)
        request.sendall(_BUSY)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        health: Health,
        snapshot: Snapshot,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.health = health
        self.snapshot = snapshot
        self.registry = registry
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._health_slots = threading.BoundedSemaphore(RESERVED_HEALTH)
        self.conn = threading.local()  # per connection thread: is it on a /healthz slot?
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        slots, health_only = self._slots, False
        if not slots.acquire(blocking=False):
            slots, health_only = self._health_slots, True
            if not slots.acquire(blocking=False):
                _answer_busy(request)
                self.shutdown_request(request)
                return
        try:
            threading.Thread(
                target=self._serve,
                args=(request, client_address, slots, health_only),
                daemon=True,
            ).start()
        except BaseException:
            slots.release()
            self.shutdown_request(request)
            raise

    def _serve(
        self,
        request: Any,
        client_address: Any,
        slots: threading.BoundedSemaphore,
        health_only: bool,
    ) -> None:
        self.conn.health_only = health_only
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver: the thread logs, ends
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_LEFT):
            logger.debug(f"HTTP client {client_address} left early: {exc!r}")
        else:
            logger.opt(exception=exc).error(f"HTTP request from {client_address} failed: {exc!r}")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "vram-supervisor"

    def setup(self) -> None:
        super().setup()
        self.health_only = bool(getattr(self.server.conn, "health_only", False))
        timeout_s = self.server.timeout_s
        head_s = min(timeout_s, HEALTH_HEAD_S) if self.health_only else timeout_s
        self.connection.settimeout(timeout_s)
        # The whole head within head_s, however the bytes trickle in (a read timeout alone
        # restarts with every byte).
        self._head_deadline = threading.Timer(head_s, self._drop)
        self._head_deadline.daemon = True
        self._head_deadline.start()

    def _drop(self) -> None:
        logger.debug(f"HTTP {self.address_string()}: no whole request head in time, dropped")
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the header lines
        self._head_deadline.cancel()  # the head is in
        return ok

    def finish(self) -> None:
        self._head_deadline.cancel()
        super().finish()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if self.health_only and path != "/healthz":
                self.close_connection = True
                self._send(503, _BUSY_BODY, "application/json")
            elif path == "/healthz":
                ok, body = self.server.health()
                self._send(200 if ok else 503, _json(body), "application/json")
            elif path == "/status":
                self._send(200, _json(self.server.snapshot()), "application/json")
            elif path == "/metrics":
                self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif path in ("/", "/ui"):
                self._send(200, status_page(), "text/html; charset=utf-8")
            else:
                self._send(404, _json({"error": "not found", "paths": PATHS}), "application/json")
        except _CLIENT_LEFT as exc:
            logger.debug(f"HTTP {path}: the client left early ({exc!r})")
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug: answer 500, keep serving
            logger.opt(exception=exc).error(f"HTTP {path} failed: {exc}")
            with contextlib.suppress(*_CLIENT_LEFT):
                self._send(500, _json({"error": str(exc)}), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(f"HTTP {self.address_string()} {format % args}")


PATHS = ["/", "/ui", "/healthz", "/status", "/metrics"]


@functools.cache
def status_page() -> bytes:
    """The self-contained status page (no external resources), read once."""
    return resources.files("supervisor").joinpath("ui/index.html").read_bytes()


def _json(data: Any) -> bytes:
    return (json.dumps(data, default=str, indent=None) + "\n").encode()


class StatusServer:
    """Serves /healthz, /status and /metrics on host:port (port 0: an ephemeral one)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        health: Health,
        snapshot: Snapshot,
        registry: CollectorRegistry,
        max_connections: int = MAX_CONNECTIONS,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._server = _Server(
            (host, port),
            health,
            snapshot,
            registry,
            max_connections=max_connections,
            timeout_s=timeout_s,
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=2)
        self._server.server_close()
