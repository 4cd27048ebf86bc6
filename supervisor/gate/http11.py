"""HTTP/1.1 for the gate: h11 parses and frames every message; this module adds the asyncio
transport (`Stream`), the gate's limits, what the gate refuses, and the header rewriting
a proxy must do (RFC 9110 §7.6, RFC 9112).

h11 (the sans-I/O HTTP/1.1 state machine under httpx) owns request and response parsing,
Content-Length and chunked framing, keep-alive and pipelining, for every request but the
plain ones the express lane serves (express.py, with httptools, to the same rules). On
top of what h11 refuses, the gate refuses (and closes the connection):
- a request with both Content-Length and Transfer-Encoding (400): a sign of smuggling;
- a transfer coding other than plain `chunked` (501, from h11);
- CONNECT (501) and targets in authority or asterisk form (400): the gate is no forward
  proxy; an absolute-form target is served by its path, like an origin-form one;
- an HTTP version other than 1.0 and 1.1 (505);
- a head over `Limits.head_bytes` (431).
Header values that h11 accepts contain no CR, LF or NUL, and whatever goes upstream is
written by h11 afresh, so the upstream reads exactly the requests the gate read.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import h11

Headers = list[tuple[bytes, bytes]]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Framing and Host are written for the upstream; Expect is answered by the gate.
REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# The response's framing is written afresh from what h11 read.
RESPONSE_DROP = _HOP_BY_HOP | {b"content-length"}


def _default_max_clients() -> int:
    """At most 1024 client connections, and fewer when the descriptor limit is low: each
    client may hold an upstream connection too, and the process needs a few of its own."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - 64) // 2))


@dataclass(frozen=True)
class Limits:
    """Every bound the gate keeps (docs/gate.md, "Limits")."""

    max_clients: int = field(default_factory=_default_max_clients)
    head_bytes: int = 64 * 1024  # request line plus headers (431 beyond)
    load_body_bytes: int = 64 * 1024**2  # one load request's body, read whole (413 beyond)
    load_bodies_total_bytes: int = 256 * 1024**2  # all load bodies held at once (503 beyond)
    json_values: int = 500_000  # commas, objects and arrays in a load body (413 beyond)
    buffer_bytes: int = 256 * 1024  # unread bytes held per connection before it is paused
    idle_client_s: float = 300.0  # a keep-alive connection with no request is closed
    head_timeout_s: float = 30.0  # a request head must arrive whole within this
    body_idle_s: float = 60.0  # the longest wait for the next piece of a request body
    send_timeout_s: float = 60.0  # the longest a client may leave the answer unread
    upstream_idle_s: float | None = None  # the longest wait for the upstream's next bytes
    max_idle_upstream: int = 32  # idle keep-alive connections kept per upstream


class Refused(Exception):
    """A request the gate answers itself with an error; the connection is then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def quoted(value: str | bytes, limit: int = 120) -> str:
    """A client-supplied string fit for a log line: repr-quoted (no raw control
    characters) and at most about `limit` characters."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if len(value) > limit:
        return repr(value[:limit]) + f"...({len(value)} chars)"
    return repr(value)


# ----------------------------------------------------------------------------- transport


class Stream(asyncio.Protocol):
    """One TCP connection: bytes in through a bounded buffer (reading pauses beyond
    `limit`), bytes out with flow control, and `on_lost` when the peer closes or breaks
    it. An idle stream (a pooled upstream connection) that receives anything is aborted:
    bytes nobody asked for must never become somebody's answer."""

    def __init__(self, limit: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_lost: Callable[[], None] | None = None
        # Bytes go to `on_data` first while it is set and nothing is buffered; it returns
        # whether it took them (the express lane, express.py).
        self.on_data: Callable[[bytes], bool] | None = None
        # Told when writing pauses (False) and resumes (True).
        self.on_writable: Callable[[bool], None] | None = None
        # While set, bytes (and the end) are buffered without waking the reader: the
        # express lane is answering a request, and what follows waits for it.
        self.hold = False
        # When the express lane last served a request (loop time): the reader's idle limit
        # counts from then.
        self.touched_at: float | None = None
        self.is_idle = False
        self.is_eof = False
        self.is_lost = False
        self._limit = limit
        self._buffer = bytearray()
        self._is_reading_paused = False
        self._is_writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._is_timed_out = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s: float | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance() check: uvloop's transports have the asyncio.Transport methods
        # but do not derive from it (the check failed every connection under uvloop).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.is_idle:
            self.abort()
            return
        if self.on_data is not None and not self._buffer and self.on_data(data):
            return
        self._buffer += data
        if len(self._buffer) >= self._limit and not self._is_reading_paused:
            self._is_reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.is_eof = True
        self._wake_reader()
        if not self._buffer and self.on_lost is not None:
            self.on_lost()  # a half-close with nothing pending: the client is gone
        return True  # keep the write side open: pipelined requests still get answers

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_eof = self.is_lost = True
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self._is_writing_paused = True
        if self.on_writable is not None:
            self.on_writable(False)

    def resume_writing(self) -> None:
        self._is_writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_writable is not None:
            self.on_writable(True)

    # for the gate

    @property
    def is_writing_paused(self) -> bool:
        return self._is_writing_paused

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def read(self, timeout_s: float | None = None) -> bytes:
        """Every byte received so far (waits for some); b"" once the peer has closed.
        TimeoutError when nothing arrives within `timeout_s` (None: no limit). The limit is
        one timer handle on the loop, not an asyncio.timeout() scope: the gate reads with
        a limit on every request, and the scope's task bookkeeping costs more."""
        if not self._buffer and not self.is_eof:
            loop = asyncio.get_running_loop()
            self._timeout_s = timeout_s
            self.touched_at = None
            if timeout_s is not None:
                self._timer = loop.call_later(timeout_s, self._time_out)
            self._is_timed_out = False
            try:
                while not self._buffer and not self.is_eof:
                    if self._is_timed_out:
                        raise TimeoutError
                    self._read_waiter = loop.create_future()
                    try:
                        await self._read_waiter
                    finally:
                        self._read_waiter = None
            finally:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._is_reading_paused and not self.is_lost:
            self._is_reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.is_lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.is_lost:
            raise ConnectionResetError("connection lost")
        if self._is_writing_paused:
            if self._drain_waiter is None:
                self._drain_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain_waiter)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _time_out(self) -> None:
        self._timer = None
        limit, touched_at = self._timeout_s, self.touched_at
        if limit is not None and (self.hold or touched_at is not None):
            # The express lane served this connection meanwhile (or serves it now): it was
            # not idle, so the limit counts from its last request's end.
            loop = asyncio.get_running_loop()
            left = limit if self.hold or touched_at is None else touched_at + limit - loop.time()
            if left > 0:
                self._timer = loop.call_later(left, self._time_out)
                return
        self._is_timed_out = True
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def wake(self) -> None:
        """Wake the reader (after `hold`)."""
        self._wake_reader()

    def give_back(self, data: bytes) -> None:
        """Put `data` before whatever is buffered (a request the express lane returns)."""
        self._buffer[:0] = data

    def _wake_reader(self) -> None:
        if self.hold:
            return
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def next_event(
    conn: h11.Connection, stream: Stream, timeout_s: float | None
) -> h11.Event | None:
    """The next h11 event, reading as needed (None: h11 paused, waiting for the other side
    of an upgrade); TimeoutError when no byte arrives for `timeout_s` (None: no limit);
    h11.RemoteProtocolError on a broken message."""
    while True:
        event = conn.next_event()
        if event is h11.PAUSED:
            return None
        if event is not h11.NEED_DATA:
            assert isinstance(event, h11.Event)
            return event
        conn.receive_data(await read_within(stream, timeout_s))


async def read_within(stream: Stream, timeout_s: float | None) -> bytes:
    """stream.read(); TimeoutError after `timeout_s` (None: no limit)."""
    return await stream.read(timeout_s)


# ----------------------------------------------------------------------------- messages


# A message's header fields as (lower-case name, name as sent, value), read once: h11's
# Headers is a Sequence whose iteration costs a call per field.
Fields = list[tuple[bytes, bytes, bytes]]


def fields_of(headers: h11._headers.Headers) -> Fields:
    return [(name.lower(), name, value) for name, value in headers.raw_items()]


def has_both_framings(fields: Fields) -> bool:
    """Content-Length next to Transfer-Encoding."""
    names = {low for low, _, _ in fields}
    return b"content-length" in names and b"transfer-encoding" in names


def connection_tokens(fields: Fields) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for low, _, value in fields:
        if low == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def header_value(fields: Fields, wanted: bytes) -> bytes | None:
    """The first value of header `wanted` (lower case), or None."""
    for low, _, value in fields:
        if low == wanted:
            return value
    return None


def request_path(req: h11.Request) -> bytes:
    """The target to forward (origin form: path and query); Refused for the forms the
    gate does not serve."""
    target = req.target
    if req.method == b"CONNECT":
        raise Refused(501, "CONNECT is not supported: the gate is not a forward proxy")
    if target.startswith(b"/"):
        return target
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        # Absolute form (RFC 9112 §3.2.2): served by its path; the authority is ignored
        # and Host is the upstream's as always.
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash < 0 or (0 <= query < slash):
            return b"/" + (rest[query:] if query >= 0 else b"")
        return rest[slash:]
    raise Refused(400, "only origin-form and absolute-form request targets are accepted")


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def raw_error(status: int, message: str, *, close: bool = True) -> bytes:
    """An error answer written without h11: for a request h11 could not parse (the
    connection is closed after it), or one the express lane read (`close` False)."""
    body = error_body(message)
    fields = b"".join(
        name + b": " + value + b"\r\n" for name, value in error_headers(body, close=close)
    )
    head = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
    return head + fields + b"\r\n" + body


def error_headers(body: bytes, *, close: bool) -> Headers:
    headers = [
        (b"Content-Type", b"application/json; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return headers


def status_hint(exc: h11.ProtocolError) -> int:
    """The status h11 suggests for a request it refused (400, 431, 501)."""
    status = exc.error_status_hint
    return status if 400 <= status < 600 else 400
