"""Relaying one request to the upstream and its answer back, as it arrives.

Policy:
- Bodies are relayed as they arrive. A request body is read whole only when the gate must
  look inside it (load endpoints) or when it has already arrived whole with its head.
- Each piece of the answer's body is written to the client as soon as it arrives (an
  NDJSON or SSE stream token by token). h11 frames both sides: chunked stays chunked for
  an HTTP/1.1 client, an HTTP/1.0 client gets the body delimited by closing.
- Hop-by-hop headers (and those the Connection header names) are dropped both ways.
  `Host` is the upstream's, because Ollama listening on loopback rejects foreign Host
  headers. Framing headers are written from what h11 parsed, never copied.
- Upstream connections are kept alive in a pool, but only when the answer ended exactly
  where its framing said and nothing else arrived: an answer longer than its
  Content-Length, a body on a 204/304/HEAD answer or bytes after the last chunk close the
  connection, and a pooled connection that receives anything is closed at once.
- A request that fails on a reused connection before any byte of the answer arrives is
  sent once more on a fresh one only when it is idempotent (RFC 9110 §9.2.2) and its body
  was buffered: a POST is never sent twice.
- An answer with both Content-Length and Transfer-Encoding is refused (502).
- Connecting has a timeout; waiting for the upstream's bytes has `Limits.upstream_idle_s`
  (none by default: a model load can take minutes, and a non-streamed answer comes only
  when it is complete). A client that leaves closes the upstream connection, which makes
  Ollama cancel the request (api-facts gotcha 4).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from supervisor.gate.http11 import (
    REQUEST_DROP,
    RESPONSE_DROP,
    Fields,
    Headers,
    Limits,
    Refused,
    Stream,
    connection_tokens,
    fields_of,
    has_both_framings,
    next_event,
    read_within,
    status_hint,
)

_VCHARS = re.compile(rb"[\x21-\x7e]+")
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class UpstreamError(Exception):
    """The upstream could not be reached or broke. `is_answered`: part of its answer had
    already gone to the client (which then can only be disconnected)."""

    def __init__(self, message: str, *, is_answered: bool = False) -> None:
        super().__init__(message)
        self.is_answered = is_answered


class ClientGone(Exception):
    """The client closed, broke, or stopped reading its answer."""


@dataclass(frozen=True)
class Origin:
    """Where requests go: parsed once per distinct upstream URL."""

    url: str
    host: str
    port: int
    is_tls: bool
    host_header: bytes
    base_path: bytes  # a path prefix of the upstream URL, without trailing slash

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        is_tls = parts.scheme == "https"
        host_header = parts.netloc.rpartition("@")[2].encode("idna")
        base_path = parts.path.rstrip("/").encode()
        # Checked once here, so requests can skip h11's checks of what it parsed itself.
        if not _VCHARS.fullmatch(host_header) or not _VCHARS.fullmatch(base_path or b"/"):
            raise ValueError(f"not a usable host or path in {url!r}")
        return cls(
            url=url,
            host=parts.hostname,
            port=parts.port or (443 if is_tls else 80),
            is_tls=is_tls,
            host_header=host_header,
            base_path=base_path,
        )


@dataclass(eq=False)
class Connection:
    origin: Origin
    stream: Stream
    http: h11.Connection
    is_reused: bool = False

    def close(self) -> None:
        self.stream.close()


@dataclass
class Pool:
    """Idle keep-alive connections per origin (LIFO: the warmest first)."""

    limits: Limits = field(default_factory=Limits)
    connect_timeout_s: float = 10.0
    _idle: dict[Origin, list[Connection]] = field(default_factory=dict)

    def has_idle(self, origin: Origin) -> bool:
        return bool(self._idle.get(origin))

    def take_idle(self, origin: Origin) -> Connection | None:
        """An idle keep-alive connection to `origin`, the warmest; None when none is."""
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.stream.is_eof or conn.stream.buffered:
                conn.close()
                continue
            conn.stream.is_idle = False
            conn.stream.on_lost = None
            conn.is_reused = True
            return conn
        return None

    async def get(self, origin: Origin, *, is_fresh: bool = False) -> Connection:
        if not is_fresh:
            conn = self.take_idle(origin)
            if conn is not None:
                return conn
        loop = asyncio.get_running_loop()
        limit = self.limits.buffer_bytes
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _transport, stream = await loop.create_connection(
                    lambda: Stream(limit),
                    origin.host,
                    origin.port,
                    ssl=ssl.create_default_context() if origin.is_tls else None,
                )
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise UpstreamError(f"cannot connect to {origin.url}: {reason}") from exc
        http = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.limits.head_bytes)
        return Connection(origin, stream, http)

    def put(self, conn: Connection) -> None:
        """Keep `conn` for the next request when its last exchange ended cleanly."""
        up = conn.http
        is_clean = (
            up.our_state is h11.DONE and up.their_state is h11.DONE and not up.trailing_data[0]
        )
        if is_clean:
            up.start_next_cycle()
        self.keep(conn, is_clean=is_clean)

    def keep(self, conn: Connection, *, is_clean: bool = True) -> None:
        """Keep `conn`, whose exchange ended cleanly (the express lane's judgement, or
        `put`'s), unless the pool is full or it received or lost anything since."""
        stream = conn.stream
        idle = self._idle.setdefault(conn.origin, [])
        if (
            not is_clean
            or stream.is_eof
            or stream.buffered
            or len(idle) >= self.limits.max_idle_upstream
        ):
            conn.close()
            return
        stream.is_idle = True

        def lost() -> None:
            # The upstream closed an idle connection: close ours now, not when the GC
            # breaks the transport/protocol cycle (till then a socket in CLOSE_WAIT).
            with_conn = self._idle.get(conn.origin)
            if with_conn is not None and conn in with_conn:
                with_conn.remove(conn)
                conn.close()

        stream.on_lost = lost
        idle.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _upstream_request(ex: Exchange, origin: Origin, body: bytes | None) -> h11.Request:
    headers: Headers = [(b"Host", origin.host_header)]
    tokens = connection_tokens(ex.fields)
    length: bytes | None = None
    is_chunked = False
    for low, name, value in ex.fields:
        if low == b"content-length":
            length = value
        elif low == b"transfer-encoding":
            is_chunked = True
        elif low not in REQUEST_DROP and low not in tokens:
            headers.append((name, value))
    if body is not None:
        if body or length is not None or is_chunked:
            headers.append((b"Content-Length", b"%d" % len(body)))
    elif is_chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        headers.append((b"Content-Length", length or b"0"))
    # _parsed: every name and value is one h11 parsed (or Origin.parse checked), so h11
    # need not validate them again on the way out (a measurable share of the gate's cost).
    return h11.Request(
        method=ex.req.method, target=origin.base_path + ex.path, headers=headers, _parsed=True
    )


def _client_response(resp: h11.Response, fields: Fields, method: bytes) -> h11.Response:
    headers: Headers = []
    tokens = connection_tokens(fields)
    length: bytes | None = None
    is_chunked = False
    for low, name, value in fields:
        if low == b"content-length":
            length = value
        elif low == b"transfer-encoding":
            is_chunked = True
        elif low not in RESPONSE_DROP and low not in tokens:
            headers.append((name, value))
    has_body = method != b"HEAD" and resp.status_code not in (204, 304)
    if is_chunked:
        if has_body:
            headers.append((b"Transfer-Encoding", b"chunked"))
    elif length is not None and resp.status_code != 204:
        headers.append((b"Content-Length", length))  # a HEAD or 304 answer's says the size
    # No framing header: h11 chunks it for an HTTP/1.1 client, closes for HTTP/1.0.
    return h11.Response(
        status_code=resp.status_code, headers=headers, reason=resp.reason, _parsed=True
    )


class Exchange:
    """One request on its way to the upstream: the client side's h11 connection and
    stream, what the gate read of the request, and the limits."""

    def __init__(
        self,
        *,
        client: h11.Connection,
        stream: Stream,
        req: h11.Request,
        path: bytes,
        fields: Fields,
        limits: Limits,
    ) -> None:
        self.client = client
        self.stream = stream
        self.req = req
        self.fields = fields
        self.path = path
        self.limits = limits
        self.pending: list[bytes] = []  # body pieces read from h11 before streaming began
        self._out: list[bytes] = []

    def queue(self, event: h11.Event) -> None:
        """Frame an event for the client; it is written at the next flush()."""
        data = self.client.send(event)
        if data:
            self._out.append(data)

    async def flush(self) -> None:
        """Write what is queued (one write for a head and a body that came together);
        ClientGone when the client is gone or reads nothing for `send_timeout_s`."""
        out, stream = self._out, self.stream
        try:
            if out:
                stream.write(out[0] if len(out) == 1 else b"".join(out))
                out.clear()
            if stream.is_writing_paused:
                async with asyncio.timeout(self.limits.send_timeout_s):
                    await stream.drain()
            elif stream.is_lost:
                raise ConnectionResetError("connection lost")
        except (OSError, TimeoutError) as exc:
            raise ClientGone(str(exc) or type(exc).__name__) from exc

    async def send(self, event: h11.Event) -> None:
        self.queue(event)
        await self.flush()

    async def next_body_event(self) -> h11.Data | h11.EndOfMessage:
        """The next piece of the request body. Refused when it is malformed (400) or stalls
        (408); ClientGone when the client closes mid-body."""
        try:
            event = await next_event(self.client, self.stream, self.limits.body_idle_s)
        except TimeoutError:
            wait = f"{self.limits.body_idle_s:g} s"
            raise Refused(408, f"the request body stalled for {wait}") from None
        except h11.RemoteProtocolError as exc:
            raise Refused(status_hint(exc), f"malformed request body: {exc}") from exc
        if not isinstance(event, h11.Data | h11.EndOfMessage):
            raise ClientGone("the client closed mid-body")
        return event


async def _send_request(pool: Pool, origin: Origin, ex: Exchange, body: bytes | None) -> Connection:
    """Send the request (streaming its body from the client when `body` is None)."""
    upstream_req = _upstream_request(ex, origin, body)
    may_retry = body is not None and ex.req.method in IDEMPOTENT
    is_fresh = False
    while True:
        conn = await pool.get(origin, is_fresh=is_fresh)
        up = conn.http
        try:
            if body is not None:
                data = up.send(upstream_req) or b""
                if body:
                    data += up.send(h11.Data(data=body)) or b""
                data += up.send(h11.EndOfMessage()) or b""
                conn.stream.write(data)
            else:
                conn.stream.write(up.send(upstream_req) or b"")
                await _pump_body(ex, conn)
            await conn.stream.drain()
            if conn.is_reused and may_retry:
                # Wait for the first byte here, so a stale connection can be retried.
                await _first_byte(conn, pool.limits)
            return conn
        except (ConnectionError, EOFError) as exc:
            conn.close()
            if conn.is_reused and may_retry:
                is_fresh = True  # the upstream had closed the idle connection
                continue
            raise UpstreamError(f"{origin.url} broke the connection: {exc}") from exc
        except OSError as exc:
            conn.close()
            raise UpstreamError(f"{origin.url} failed: {exc}") from exc
        except BaseException:
            conn.close()
            raise


async def _first_byte(conn: Connection, limits: Limits) -> None:
    stream = conn.stream
    async with asyncio.timeout(limits.upstream_idle_s):
        data = await stream.read()
    if not data:
        raise EOFError("closed without an answer")
    conn.http.receive_data(data)


async def _pump_body(ex: Exchange, conn: Connection) -> None:
    """Relay the request body from the client as it arrives."""
    up, stream = conn.http, conn.stream
    pending, ex.pending = ex.pending, []
    for piece in pending:
        stream.write(up.send(h11.Data(data=piece)) or b"")
    while True:
        event = await ex.next_body_event()
        out = up.send(event)
        if out:
            stream.write(out)
            await stream.drain()
        if isinstance(event, h11.EndOfMessage):
            return


async def relay(
    *,
    pool: Pool,
    origin: Origin,
    ex: Exchange,
    body: bytes | None,
    on_head: Callable[[], None] | None = None,
) -> None:
    """Send the request (with `body`, or streamed from the client when None) to `origin`
    and relay the answer.

    Raises UpstreamError (is_answered False: nothing was written to the client, answer
    502); ClientGone when the client goes away. `on_head` runs when the final answer's
    head arrives (for a load: the model is loaded or failed).
    """
    conn = await _send_request(pool, origin, ex, body)
    is_done = False
    try:
        await _relay_answer(conn, ex, on_head)
        is_done = True
    except h11.ProtocolError as exc:
        raise UpstreamError(
            f"{origin.url} sent a malformed answer: {exc}",
            is_answered=ex.client.our_state is not h11.SEND_RESPONSE,
        ) from exc
    finally:
        if is_done:
            pool.put(conn)
        else:
            conn.close()


async def _relay_answer(conn: Connection, ex: Exchange, on_head: Callable[[], None] | None) -> None:
    up, stream = conn.http, conn.stream
    url = conn.origin.url
    while True:
        event = await _upstream_event(up, stream, ex, is_answered=False, url=url)
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                raise UpstreamError(f"{url} switched protocols; the gate cannot relay that")
            if ex.req.http_version == b"1.1":  # 103 Early Hints, ...
                interim = h11.InformationalResponse(
                    status_code=event.status_code,
                    headers=event.headers.raw_items(),
                    reason=event.reason,
                )
                ex.queue(interim)
            continue
        if isinstance(event, h11.Response):
            break
        raise UpstreamError(f"{url} closed the connection without an answer")
    fields = fields_of(event.headers)
    if has_both_framings(fields):
        raise UpstreamError(f"{url} answered with both Content-Length and Transfer-Encoding")
    if on_head is not None:
        on_head()
    ex.queue(_client_response(event, fields, ex.req.method))
    await _relay_answer_body(ex, up, stream, url)


async def _relay_answer_body(ex: Exchange, up: h11.Connection, stream: Stream, url: str) -> None:
    """Relay the body of an answer whose head is queued, to its end."""
    while True:
        # Whatever arrived together leaves together; the queue is written before each
        # wait for more, so a stream still goes out piece by piece as it is produced.
        event = await _upstream_event(up, stream, ex, is_answered=True, url=url)
        if isinstance(event, h11.Data):
            ex.queue(event)  # h11 frames it afresh for the client (chunk marks unused)
        elif isinstance(event, h11.EndOfMessage):
            ex.queue(h11.EndOfMessage())
            await ex.flush()
            return
        else:
            raise UpstreamError(f"{url} closed mid-answer", is_answered=True)


async def _upstream_event(
    up: h11.Connection, stream: Stream, ex: Exchange, *, is_answered: bool, url: str
) -> h11.Event | None:
    """The upstream's next event; what is queued for the client is written first when
    the gate has to wait for it."""
    limits = ex.limits
    try:
        while True:
            event = up.next_event()
            if event is h11.NEED_DATA:
                await ex.flush()
                up.receive_data(await read_within(stream, limits.upstream_idle_s))
                continue
            if event is h11.PAUSED:
                return None
            assert isinstance(event, h11.Event)
            return event
    except TimeoutError as exc:
        raise UpstreamError(
            f"{url} sent nothing for {limits.upstream_idle_s:g} s", is_answered=is_answered
        ) from exc
    except h11.RemoteProtocolError as exc:
        if stream.is_eof:
            what = "mid-answer" if is_answered else "without an answer"
            raise UpstreamError(
                f"{url} closed the connection {what}", is_answered=is_answered
            ) from exc
        message = f"{url} sent a malformed answer: {exc}"
        raise UpstreamError(message, is_answered=is_answered) from exc
