"""The express lane: a plain request, served in protocol callbacks with httptools (llhttp,
Node.js's HTTP parser, in C) instead of a task stepping through h11.

Most requests through a gate are plain: one request whose head and body came in one read
(or the body within EXPRESS_WAIT_S of the head), HTTP/1.1, no Transfer-Encoding, Expect or
Upgrade, for a route that needs no waiting (a pass-through route, or a load of a resident
model), and an idle pooled connection to the upstream is at hand. Such a request is
written to the upstream from the read callback, and its answer is framed for the client
from the upstream's read callback: no task wake-ups, no h11 events. That is most of what
the gate adds to a request's latency (docs/benchmarks.md, "Gate overhead: the express
lane").

Everything else takes the general path (core.py, relay.py, h11), untouched: the express
lane either takes a request whole before doing anything, or leaves its bytes where the
general path reads them. It declines (and h11 judges) any request it would have to look
at twice: a head with a bare CR or LF, a control character, an obs-fold, a header field
llhttp refuses, a second message in the same read (pipelining), HTTP/1.0, a target not in
origin form or with a byte outside printable ASCII, a method it does not know, Host
missing or repeated, Content-Length repeated or not plain digits, a Connection header
other than `keep-alive`. What it sends upstream is written afresh from what it parsed,
like the general path's. (A few forms h11 refuses and llhttp reads, such as a blank line
before the request line, are taken: what goes upstream is rewritten all the same.)

The answer: 1xx interim answers pass (101, a status under 100, or a body on an interim
answer is a 502), framing headers are written afresh (chunked stays chunked, a body
delimited by closing is chunked for the client), hop-by-hop headers are dropped; an
answer with both Content-Length and Transfer-Encoding, with codings other than exactly
`chunked`, with a head over `Limits.head_bytes` or a header value with control bytes is a
502. The upstream connection goes back to the pool only when the answer ended where its
framing said and no further message began (llhttp skips blank lines between messages;
they are consumed here, never passed on); a connection paused for a slow client is
resumed first. A client that stops reading pauses the upstream (also when it had not
read an earlier answer when this one began); one that reads nothing for
`Limits.send_timeout_s` is disconnected. A client that leaves closes the upstream
connection (Ollama then cancels the request). An upstream that fails before any byte of
the answer: 502; only when a pooled connection turns out closed before any byte came does
an idempotent request (a GET, ...) go again through the general path, on a fresh
connection, as relay.py does: a POST is never sent twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from supervisor.gate.http11 import REQUEST_DROP, RESPONSE_DROP, Fields, Limits, Stream
from supervisor.gate.relay import IDEMPOTENT

if TYPE_CHECKING:
    from supervisor.gate.relay import Connection, Origin, Pool

# Methods the express lane serves (HEAD is not among them: its answer's framing would
# have to be read against the method; CONNECT and unknown methods go to h11).
METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
# A control character other than HTAB, CR and LF.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A field value or reason phrase that may be written on (RFC 9110 §5.5).
_TEXT = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_DECLINED = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


@dataclass(slots=True)
class Request:
    """A plain request, read whole."""

    raw: bytes  # as received, for the general path when the express lane gives it back
    method: bytes
    target: bytes  # origin form
    route: bytes  # the target without its query
    fields: Fields  # (lower-case name, name, value), values without surrounding blanks
    body: bytes
    has_length: bool  # the request carried Content-Length


class Incomplete:
    """`RequestReader.feed`'s answer for the start of what may be a plain request."""


INCOMPLETE = Incomplete()


def _is_plain(head: bytes) -> bool:
    """No control character but in CRLF line ends, no bare CR or LF, no obs-fold."""
    lines = head.count(b"\r\n")
    return (
        head.count(b"\r") == lines
        and head.count(b"\n") == lines
        and _CONTROL.search(head) is None
        and b"\n " not in head
        and b"\n\t" not in head
    )


class RequestReader:
    """Reads one request for the express lane as its bytes come (httptools callbacks)."""

    __slots__ = (
        "_body",
        "_complete",
        "_declined",
        "_fields",
        "_has_head",
        "_length",
        "_limits",
        "_messages",
        "_method",
        "_parser",
        "_raw",
        "_scanned",
        "_url",
    )

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._raw: list[bytes] = []
        self._parser = httptools.HttpRequestParser(self)
        self._has_head = False
        self._scanned = 0  # bytes of an incomplete head already looked through
        self._url = b""
        self._method = b""
        self._fields: Fields = []
        self._body: list[bytes] = []
        self._length: int | None = None
        self._messages = 0
        self._complete = False
        self._declined = False

    @property
    def raw(self) -> bytes:
        """Every byte fed so far, as received."""
        return self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)

    def feed(self, data: bytes) -> Request | Incomplete | None:
        """The request, when what was fed is exactly one, whole, plain request (the
        module's docstring); INCOMPLETE when it may be the start of one (no more than
        `Limits.buffer_bytes` of body to come); None: the general path reads it."""
        self._raw.append(data)
        if not self._has_head:
            scanned = self._scanned
            data = self.raw
            end = data.find(b"\r\n\r\n", max(0, scanned - 3))
            if end < 0:
                self._scanned = len(data)
                fits = len(data) < self._limits.head_bytes
                return INCOMPLETE if fits and _CONTROL.search(data, scanned) is None else None
            if end + 4 > self._limits.head_bytes or not _is_plain(data[: end + 2]):
                return None
            self._has_head = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        if self._declined or self._messages != 1:
            return None
        if not self._complete:
            length = self._length
            return (
                INCOMPLETE if length is not None and length <= self._limits.buffer_bytes else None
            )
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        if (self._length or 0) != len(body):
            return None
        return Request(
            raw=self.raw,
            method=self._method,
            target=self._url,
            route=self._url.split(b"?", 1)[0],
            fields=self._fields,
            body=body,
            has_length=self._length is not None,
        )

    # httptools

    def on_message_begin(self) -> None:
        self._messages += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.lower(), name, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._method = method = parser.get_method()
        if (
            parser.get_http_version() != "1.1"
            or method not in METHODS
            or not self._url.startswith(b"/")
            or not _TARGET.fullmatch(self._url)
        ):
            self._declined = True
            return
        hosts = 0
        for low, _, value in self._fields:
            if low == b"host":
                hosts += 1
            elif low == b"content-length":
                if self._length is not None or not _DIGITS.fullmatch(value):
                    self._declined = True
                    return
                self._length = int(value)
            elif low in _DECLINED or (low == b"connection" and value.lower() != b"keep-alive"):
                self._declined = True
                return
        if hosts != 1:
            self._declined = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True


def upstream_request(req: Request, origin: Origin) -> bytes:
    """The request as the upstream gets it: its own Host, framing written afresh,
    hop-by-hop fields dropped (the express lane took no Connection tokens but
    `keep-alive`)."""
    lines = [
        b"%s %s%s HTTP/1.1" % (req.method, origin.base_path, req.target),
        b"Host: " + origin.host_header,
    ]
    for low, name, value in req.fields:
        if low not in REQUEST_DROP:
            lines.append(name + b": " + value)
    if req.body or req.has_length:
        lines.append(b"Content-Length: %d" % len(req.body))
    lines.append(b"\r\n")
    return b"\r\n".join(lines) + req.body


@dataclass(frozen=True, slots=True, kw_only=True)
class Ended:
    """How an express exchange ended, for the gate: answered (`failure` None), failed
    before any byte reached the client (`failure` says why; `answered` False), or cut."""

    failure: str | None
    answered: bool
    give_back: bool  # the request goes again through the general path
    is_complete: bool = False  # the whole answer came and went to the client


class Exchange:
    """One express request, from the moment it is written upstream to its answer's end.
    Runs in the protocol callbacks of both connections (event loop thread only)."""

    __slots__ = (
        "_chunked",
        "_client",
        "_conn",
        "_delimited_by_close",
        "_extra",
        "_fields",
        "_final",
        "_got_bytes",
        "_head_bytes",
        "_holds_head",
        "_idle_timer",
        "_is_complete",
        "_is_ended",
        "_is_released",
        "_keep_alive",
        "_limits",
        "_odd",
        "_on_end",
        "_out",
        "_parser",
        "_pool",
        "_reason",
        "_req",
        "_send_timer",
        "_upstream_paused",
        "_wrote",
    )

    def __init__(
        self,
        *,
        client: Stream,
        conn: Connection,
        req: Request,
        pool: Pool,
        limits: Limits,
        on_end: Callable[[Ended], None],
    ) -> None:
        self._client = client
        self._conn = conn
        self._req = req
        self._pool = pool
        self._limits = limits
        self._on_end = on_end
        self._parser = httptools.HttpResponseParser(self)
        self._fields: Fields = []
        self._reason = b""
        self._final = False  # the final (non-1xx) answer's head was read
        self._chunked = False  # its body goes to the client chunked
        self._delimited_by_close = False
        self._is_complete = False
        self._holds_head = False  # the head is held until the body's first bytes
        self._keep_alive = False
        self._is_ended = False
        self._is_released = False  # the upstream connection went back to the pool or closed
        self._wrote = False  # a byte went to the client
        self._got_bytes = False  # a byte came from the upstream
        self._extra = False  # bytes came after the answer's end
        self._head_bytes = 0  # of the head being read
        self._upstream_paused = False  # reading paused while the client catches up
        self._odd: str | None = None  # why the answer cannot be relayed
        self._out: list[bytes] = []
        self._send_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        up = self._conn.stream
        up.on_data = self._on_upstream_data
        up.on_lost = self._on_upstream_lost
        self._client.on_writable = self._on_client_writable
        self._watch_upstream()
        if self._client.is_writing_paused:
            # The client has not read an earlier answer yet: this one waits for it too, and
            # the send limit runs from now.
            self._on_client_writable(False)
        try:
            up.write(upstream_request(self._req, self._conn.origin))
        except ConnectionError as exc:
            self._fail(f"broke the connection: {exc}", stale=True)

    def _watch_upstream(self) -> None:
        """(Re)start the wait for the upstream's next bytes (`Limits.upstream_idle_s`)."""
        limit = self._limits.upstream_idle_s
        if limit is not None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(limit, self._fail, f"sent nothing for {limit:g} s")

    # ------------------------------------------------------------------ httptools

    def on_message_begin(self) -> None:
        if self._is_complete:
            self._extra = True
        self._fields = []
        self._reason = b""
        self._head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._count_head(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.lower(), name, value.strip(b" \t")))
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        """A head (or trailers) over `Limits.head_bytes` is refused, as h11 refuses it."""
        self._head_bytes += size
        if self._head_bytes > self._limits.head_bytes and not self._is_complete:
            self._odd = "sent a malformed answer: a head over the size limit"
            self._fields = []

    def on_headers_complete(self) -> None:
        if self._is_complete or self._odd is not None:
            return
        status: int = self._parser.get_status_code()
        reason = self._reason if _TEXT.fullmatch(self._reason) else b""
        head = [b"HTTP/1.1 %d %s" % (status, reason)]
        for _, _, value in self._fields:
            if not _TEXT.fullmatch(value):
                self._odd = "sent a malformed answer: a header value with control bytes"
                return
        if status < 100:
            self._odd = f"sent a malformed answer: status {status}"
            return
        if status < 200:
            if status == 101:
                self._odd = "switched protocols; the gate cannot relay that"
                return
            head.extend(name + b": " + value for _, name, value in self._fields)
            head.append(b"\r\n")
            self._out.append(b"\r\n".join(head))
            return
        self._final = True
        tokens: frozenset[bytes] = frozenset()
        length: bytes | None = None
        codings: list[bytes] = []
        for low, _, value in self._fields:
            if low == b"connection":
                tokens = tokens | {t.strip().lower() for t in value.split(b",")}
        for low, name, value in self._fields:
            if low == b"content-length":
                length = value
            elif low == b"transfer-encoding":
                codings.extend(t.strip().lower() for t in value.split(b","))
            elif low not in RESPONSE_DROP and low not in tokens:
                head.append(name + b": " + value)
        has_body = status not in (204, 304)
        if codings:
            if length is not None:
                self._odd = "answered with both Content-Length and Transfer-Encoding"
                return
            if codings != [b"chunked"]:
                self._odd = "sent a malformed answer: a transfer coding other than chunked"
                return
            if has_body:
                self._chunked = True
                head.append(b"Transfer-Encoding: chunked")
        elif length is not None:
            if status != 204:
                head.append(b"Content-Length: " + length)
                # Its head waits for the body's first bytes: one write, not two, for an
                # answer written in two (nothing can be done with the head alone).
                self._holds_head = has_body and length != b"0"
        elif has_body:
            self._delimited_by_close = self._chunked = True
            head.append(b"Transfer-Encoding: chunked")
        head.append(b"\r\n")
        self._out.append(b"\r\n".join(head))

    def on_body(self, body: bytes) -> None:
        if self._is_complete or self._odd is not None:
            return
        if not self._final:
            self._odd = "sent a malformed answer: a body on an interim answer"
            return
        self._holds_head = False
        if self._chunked:
            self._out.append(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if not self._final or self._is_complete:
            return
        self._keep_alive = self._parser.should_keep_alive()
        if self._chunked:
            self._out.append(b"0\r\n\r\n")
        self._is_complete = True

    # ------------------------------------------------------------------ connections

    def _on_upstream_data(self, data: bytes) -> bool:
        if self._is_ended:
            return True
        if self._is_complete:
            self._finish(reuse=False)  # bytes after the answer: never reuse this connection
            return True
        self._got_bytes = True
        if self._idle_timer is not None:
            self._watch_upstream()  # (none while the client holds the answer up)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._is_complete:
                self._fail(self._odd or f"sent a malformed answer: {exc!s:.200}")
                return True
            self._extra = True  # garbage after the answer
        if self._odd is not None:
            self._fail(self._odd)
            return True
        if self._holds_head or not self._flush():
            return True
        if self._is_complete:
            self._finish(reuse=self._keep_alive and not self._extra)
        return True

    def _on_upstream_lost(self) -> None:
        if self._is_ended:
            return
        if self._delimited_by_close and not self._is_complete:
            self._out.append(b"0\r\n\r\n")  # the answer ends where its connection did
            self._is_complete = True
            if self._flush():
                self._finish(reuse=False)
            return
        where = "mid-answer" if self._wrote else "without an answer"
        self._fail(f"closed the connection {where}", stale=True)

    def _on_client_writable(self, is_writable: bool) -> None:
        if self._is_released:  # the answer is all written; the client caught up with it
            if is_writable and not self._is_ended:
                self._end(Ended(failure=None, answered=True, give_back=False, is_complete=True))
            return
        transport = self._conn.stream.transport
        if self._is_ended or transport is None:
            return
        if is_writable:
            self._upstream_paused = False
            transport.resume_reading()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None
            self._watch_upstream()
        else:
            self._upstream_paused = True
            transport.pause_reading()
            if self._idle_timer is not None:  # the client holds it up, not the upstream
                self._idle_timer.cancel()
                self._idle_timer = None
            if self._send_timer is None:
                loop = asyncio.get_running_loop()
                self._send_timer = loop.call_later(self._limits.send_timeout_s, self.client_gone)

    def client_gone(self) -> None:
        """The client closed, broke, or read nothing for `send_timeout_s`."""
        if self._is_ended:
            return
        if not self._is_released:
            self._conn.close()  # the upstream cancels the request
        self._client.abort()
        self._end(Ended(failure=None, answered=True, give_back=False))

    def _flush(self) -> bool:
        """Write what is framed for the client; False when the client is gone."""
        out = self._out
        if not out:
            return True
        try:
            self._client.write(out[0] if len(out) == 1 else b"".join(out))
        except ConnectionError:
            self.client_gone()
            return False
        out.clear()
        self._wrote = True
        return True

    def _fail(self, why: str, *, stale: bool = False) -> None:
        """The upstream broke: 502 when nothing went to the client yet, else the client
        is disconnected (its answer is cut). `stale`: the pooled connection turned out
        closed before a byte of the answer came; an idempotent request then goes again
        through the general path (on a fresh connection), as relay.py does."""
        if self._is_ended:
            return
        self._conn.close()
        if self._wrote:
            self._client.close()
            self._end(Ended(failure=why, answered=True, give_back=False))
            return
        give_back = stale and not self._got_bytes and self._req.method in IDEMPOTENT
        self._end(Ended(failure=why, answered=False, give_back=give_back))

    def _finish(self, *, reuse: bool) -> None:
        """The whole answer is written: release the upstream connection, and end once the
        client has taken the answer in, as the h11 path waits for its last write to
        drain (within `send_timeout_s`, else the client is cut)."""
        if self._is_ended:
            return
        up = self._conn.stream
        up.on_data = None
        up.on_lost = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if reuse:
            if self._upstream_paused and up.transport is not None:
                # Paused for this client: the next request on it must be read.
                self._upstream_paused = False
                up.transport.resume_reading()
            self._pool.keep(self._conn)
        else:
            self._conn.close()
        self._is_released = True  # from here on, the connection is the pool's
        if not self._client.is_writing_paused:
            self._end(Ended(failure=None, answered=True, give_back=False, is_complete=True))
        elif self._send_timer is None:
            loop = asyncio.get_running_loop()
            self._send_timer = loop.call_later(self._limits.send_timeout_s, self.client_gone)

    def _end(self, ended: Ended) -> None:
        self._is_ended = True
        up = self._conn.stream
        if not self._is_released:
            up.on_data = None
            if up.on_lost == self._on_upstream_lost:
                up.on_lost = None
        for timer in (self._send_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._send_timer = self._idle_timer = None
        self._client.on_writable = None
        self._on_end(ended)
