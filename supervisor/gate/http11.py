"""Just enough HTTP/1.1 (RFC 9112) for the gate: reading requests and response heads, and
following chunked framing, on asyncio streams (relay.py moves the bytes).

Hand-rolled because the gate sits in front of every token stream and may add at most about
a millisecond. Policy: strict where a lenient parser would let requests be smuggled (a
request with both Content-Length and Transfer-Encoding, a space before a header's colon,
line folding and malformed chunk sizes are refused with 400), lenient where RFC 9112 asks
(stray CRLFs between requests). Heads over 64 KiB are refused (431).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from enum import IntEnum

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
HEAD_LIMIT = 1 << 16  # the StreamReader limit: bigger heads are refused

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
REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# The response's framing headers pass through because its framing does.
RESPONSE_DROP = _HOP_BY_HOP - {b"transfer-encoding", b"trailer"}
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class BadRequest(Exception):
    """The client sent something that is not HTTP/1.1 we accept; answered, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def connection_tokens(headers: Headers) -> frozenset[bytes]:
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
        keep_alive=version == b"HTTP/1.1" and b"close" not in connection_tokens(headers),
        expects_continue=expect is not None and expect.strip().lower() == b"100-continue",
    )


def chunk_size(line: bytes) -> int:
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
            size = chunk_size(await reader.readuntil(b"\n"))
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
        and b"close" not in connection_tokens(headers)
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
                self._remaining = chunk_size(line)
                self._state = self._DATA if self._remaining else self._TRAILER
            elif self._state == self._DATA_END:
                if line.rstrip(b"\r"):
                    raise ValueError("chunk data not followed by CRLF")
                self._state = self._SIZE
            elif not line.rstrip(b"\r"):
                self.is_done = True  # the empty line after the last chunk (and trailers)
        return i
