"""Just enough HTTP/1.1 (RFC 9112) to relay Ollama's API byte for byte, on asyncio streams.

Hand-rolled because the gate sits in front of every token stream and may add at most about
a millisecond: one read and one write per relayed segment, pooled upstream connections,
no per-request threads. Policy:
- Bodies are relayed as they arrive. A request body is read whole only when the gate must
  look inside it (load endpoints) or when it is small (sent with the head in one write).
- Response framing passes through unchanged (chunked stays chunked), so each NDJSON or SSE
  chunk leaves as soon as it arrives. Only an HTTP/1.0 client gets a de-chunked body,
  delimited by closing the connection.
- Hop-by-hop headers are dropped both ways. `Host` is rewritten to the upstream's, because
  Ollama listening on loopback rejects foreign Host headers. `Expect: 100-continue` is
  answered here. Requests with both Content-Length and Transfer-Encoding are refused (400).
- Upstream connections are kept alive in a pool. A request sent on a reused connection that
  fails before any byte of the answer arrives is sent once more on a fresh connection, if
  its body was buffered (the upstream had closed the idle connection and never saw it).
- Connecting has a timeout; reading from the upstream has none: a model load can take
  minutes, and closing the request would abort it (api-facts gotcha 4).
- An upstream connection is closed, never pooled, when a relay does not finish (the
  client went away, or the gate stops): Ollama then cancels the request.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from urllib.parse import urlsplit

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
READ_SIZE = 1 << 16
HEAD_LIMIT = 1 << 16  # the StreamReader limit: bigger heads are refused
SMALL_BODY_BYTES = 1 << 20  # bodies up to this size are buffered and sent with the head

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
# Framing and Host are rewritten for the upstream; Expect is answered by the gate.
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# The response's framing headers pass through because its framing does.
_RESPONSE_DROP = _HOP_BY_HOP - {b"transfer-encoding", b"trailer"}
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class BadRequest(Exception):
    """The client sent something that is not HTTP/1.1 we accept; answered, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamError(Exception):
    """The upstream could not be reached or broke. `is_answered`: part of its answer had
    already gone to the client (which then can only be disconnected)."""

    def __init__(self, message: str, *, is_answered: bool = False) -> None:
        super().__init__(message)
        self.is_answered = is_answered


# ----------------------------------------------------------------------------- messages


def _parse_headers(lines: list[bytes]) -> Headers:
    headers: Headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        # No space before the colon and no obsolete line folding (request smuggling).
        if not sep or not _TOKEN.fullmatch(name):
            raise ValueError(f"malformed header line {line[:60]!r}")
        headers.append((name, value.strip(b" \t")))
    return headers


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def header_value(headers: Headers, wanted: bytes) -> bytes | None:
    """The first value of header `wanted` (lower case), or None."""
    for name, value in headers:
        if name.lower() == wanted:
            return value
    return None


def _framing(headers: Headers) -> tuple[bool, int | None]:
    """(is_chunked, content_length); ValueError for a framing we cannot trust."""
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif low == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b",") if c.strip())
    if codings:
        if codings[-1] != b"chunked" or lengths:
            raise ValueError("unsupported Transfer-Encoding")
        return True, None
    if not lengths:
        return False, None
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise ValueError("invalid Content-Length")
    return False, int(lengths.pop())


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    content_length: int | None
    is_chunked: bool
    keep_alive: bool  # the client may send another request on this connection
    expects_continue: bool

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def has_body(self) -> bool:
        return self.is_chunked or bool(self.content_length)


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request head; None when the client closed cleanly between requests."""
    head = b""
    while not head:
        try:
            head = await reader.readuntil(HEAD_END)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            raise BadRequest(400, "incomplete request head") from exc
        except asyncio.LimitOverrunError as exc:
            raise BadRequest(431, "request head too large") from exc
        head = head.lstrip(CRLF)  # stray CRLFs between requests are allowed
    start, *lines = head[:-4].split(CRLF)
    parts = start.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505, "only HTTP/1.1 and HTTP/1.0 are supported")
    try:
        headers = _parse_headers(lines)
        is_chunked, length = _framing(headers)
    except ValueError as exc:
        raise BadRequest(400, str(exc)) from exc
    if is_chunked and version == b"HTTP/1.0":
        raise BadRequest(400, "chunked request body in HTTP/1.0")
    expect = header_value(headers, b"expect")
    return Request(
        method=method,
        target=target,
        version=version,
        headers=headers,
        content_length=length,
        is_chunked=is_chunked,
        keep_alive=version == b"HTTP/1.1" and b"close" not in _connection_tokens(headers),
        expects_continue=expect is not None and expect.strip().lower() == b"100-continue",
    )


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip(b" \t\r\n")
    if not _CHUNK_SIZE.fullmatch(digits):
        raise ValueError(f"malformed chunk size {line[:40]!r}")
    return int(digits, 16)


async def read_body(reader: asyncio.StreamReader, req: Request, limit: int) -> bytes:
    """The whole request body, de-chunked. BadRequest(413) past `limit` bytes; EOFError
    when the client goes away mid-body."""
    if not req.is_chunked:
        length = req.content_length or 0
        if length > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        return await reader.readexactly(length)
    body = bytearray()
    try:
        while True:
            size = _chunk_size(await reader.readuntil(b"\n"))
            if size == 0:
                while (await reader.readuntil(b"\n")).strip():
                    pass  # trailer fields: nothing the gate forwards
                return bytes(body)
            if len(body) + size > limit:
                raise BadRequest(413, f"request body over {limit} bytes")
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != CRLF:
                raise ValueError("chunk data not followed by CRLF")
    except (ValueError, asyncio.LimitOverrunError) as exc:
        raise BadRequest(400, f"malformed chunked body: {exc}") from exc


async def _pump_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: Request
) -> None:
    """Relay a request body as it arrives, framing unchanged (never reads past its end)."""

    async def copy(count: int) -> None:
        while count > 0:
            data = await reader.read(min(count, READ_SIZE))
            if not data:
                raise EOFError("client closed mid-body")
            writer.write(data)
            count -= len(data)
            await writer.drain()

    if not req.is_chunked:
        await copy(req.content_length or 0)
        return
    while True:
        line = await reader.readuntil(b"\n")
        size = _chunk_size(line)
        writer.write(line)
        if size == 0:
            while True:
                line = await reader.readuntil(b"\n")
                writer.write(line)
                if not line.strip():
                    await writer.drain()
                    return
        await copy(size + 2)  # the data and its CRLF


class Framing(IntEnum):
    NONE = 0  # HEAD, 1xx, 204, 304
    LENGTH = 1
    CHUNKED = 2
    CLOSE = 3  # delimited by the upstream closing the connection


@dataclass(slots=True)
class ResponseHead:
    status: int
    status_line: bytes
    headers: Headers
    framing: Framing
    content_length: int
    keep_alive: bool  # the upstream connection may be reused afterwards


def parse_response_head(head: bytes, method: bytes) -> ResponseHead:
    """ValueError when the upstream's answer is not HTTP/1.x."""
    status_line, *lines = head[:-4].split(CRLF)
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"malformed status line {status_line[:60]!r}")
    status = int(parts[1])
    headers = _parse_headers(lines)
    is_chunked, length = _framing(headers)
    if method == b"HEAD" or status < 200 or status in (204, 304):
        framing, length = Framing.NONE, 0
    elif is_chunked:
        framing = Framing.CHUNKED
    elif length is not None:
        framing = Framing.LENGTH
    else:
        framing = Framing.CLOSE
    keep_alive = (
        parts[0] == b"HTTP/1.1"
        and framing is not Framing.CLOSE
        and b"close" not in _connection_tokens(headers)
    )
    return ResponseHead(status, status_line, headers, framing, length or 0, keep_alive)


class ChunkScanner:
    """Follows chunked framing across arbitrary slices, so relayed bytes can be written as
    they arrive while the relay still knows where the message ends."""

    __slots__ = ("_line", "_remaining", "_state", "is_done")
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self.is_done = False

    def feed(self, data: bytes, payload: list[bytes] | None = None) -> int:
        """How many leading bytes of `data` belong to this message (all of them unless it
        ends inside). Appends the de-chunked payload to `payload` when given.
        ValueError on broken framing."""
        i, end = 0, len(data)
        while i < end and not self.is_done:
            if self._state == self._DATA:
                take = min(self._remaining, end - i)
                if payload is not None:
                    payload.append(data[i : i + take])
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > 8192:
                    raise ValueError("chunk line too long")
                return end
            line, self._line = self._line + data[i:j], b""
            i = j + 1
            if self._state == self._SIZE:
                self._remaining = _chunk_size(line)
                self._state = self._DATA if self._remaining else self._TRAILER
            elif self._state == self._DATA_END:
                if line.rstrip(b"\r"):
                    raise ValueError("chunk data not followed by CRLF")
                self._state = self._SIZE
            elif not line.rstrip(b"\r"):
                self.is_done = True  # the empty line after the last chunk (and trailers)
        return i


# ----------------------------------------------------------------------------- upstream


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
        return cls(
            url=url,
            host=parts.hostname,
            port=parts.port or (443 if is_tls else 80),
            is_tls=is_tls,
            host_header=parts.netloc.rpartition("@")[2].encode("idna"),
            base_path=parts.path.rstrip("/").encode(),
        )


@dataclass(eq=False)
class Connection:
    origin: Origin
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    is_reused: bool = False

    def close(self) -> None:
        self.writer.close()


@dataclass
class Pool:
    """Idle keep-alive connections per origin (LIFO: the warmest first)."""

    connect_timeout_s: float = 10.0
    max_idle_per_origin: int = 32
    _idle: dict[Origin, list[Connection]] = field(default_factory=dict)

    async def get(self, origin: Origin, *, is_fresh: bool = False) -> Connection:
        idle = self._idle.get(origin)
        while idle and not is_fresh:
            conn = idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()
                continue
            conn.is_reused = True
            return conn
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=ssl.create_default_context() if origin.is_tls else None,
                    limit=HEAD_LIMIT,
                )
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise UpstreamError(f"cannot connect to {origin.url}: {reason}") from exc
        return Connection(origin, reader, writer)

    def put(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) < self.max_idle_per_origin and not conn.writer.is_closing():
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _upstream_head(req: Request, origin: Origin, body: bytes | None) -> bytes:
    parts = [req.method, b" ", origin.base_path + req.target, b" HTTP/1.1\r\nHost: "]
    parts += (origin.host_header, CRLF)
    tokens = _connection_tokens(req.headers)
    for name, value in req.headers:
        low = name.lower()
        if low not in _REQUEST_DROP and low not in tokens:
            parts += (name, b": ", value, CRLF)
    if body is not None:
        if body or req.content_length is not None or req.is_chunked:
            parts.append(b"Content-Length: %d\r\n" % len(body))
    elif req.is_chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    else:
        parts.append(b"Content-Length: %d\r\n" % (req.content_length or 0))
    parts.append(CRLF)
    return b"".join(parts)


def _client_head(resp: ResponseHead, *, keep_alive: bool, dechunk: bool) -> bytes:
    parts = [resp.status_line, CRLF]
    tokens = _connection_tokens(resp.headers)
    for name, value in resp.headers:
        low = name.lower()
        if low in _RESPONSE_DROP or low in tokens:
            continue
        if dechunk and low in (b"transfer-encoding", b"trailer"):
            continue
        parts += (name, b": ", value, CRLF)
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(CRLF)
    return b"".join(parts)


async def _send(
    pool: Pool,
    origin: Origin,
    req: Request,
    body: bytes | None,
    client_reader: asyncio.StreamReader,
) -> tuple[Connection, bytes]:
    """Send the request; return the connection and the head of the (final or interim)
    answer. Retries once on a fresh connection when a reused one was stale."""
    head = _upstream_head(req, origin, body)
    is_fresh = body is None  # a streamed body cannot be sent twice
    while True:
        conn = await pool.get(origin, is_fresh=is_fresh)
        try:
            if body is not None:
                conn.writer.write(head + body if len(body) <= SMALL_BODY_BYTES else head)
                if len(body) > SMALL_BODY_BYTES:
                    conn.writer.write(body)
            else:
                conn.writer.write(head)
                await _pump_body(client_reader, conn.writer, req)
            await conn.writer.drain()
            return conn, await conn.reader.readuntil(HEAD_END)
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if conn.is_reused and body is not None and not exc.partial:
                is_fresh = True  # the upstream closed the idle connection: try once more
                continue
            raise UpstreamError(f"{origin.url} closed the connection without an answer") from exc
        except ConnectionError as exc:
            conn.close()
            if conn.is_reused and body is not None:
                is_fresh = True
                continue
            raise UpstreamError(f"{origin.url} broke the connection: {exc}") from exc
        except (OSError, asyncio.LimitOverrunError) as exc:
            conn.close()
            raise UpstreamError(f"{origin.url} failed: {exc}") from exc
        except BaseException:
            conn.close()
            raise


async def relay(
    *,
    pool: Pool,
    origin: Origin,
    req: Request,
    body: bytes | None,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    on_head: Callable[[], None] | None = None,
) -> bool:
    """Send `req` (with `body`, or streamed from the client when None) to `origin` and
    relay the answer. Returns whether the client connection may carry another request.

    Raises UpstreamError (is_answered False: nothing was written to the client, answer
    502); EOFError or ConnectionError when the client goes away. `on_head` runs when the
    final answer's head arrives (for a load: the model is loaded or failed).
    """
    conn, raw = await _send(pool, origin, req, body, client_reader)
    try:
        while True:
            try:
                resp = parse_response_head(raw, req.method)
            except ValueError as exc:
                raise UpstreamError(f"{origin.url} sent a malformed answer: {exc}") from exc
            if resp.status >= 200:
                break
            if resp.status == 101:
                raise UpstreamError(f"{origin.url} switched protocols; the gate cannot relay that")
            if req.version == b"HTTP/1.1":
                client_writer.write(raw)  # interim answer (103 Early Hints, ...)
            try:
                raw = await conn.reader.readuntil(HEAD_END)
            except (OSError, EOFError, asyncio.LimitOverrunError) as exc:
                raise UpstreamError(f"{origin.url} broke after an interim answer") from exc
        if on_head is not None:
            on_head()
        dechunk = req.version != b"HTTP/1.1" and resp.framing is Framing.CHUNKED
        keep_alive = req.keep_alive and resp.framing is not Framing.CLOSE
        client_writer.write(_client_head(resp, keep_alive=keep_alive, dechunk=dechunk))
        is_clean = await _relay_body(conn, resp, client_writer, dechunk=dechunk)
    except BaseException:
        conn.close()
        raise
    if resp.keep_alive and is_clean:
        pool.put(conn)
    else:
        conn.close()
    return keep_alive


async def _relay_body(
    conn: Connection, resp: ResponseHead, out: asyncio.StreamWriter, *, dechunk: bool
) -> bool:
    """Relay the body as it arrives; True when the upstream connection ended cleanly on
    the message boundary (it may be reused)."""
    reader = conn.reader
    framing = resp.framing
    if framing is Framing.NONE:
        await out.drain()
        return True
    if framing is Framing.CLOSE:
        while data := await _read(reader, READ_SIZE, allow_eof=True):
            out.write(data)
            await out.drain()
        return False
    if framing is Framing.LENGTH:
        remaining = resp.content_length
        while remaining > 0:
            data = await _read(reader, min(remaining, READ_SIZE))
            out.write(data)
            remaining -= len(data)
            await out.drain()
        return True
    scanner = ChunkScanner()
    while not scanner.is_done:
        data = await _read(reader, READ_SIZE)
        try:
            if dechunk:
                pieces: list[bytes] = []
                used = scanner.feed(data, pieces)
                out.write(b"".join(pieces))
            else:
                used = scanner.feed(data)
                out.write(data if used == len(data) else data[:used])
        except ValueError as exc:
            raise UpstreamError(f"broken chunked answer: {exc}", is_answered=True) from exc
        await out.drain()
        if used < len(data):
            return False  # bytes beyond the message: do not trust this connection again
    return True


async def _read(reader: asyncio.StreamReader, size: int, *, allow_eof: bool = False) -> bytes:
    try:
        data = await reader.read(size)
    except OSError as exc:
        raise UpstreamError(f"the upstream broke mid-answer: {exc}", is_answered=True) from exc
    if not data and not allow_eof:
        raise UpstreamError("the upstream closed mid-answer", is_answered=True)
    return data
