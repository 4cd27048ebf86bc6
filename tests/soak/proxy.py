"""A fault-injecting HTTP proxy in front of one simulated service.

The supervisor (and, for Ollama, the gate) reach the service only through it, so the soak
can make the service misbehave the way real ones do without touching the service:

- `pass`:    forward the request (with `Connection: close` both ways: one request per
             connection, so a fault starting mid-run never meets a half-used connection);
- `down`:    accept and close at once (a crashed process behind a still-bound port);
- `hang`:    accept, read the request, never answer, until the fault ends (then close);
- `garbage`: answer 200 with a body that is not what the API says;
- `error`:   answer 500;
- `slow`:    wait `delay_s` (real seconds) before forwarding.

It also records every request that changes the service's state (ComfyUI `POST /free`,
Ollama unloads and preloads) with the time it arrived, so action storms are counted on the
service's side, whatever the supervisor's log says; and, for each request carrying the
soak's chat id (`CHAT_HEADER`), when it reached the service and when the service's answer
began, so a chat its client gave up on is told apart: lost on the way (by the gate), or
still waiting for the service.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "down", "hang", "garbage", "error", "slow")
CHAT_HEADER = "X-Soak-Chat"  # the soak's id of a chat, on its request
_HEAD_LIMIT = 64 * 1024


@dataclass
class Mutation:
    at: float  # time.monotonic()
    kind: str  # "free", "unload", "preload"


@dataclass
class ProxyStats:
    requests: int = 0
    faulted: int = 0
    mutations: list[Mutation] = field(default_factory=list)
    # chat id -> time.monotonic() it reached the service / the service's answer began
    # (or the proxy's fault answered it)
    chats_arrived: dict[str, float] = field(default_factory=dict)
    chats_answered: dict[str, float] = field(default_factory=dict)


class FaultProxy:
    """One listening port on 127.0.0.1, forwarding to `upstream` (host, port)."""

    def __init__(self, name: str, upstream: tuple[str, int], loop: asyncio.AbstractEventLoop):
        self.name = name
        self.upstream = upstream
        self.mode = "pass"
        self.delay_s = 0.0
        self.stats = ProxyStats()
        self._loop = loop
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def set(self, mode: str, delay_s: float = 0.0) -> None:
        """Change the mode (thread-safe); leaving `hang` closes the hung connections."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")

        def apply() -> None:
            if self.mode == "hang" and mode != "hang":
                self._release.set()
                self._release = asyncio.Event()
            self.mode, self.delay_s = mode, delay_s

        self._loop.call_soon_threadsafe(apply)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self.mode == "down":
                self.stats.faulted += 1
                return
            head, body = await _read_request(reader)
            if head is None:
                return
            self.stats.requests += 1
            chat = _header(head, CHAT_HEADER.lower().encode())
            if chat:
                self.stats.chats_arrived[chat] = time.monotonic()
            mode, delay = self.mode, self.delay_s
            if mode != "pass":
                self.stats.faulted += 1
            if mode == "hang":
                await self._release.wait()
                return
            if mode in ("garbage", "error") and chat:
                self.stats.chats_answered[chat] = time.monotonic()
            if mode == "garbage":
                _answer(writer, 200, b'{"models": [{"name": 17, "size": "lots"', "text/plain")
                await writer.drain()
                return
            if mode == "error":
                _answer(writer, 500, b'{"error": "injected failure"}', "application/json")
                await writer.drain()
                return
            if mode == "down":
                return
            if mode == "slow":
                await asyncio.sleep(delay)
            self._note(head, body)
            await self._forward(head, body, writer, chat)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _note(self, head: bytes, body: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) < 2 or parts[0] != "POST":
            return
        path = parts[1]
        kind = ""
        if path == "/free":
            kind = "free"
        elif path in ("/api/generate", "/api/chat"):
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                return
            if not isinstance(data, dict):
                return
            if data.get("keep_alive") in (0, "0", "0s", "0m"):
                kind = "unload"
            elif not data.get("prompt") and not data.get("messages"):
                kind = "preload"
        if kind:
            self.stats.mutations.append(Mutation(time.monotonic(), kind))

    async def _forward(
        self, head: bytes, body: bytes, writer: asyncio.StreamWriter, chat: str = ""
    ) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            return  # the service is down: the client sees the connection close, as then
        try:
            up_w.write(_with_close(head) + body)
            await up_w.drain()
            resp_head = await up_r.readuntil(b"\r\n\r\n")
            if chat:
                self.stats.chats_answered[chat] = time.monotonic()
            writer.write(_tagged(resp_head))
            while chunk := await up_r.read(65536):
                writer.write(chunk)
                await writer.drain()
            await writer.drain()
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            up_w.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes | None, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None, b""
    if len(head) > _HEAD_LIMIT:
        return None, b""
    headers = {}
    for raw in head.split(b"\r\n")[1:]:
        if b":" in raw:
            k, v = raw.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(data[:-2])
        body = b"".join(chunks)
        head = _set_header(
            _drop_header(head, b"transfer-encoding"), b"Content-Length", str(len(body)).encode()
        )
        return head, body
    length = int(headers.get(b"content-length", b"0") or 0)
    body = await reader.readexactly(length) if length else b""
    return head, body


def _header(head: bytes, name: bytes) -> str:
    """The value of header `name` (lower case) in `head`, "" when absent."""
    for raw in head.split(b"\r\n")[1:]:
        key, sep, value = raw.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""


def _drop_header(head: bytes, name: bytes) -> bytes:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [lines[0]] + [x for x in lines[1:] if x.split(b":", 1)[0].strip().lower() != name]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _set_header(head: bytes, name: bytes, value: bytes) -> bytes:
    head = _drop_header(head, name.lower())
    return head[:-2] + name + b": " + value + b"\r\n\r\n"


def _with_close(head: bytes) -> bytes:
    return _set_header(head, b"Connection", b"close")


UPSTREAM_HEADER = "X-Soak-Upstream"  # on every answer the service (or its fault) gave


def _tagged(head: bytes) -> bytes:
    return _set_header(_with_close(head), UPSTREAM_HEADER.encode(), b"1")


def _answer(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str) -> None:
    reason = {200: "OK", 500: "Internal Server Error"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{UPSTREAM_HEADER}: 1\r\n\r\n".encode()
        + body
    )


class ProxyLoop:
    """The event loop the proxies run on, in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="proxy")
        self._thread.start()
        self._proxies: list[FaultProxy] = []

    def proxy(self, name: str, upstream: tuple[str, int]) -> FaultProxy:
        proxy = FaultProxy(name, upstream, self.loop)
        asyncio.run_coroutine_threadsafe(proxy._start(), self.loop).result(10)
        self._proxies.append(proxy)
        return proxy

    def close(self) -> None:
        async def shutdown() -> None:
            for proxy in self._proxies:
                if proxy._server is not None:
                    proxy._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
