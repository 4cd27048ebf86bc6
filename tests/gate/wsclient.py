"""A minimal blocking WebSocket client over a raw socket, as a browser talks to ComfyUI's
/ws (RFC 6455 handshake, masked client frames), for the image gate's tests."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from typing import Any

from supervisor.sim.websocket import (
    CLOSE,
    TEXT,
    accept_key,
    client_frame,
    parse_server_frames,
)


class WsClient:
    def __init__(self, port: int, path: str = "/ws", host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n\r\n"
            ).encode()
        )
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed during the handshake: {bytes(buffer)!r}")
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        self.status = int(self.head.split(" ", 2)[1])
        self.expected_accept = accept_key(key)
        self.buffer = bytearray(rest)
        self.frames: list[tuple[int, bytes]] = []
        self.closed = False

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def send_json(self, message: dict[str, Any]) -> None:
        self.sock.sendall(client_frame(TEXT, json.dumps(message).encode()))

    def send_close(self) -> None:
        self.sock.sendall(client_frame(CLOSE, b"\x03\xe8"))

    def _fill(self, timeout_s: float) -> None:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            self.closed = True
            return
        self.buffer += data

    def next_frame(self, timeout_s: float = 10.0) -> tuple[int, bytes] | None:
        """The next server frame; None when the server closed or nothing came in time."""
        deadline = time.monotonic() + timeout_s
        while not self.frames:
            self.frames.extend(parse_server_frames(self.buffer))
            if self.frames:
                break
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            self._fill(min(left, 0.2))
        return self.frames.pop(0)

    def messages_until(self, done: Any, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Text messages until `done(message)` is true (included)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            frame = self.next_frame(deadline - time.monotonic())
            if frame is None:
                break
            opcode, payload = frame
            if opcode != TEXT:
                continue
            message = json.loads(payload)
            got.append(message)
            if done(message):
                return got
        raise AssertionError(f"no final message; got {got}")

    def close(self) -> None:
        self.sock.close()
