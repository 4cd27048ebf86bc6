"""The HTTP plumbing both fake services share: a threaded server and a request wrapper.

Stdlib only (`http.server`), so the sim runs in a bare container. HTTP/1.1 with keep-alive;
streamed answers use chunked transfer encoding and are flushed chunk by chunk, as Go's and
aiohttp's servers do. Each request runs in its own daemon thread, so a slow generation never
blocks `/api/ps` or `/queue`.

Policy: handlers never raise to the client as a traceback; an unexpected exception answers
500. Access logs are off unless `verbose` is set (tests and benchmarks stay quiet).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class ClientGone(Exception):
    """The client closed its connection (write failed, or EOF seen while we waited)."""


class BadJson(Exception):
    """The request body is not valid JSON."""


Route = Callable[["Exchange"], None]
Router = Callable[[str, str], Route | None]


class Exchange:
    """One request and its answer; a thin, typed face over BaseHTTPRequestHandler."""

    def __init__(self, handler: _Handler, method: str) -> None:
        self._h = handler
        self.method = method
        parts = urlsplit(handler.path)
        self.path = parts.path
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.headers = handler.headers
        self.body = handler.read_body()
        self.answered = False
        self._streaming = False

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadJson(str(exc)) from exc

    def send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.answered = True
        self._h.send_response(status)
        self._h.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self._h.send_header(name, value)
        self._h.send_header("Content-Length", str(len(body)))
        self._h.end_headers()
        if self.method != "HEAD" and body:
            self._write(body)

    def send_json(self, status: int, obj: Any) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def send_text(self, status: int, text: str) -> None:
        self.send(status, text.encode(), "text/plain; charset=utf-8")

    def send_empty(self, status: int = 200) -> None:
        self.answered = True
        self._h.send_response(status)
        self._h.send_header("Content-Length", "0")
        self._h.end_headers()

    def start_stream(self, content_type: str, status: int = 200) -> None:
        self.answered = True
        self._streaming = True
        self._h.send_response(status)
        self._h.send_header("Content-Type", content_type)
        self._h.send_header("Transfer-Encoding", "chunked")
        self._h.send_header("Cache-Control", "no-cache")
        self._h.end_headers()

    def write_chunk(self, data: bytes) -> None:
        if data:
            self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        if self._streaming:
            self._streaming = False
            self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        try:
            self._h.wfile.write(data)
            self._h.wfile.flush()
        except OSError as exc:
            self._h.close_connection = True
            raise ClientGone(str(exc)) from exc

    def switch_protocols(self, headers: dict[str, str]) -> tuple[Any, Any, socket.socket]:
        """Answer 101 Switching Protocols and hand the connection over: (rfile, wfile,
        socket). The connection closes when the route returns."""
        self.answered = True
        self._h.send_response(101)
        for name, value in headers.items():
            self._h.send_header(name, value)
        self._h.end_headers()
        self._h.wfile.flush()
        self._h.close_connection = True
        return self._h.rfile, self._h.wfile, self._h.connection

    def client_gone(self) -> bool:
        """True once the client has closed its side (EOF waiting on the socket)."""
        sock: socket.socket = self._h.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Ollama (Go net/http) and ComfyUI (aiohttp) send with TCP_NODELAY; without it every
    # answer (headers, then body) waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: SimServer

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        ex = Exchange(self, method)
        route = self.server.router(method, ex.path)
        try:
            if route is None:
                self.server.not_found(ex)
            else:
                route(ex)
        except ClientGone:
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a sim bug: answer 500, say so
            print(f"sim: {method} {ex.path} failed: {exc!r}", file=sys.stderr)
            if not ex.answered:
                ex.send_text(500, "500 Internal Server Error\n\nServer got itself in trouble")
            else:
                self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def _plain_not_found(ex: Exchange) -> None:
    ex.send_text(404, "404 page not found")


class SimServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to `host:port` (port 0 picks a free one)."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        router: Router,
        *,
        server_name: str,
        not_found: Route = _plain_not_found,
        verbose: bool = False,
    ) -> None:
        self.router = router
        self.not_found = not_found
        self.verbose = verbose
        self.server_name_header = server_name
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"sim-http-{self.server_name_header}",
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()
