"""Real servers on 127.0.0.1 for the gate tests, and hand-written fakes of its seams.

- `Upstream`: a small fake Ollama HTTP server in a thread (api-facts §1: /api/ps, /api/tags,
  /api/show, the load endpoints with a load delay, NDJSON and SSE streams, 404 for a model
  not installed) plus pass-through helpers (/echo, /status/<n>). It records what reached
  it in a shared `Timeline`, notices client disconnects while it loads or streams, and
  can hold a stream between chunks until the test releases it.
- `FakeOllamaApi`: `ports.OllamaApi` over the same state (what the real client would read).
- `FakeRoom`: `ports.RoomMaker` that records its calls in the same timeline.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from supervisor.clients.ollama import normalise_model_name
from supervisor.gate import Gate
from supervisor.model import OllamaModel
from supervisor.ollama_profile import OllamaProfile
from supervisor.ports import LoadRoom, ModelFacts, TaggedModel

GIB = 1024**3
MIB = 1024**2


class Timeline:
    """What happened, in order, across threads: (what, detail)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: list[tuple[str, str]] = []

    def add(self, what: str, detail: str = "") -> None:
        with self._lock:
            self.entries.append((what, detail))

    def whats(self) -> list[str]:
        with self._lock:
            return [w for w, _ in self.entries]

    def index(self, what: str, detail: str | None = None) -> int:
        with self._lock:
            for i, (w, d) in enumerate(self.entries):
                if w == what and (detail is None or d == detail):
                    return i
        raise AssertionError(f"{what} {detail or ''} not in {self.entries}")


@dataclass
class Installed:
    name: str
    size: int  # /api/tags (on-disk)
    runner_size: int  # /api/ps size once loaded
    context_length: int = 4096  # what ps reports as the runner's context
    block_count: int = 28
    embedding_length: int = 3072
    head_count: int = 24
    head_count_kv: int = 8


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    timeline: Timeline
    installed: dict[str, Installed] = field(default_factory=dict)
    resident: set[str] = field(default_factory=set)
    load_s: float = 0.0
    # Models kept at once: a load beyond it evicts the others first, as Ollama does for a
    # model that does not fit beside them (None: no limit).
    max_resident: int | None = None
    chunks: int = 3
    hold: threading.Event | None = None  # set: streams go on after their first chunk
    close_after_each: bool = False  # drop keep-alive connections without saying so
    connections: int = 0  # TCP connections accepted
    requests: list[Recorded] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def install(self, name: str, size: int, runner_size: int, **kw: Any) -> None:
        self.installed[name] = Installed(name, size, runner_size, **kw)

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.upstream = self  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def record(self, rec: Recorded) -> None:
        with self.lock:
            self.requests.append(rec)
        self.timeline.add("upstream", f"{rec.method} {rec.path}")

    def paths(self) -> list[str]:
        with self.lock:
            return [r.path for r in self.requests]


class FakeOllamaApi:
    """`ports.OllamaApi` reading the Upstream's state directly."""

    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream
        self.base_url = ""
        self.ps_calls = 0
        self.fail = False

    def version(self) -> str:
        return "0.12.5"

    def ps(self) -> tuple[OllamaModel, ...]:
        self.ps_calls += 1
        if self.fail:
            from supervisor.errors import ServiceError

            raise ServiceError("ollama", "connection refused")
        with self.up.lock:
            names = sorted(self.up.resident)
        models = []
        for name in names:
            m = self.up.installed[name]
            models.append(OllamaModel(name, m.runner_size, m.runner_size, "", m.context_length))
        return tuple(models)

    def tags(self) -> tuple[TaggedModel, ...]:
        return tuple(TaggedModel(m.name, m.size) for m in self.up.installed.values())

    def show(self, model: str) -> ModelFacts:
        m = self.up.installed[normalise_model_name(model)]
        return ModelFacts(
            name=m.name,
            context_length=131072,
            block_count=m.block_count,
            embedding_length=m.embedding_length,
            head_count=m.head_count,
            head_count_kv=m.head_count_kv,
        )

    def unload(self, model: str) -> None:
        with self.up.lock:
            self.up.resident.discard(normalise_model_name(model))

    def preload(self, model: str, timeout_s: float, keep_alive: int | str | None = None) -> None:
        raise NotImplementedError


@dataclass
class RoomCall:
    need_bytes: int
    reason: str
    deadline_s: float


class FakeRoom:
    """`ports.RoomMaker`: reports `free`; make_room records, optionally blocks on `block`
    or sleeps up to its deadline, then returns `result`."""

    def __init__(self, timeline: Timeline, free: int | None = 0) -> None:
        self.timeline = timeline
        self.free = free
        self.profile: OllamaProfile | None = None  # None: the gate's own defaults
        self.result = True
        self.block: threading.Event | None = None
        self.sleep_to_deadline = False
        self.frees: int | None = None  # set: make_room leaves this much free
        self.calls: list[RoomCall] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def room_for(self, need_bytes: int) -> LoadRoom | None:
        return None if self.free is None else LoadRoom(self.free)

    def load_profile(self) -> OllamaProfile | None:
        return self.profile

    def make_room(self, need_bytes: int, *, reason: str, deadline_s: float) -> bool:
        self.timeline.add("make_room", reason)
        with self._lock:
            self.calls.append(RoomCall(need_bytes, reason, deadline_s))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.block is not None:
                self.block.wait(20)
            if self.sleep_to_deadline:
                time.sleep(deadline_s)
        finally:
            with self._lock:
                self.active -= 1
        if self.frees is not None:
            self.free = self.frees
        self.timeline.add("room_made" if self.result else "room_not_made", reason)
        return self.result  # `free` stays: the load that follows takes the room


# --------------------------------------------------------------------------- handler

_NATIVE = {"/api/generate", "/api/chat"}
_LOADS = _NATIVE | {
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/audio/transcriptions",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.up.lock:
            self.up.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def up(self) -> Upstream:
        return self.server.upstream  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    # ------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.read(2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self, status: int, body: bytes, ctype: str = "application/json", **extra: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def _is_gone(self) -> bool:
        sock = self.connection
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return bool(sock.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _wait(self, seconds: float | None, event: threading.Event | None, what: str) -> bool:
        """Sleep `seconds` or until `event`; False (recorded) when the client went away."""
        end = time.monotonic() + (seconds if seconds is not None else 20.0)
        while time.monotonic() < end:
            if event is not None and event.is_set():
                return True
            if self._is_gone():
                self.up.disconnects.append(what)
                self.up.timeline.add("disconnect", what)
                self.up.disconnected.set()
                return False
            time.sleep(0.01)
        return True

    # ------------------------------------------------------------------ routes

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        body = self._read_body()
        self.up.record(
            Recorded(self.command, parts.path, parts.query, list(self.headers.items()), body)
        )
        path = parts.path
        if self.up.close_after_each:
            self.close_connection = True
        if path == "/api/ps":
            models = [
                {
                    "name": n,
                    "model": n,
                    "size": self.up.installed[n].runner_size,
                    "size_vram": self.up.installed[n].runner_size,
                }
                for n in sorted(self.up.resident)
            ]
            self._json(200, {"models": models})
        elif path == "/api/tags":
            self._json(
                200,
                {
                    "models": [
                        {"name": m.name, "model": m.name, "size": m.size}
                        for m in self.up.installed.values()
                    ]
                },
            )
        elif path == "/api/show":
            name = normalise_model_name(json.loads(body).get("model", ""))
            if name not in self.up.installed:
                self._json(404, {"error": f"model '{name}' not found"})
            else:
                self._json(200, {"model_info": {"general.architecture": "llama"}})
        elif path == "/echo":
            self._send(
                200,
                json.dumps(
                    {
                        "method": self.command,
                        "path": path,
                        "query": parts.query,
                        "body": body.decode("latin-1"),
                    }
                ).encode(),
                X_Upstream="yes",
            )
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            self._send(status, json.dumps({"error": f"status {status}"}).encode(), X_Why="test")
        elif path in _LOADS and self.command == "POST":
            self._load(path, body)
        else:
            self._json(404, {"error": "404 page not found"})

    def _load(self, path: str, body: bytes) -> None:
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            model = body.split(b'name="model"\r\n\r\n', 1)[1].split(b"\r\n")[0].decode()
            data: dict[str, Any] = {"model": model}
        else:
            try:
                data = json.loads(body)
            except ValueError:
                self._json(400, {"error": "invalid character 'o' in literal null"})
                return
        name = normalise_model_name(data.get("model", ""))
        if name not in self.up.installed:
            self._json(404, {"error": f"model '{name}' not found"})
            return
        if (
            path in _NATIVE
            and data.get("keep_alive") == 0
            and not (data.get("prompt") or data.get("messages"))
        ):
            with self.up.lock:
                self.up.resident.discard(name)
            self._json(200, {"model": name, "response": "", "done": True, "done_reason": "unload"})
            return
        with self.up.lock:
            is_loaded = name in self.up.resident
        if not is_loaded:
            with self.up.lock:
                cap = self.up.max_resident
                if cap is not None and len(self.up.resident) >= cap:
                    for gone in sorted(self.up.resident):
                        self.up.timeline.add("evicted", gone)
                    self.up.resident.clear()
            self.up.timeline.add("load_start", name)
            if not self._wait(self.up.load_s, None, f"load {name}"):
                return
            with self.up.lock:
                self.up.resident.add(name)
            self.up.timeline.add("loaded", name)
        sse = path.startswith("/v1/")
        if not data.get("stream", not sse) or "embed" in path:
            self._json(200, {"model": name, "response": "hi", "done": True})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if sse else "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(self.up.chunks):
            if (
                i > 0
                and self.up.hold is not None
                and not self._wait(None, self.up.hold, f"stream {name}")
            ):
                return
            piece = json.dumps({"model": name, "response": f"t{i}", "done": False})
            line = (f"data: {piece}\n\n" if sse else piece + "\n").encode()
            self.up.timeline.add("chunk", str(i))  # before: the client may read it at once
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            except OSError:
                self.up.disconnects.append(f"stream {name}")
                self.up.disconnected.set()
                return
        tail = b"data: [DONE]\n\n" if sse else b'{"done":true}\n'
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
        self.up.timeline.add("stream_end", name)


# --------------------------------------------------------------------------- wiring


@dataclass
class Env:
    timeline: Timeline
    upstream: Upstream
    api: FakeOllamaApi
    room: FakeRoom
    gate: Gate

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gate.port}"


def raw_gate(upstream_url: str, upstream: Upstream, timeline: Timeline, **kw: Any) -> Gate:
    """A started gate in front of `upstream_url` (a scripted raw upstream, rawnet.py) that
    asks `upstream`'s state for /api/ps and the like."""
    gate = Gate(
        upstream_url=upstream_url,
        ollama=FakeOllamaApi(upstream),
        room=FakeRoom(timeline),
        port=0,
        wait_s=2.0,
        **kw,
    )
    gate.start()
    return gate


def make_env(timeline: Timeline, upstream: Upstream, **gate_kw: Any) -> Env:
    api = FakeOllamaApi(upstream)
    room = FakeRoom(timeline)
    kw: dict[str, Any] = {"upstream_url": upstream.url, "wait_s": 5.0}
    kw.update(gate_kw)
    kw.setdefault("port", 0)
    gate = Gate(ollama=api, room=room, **kw)
    return Env(timeline, upstream, api, room, gate)
