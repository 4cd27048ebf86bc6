"""Relaying one request to the upstream and its answer back, byte for byte, as it arrives.

Policy:
- Bodies are relayed as they arrive. A request body is read whole only when the gate must
  look inside it (load endpoints) or when it is small (sent with the head in one write).
- Response framing passes through unchanged (chunked stays chunked), so each NDJSON or SSE
  chunk leaves as soon as it arrives: one read and one write per relayed segment. Only an
  HTTP/1.0 client gets a de-chunked body, delimited by closing the connection.
- Hop-by-hop headers are dropped both ways. `Host` is rewritten to the upstream's, because
  Ollama listening on loopback rejects foreign Host headers.
- Upstream connections are kept alive in a pool (no per-request connection setup). A
  request sent on a reused connection that fails before any byte of the answer arrives is
  sent once more on a fresh connection, if its body was buffered (the upstream had closed
  the idle connection and never saw it).
- Connecting has a timeout; reading from the upstream has none: a model load can take
  minutes, and closing the request would abort it (api-facts gotcha 4).
- An upstream connection is closed, never pooled, when a relay does not finish (the
  client went away, or the gate stops): Ollama then cancels the request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from supervisor.gate.http11 import (
    CRLF,
    HEAD_END,
    HEAD_LIMIT,
    REQUEST_DROP,
    RESPONSE_DROP,
    ChunkScanner,
    Framing,
    Request,
    ResponseHead,
    chunk_size,
    connection_tokens,
    parse_response_head,
)

READ_SIZE = 1 << 16
SMALL_BODY_BYTES = 1 << 20  # bodies up to this size are buffered and sent with the head


class UpstreamError(Exception):
    """The upstream could not be reached or broke. `is_answered`: part of its answer had
    already gone to the client (which then can only be disconnected)."""

    def __init__(self, message: str, *, is_answered: bool = False) -> None:
        super().__init__(message)
        self.is_answered = is_answered


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
    tokens = connection_tokens(req.headers)
    for name, value in req.headers:
        low = name.lower()
        if low not in REQUEST_DROP and low not in tokens:
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
    tokens = connection_tokens(resp.headers)
    for name, value in resp.headers:
        low = name.lower()
        if low in RESPONSE_DROP or low in tokens:
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
        size = chunk_size(line)
        writer.write(line)
        if size == 0:
            while True:
                line = await reader.readuntil(b"\n")
                writer.write(line)
                if not line.strip():
                    await writer.drain()
                    return
        await copy(size + 2)  # the data and its CRLF
