"""Raw sockets for the adversarial gate tests: a scripted upstream that parses requests as
a strict HTTP/1.1 server would (h11, which splits lines on a bare LF like Go's net/http)
and answers whatever bytes a test scripts, and a raw client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h11


@dataclass
class Seen:
    """One request the upstream parsed."""

    conn: int  # which upstream connection (0, 1, ...)
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


# A script gets the request and its connection's socket; it returns the bytes to send
# (None: close the connection without answering).
Script = Callable[[Seen, socket.socket], bytes | None]


def ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class RawUpstream:
    script: Script = field(default=lambda seen, sock: ok(b"answer to " + seen.target))
    seen: list[Seen] = field(default_factory=list)
    garbage: list[bytes] = field(default_factory=list)  # what could not be parsed
    closed_by_peer: list[int] = field(default_factory=list)  # connections the gate closed
    connections: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for sock in list(self._socks):
            sock.close()

    def requests_to(self, target: bytes) -> list[Seen]:
        return [s for s in self.seen if s.target == target]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                index = self.connections
                self.connections += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = sock.recv(65536)
                        if not data:
                            self.closed_by_peer.append(index)
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        req = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                assert req is not None
                seen = Seen(index, req.method, req.target, list(req.headers.raw_items()), body)
                self.seen.append(seen)
                answer = self.script(seen, sock)
                if answer is None:
                    return
                sock.sendall(answer)
                # Parse our own scripted answer no further: start a fresh state machine
                # so a scripted misbehaviour never stops this side from reading on.
                leftover = conn.trailing_data[0]
                conn = h11.Connection(h11.SERVER)
                if leftover:
                    conn.receive_data(leftover)
        except h11.RemoteProtocolError:
            self.garbage.append(conn.trailing_data[0])
        except OSError:
            pass
        finally:
            sock.close()


def exchange(port: int, data: bytes, *, timeout: float = 10.0, wait_close: bool = True) -> bytes:
    """Send `data` to 127.0.0.1:port on a fresh connection; everything received until the
    peer closes (or, with wait_close False, until nothing arrives for 0.5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock, wait_close=wait_close, timeout=timeout)


def read_all(sock: socket.socket, *, wait_close: bool = True, timeout: float = 10.0) -> bytes:
    out = b""
    sock.settimeout(timeout if wait_close else 0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if wait_close:
                raise
            return out
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk
    return out


def responses(data: bytes, method: bytes = b"GET") -> list[tuple[int, bytes]]:
    """The (status, body) of every final response in `data`, parsed strictly."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    is_closed = False
    out: list[tuple[int, bytes]] = []
    status, body = 0, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if status:
                out.append((status, body + b"<truncated>"))
            return out
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
            status, body = 0, b""
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return out
            conn.start_next_cycle()
            conn.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
            conn.send(h11.EndOfMessage())
        elif event is h11.NEED_DATA and not is_closed:
            conn.receive_data(b"")  # all of `data` is read: the rest is the close
            is_closed = True
        else:
            if status and event is h11.NEED_DATA:
                out.append((status, body + b"<truncated>"))
            return out
