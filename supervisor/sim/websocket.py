"""The server side of RFC 6455 WebSockets for the fake ComfyUI's `/ws` (stdlib only).

Only what ComfyUI's `/ws` uses: text frames from the server (unmasked, never fragmented),
client frames read whole (they must be masked: an unmasked one closes the connection with
1002, as RFC 6455 section 5.1 requires), ping answered with pong, close answered with close.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import BinaryIO

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CLIENT_FRAME = 1024 * 1024

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (the server's)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class ProtocolViolation(Exception):
    """The client broke RFC 6455; `code` is the close code to send."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_frame(rfile: BinaryIO) -> tuple[int, bytes] | None:
    """(opcode, unmasked payload) of the client's next frame; None at end of stream."""
    head = rfile.read(2)
    if len(head) < 2:
        return None
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if not head[1] & 0x80:
        raise ProtocolViolation(1002, "a client frame must be masked")
    if length == 126:
        length = struct.unpack("!H", rfile.read(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", rfile.read(8))[0]
    if length > MAX_CLIENT_FRAME:
        raise ProtocolViolation(1009, "frame too big")
    mask = rfile.read(4)
    data = rfile.read(length)
    if len(mask) < 4 or len(data) < length:
        return None
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def client_frame(opcode: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked, final frame as a client sends it (for tests)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse_server_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every whole server (unmasked) frame off the front of `buffer` (for tests)."""
    frames: list[tuple[int, bytes]] = []
    while len(buffer) >= 2:
        opcode, length, at = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                break
            length, at = struct.unpack("!H", buffer[2:4])[0], 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length, at = struct.unpack("!Q", buffer[2:10])[0], 10
        if len(buffer) < at + length:
            break
        frames.append((opcode, bytes(buffer[at : at + length])))
        del buffer[: at + length]
    return frames
