"""Fake Ollama and ComfyUI servers for the client tests.

Ollama is the simulator's own fake (`supervisor.sim.ollama`, the one model of Ollama the
whole project tests against), on a real socket; ComfyUI a hand-written function from
httpx.Request to httpx.Response that answers as /work/shared/reference/api-facts.md §2 says
(the same JSON shapes, the empty 200 of /free). Both are MockTransport handlers; canned
answers for odd or broken servers are handlers too. `serve()` puts any handler behind a real
HTTP server on 127.0.0.1 in a thread, so the same fake also answers over a socket.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx
import pytest
from tenacity import wait_none

from supervisor.clients._http import ServiceClient
from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient
from supervisor.sim.catalog import Catalog, ModelSpec
from supervisor.sim.gpu import open_gpu
from supervisor.sim.httpbase import Exchange, Route
from supervisor.sim.ollama import FakeOllama
from supervisor.sim.ollama_sched import ollama_config

Handler = Callable[[httpx.Request], httpx.Response]
C = TypeVar("C", bound=ServiceClient)

GIB = 1024**3
OLLAMA_URL = "http://ollama.test:11434"
COMFY_URL = "http://comfy.test:8188"


# --------------------------------------------------------------------------- Ollama

# The models the Ollama tests find installed: llama3.2 with no Modelfile context, qwen3:8b
# with `PARAMETER num_ctx 8192` (what `ollama show` then reports in `parameters`).
LLAMA = ModelSpec(
    "llama3.2:latest",
    2019393189,
    parameter_size="3.2B",
    block_count=28,
    embedding_length=3072,
    head_count=24,
    head_count_kv=8,
)
QWEN = ModelSpec(
    "qwen3:8b",
    5225376047,
    family="qwen3",
    block_count=36,
    context_length=40960,
    embedding_length=4096,
    head_count=32,
    head_count_kv=8,
    num_ctx=8192,
)


class SimOllama:
    """The simulator's fake Ollama (supervisor.sim) on a real socket on 127.0.0.1, a 24 GiB
    simulated GPU of its own and the catalog above; loads take no time.

    Calling it with an `httpx.Request` forwards the request to that server and returns its
    answer, so it is a MockTransport handler like the canned ones (and `Flaky` can wrap it),
    while the client under test keeps its own base URL in messages. Every request the server
    received is in `requests` as (method, path, JSON body or None).
    """

    def __init__(self, version: str = "0.12.5", models: tuple[ModelSpec, ...] = (LLAMA, QWEN)):
        self.gpu = open_gpu(None, 24 * GIB)
        self.catalog = Catalog(models=models)
        config = ollama_config(  # real time (a 5-minute keep-alive lasts 5 minutes)
            "2025", version=version, load_base_s=0.0, load_bytes_per_s=1e15, unload_delay_s=0.0
        )
        self.fake = FakeOllama(self.gpu, self.catalog, config)
        self.requests: list[tuple[str, str, Any]] = []
        self.server = self.fake.serve("127.0.0.1", 0)
        route = self.server.router

        def recording(method: str, path: str) -> Route | None:
            found = route(method, path)
            if found is None:
                return None

            def record(ex: Exchange) -> None:
                self.requests.append((ex.method, ex.path, ex.json()))
                found(ex)

            return record

        self.server.router = recording
        self.url = self.server.url
        self._http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def loaded(self) -> dict[str, tuple[int, int]]:
        """name -> (size, size_vram) of every model /api/ps would list."""
        return {r.name: (r.size_bytes, r.size_vram) for r in self.fake.sched.loaded()}

    def spec(self, name: str) -> ModelSpec:
        found = self.catalog.model(name)
        assert found is not None, name
        return found

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = self._http.send(
            self._http.build_request(
                request.method,
                request.url.raw_path.decode(),
                content=request.content,
                headers={"Content-Type": request.headers.get("Content-Type", "")},
            )
        )
        return httpx.Response(
            answer.status_code,
            content=answer.content,
            headers={"Content-Type": answer.headers.get("Content-Type", "")},
        )

    def close(self) -> None:
        self._http.close()
        self.server.stop()
        self.fake.close()


# --------------------------------------------------------------------------- ComfyUI


@dataclass
class FakeComfy:
    """ComfyUI 0.3.64 as api-facts §2 describes it, on a 24 GiB CUDA device."""

    vram_total: int = 25393692672
    driver_free: int = 17 * GIB
    torch_reserved: int = 3 * GIB
    torch_cached: int = 512 * 1024**2
    running: list[str] = field(default_factory=list)  # prompt ids
    pending: list[str] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)  # every /free body received
    interrupts: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)

    def stats_json(self) -> dict[str, Any]:
        return {
            "system": {
                "os": "posix",
                "ram_total": 67108864000,
                "ram_free": 50000000000,
                "comfyui_version": "0.3.64",
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.94",
                "required_templates_version": "0.1.94",
                "python_version": "3.12.3 (main, Feb  4 2025, 14:48:35) [GCC 13.3.0]",
                "pytorch_version": "2.8.0+cu128",
                "embedded_python": False,
                "argv": ["main.py", "--listen", "0.0.0.0"],
            },
            "devices": [
                {
                    "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
                    "type": "cuda",
                    "index": 0,
                    "vram_total": self.vram_total,
                    # vram_free counts torch's cache as free (api-facts 2.2)
                    "vram_free": self.driver_free + self.torch_cached,
                    "torch_vram_total": self.torch_reserved,
                    "torch_vram_free": self.torch_cached,
                }
            ],
        }

    def _item(self, number: int, prompt_id: str) -> list[Any]:
        return [
            number,
            prompt_id,
            {"3": {"class_type": "KSampler", "inputs": {}}},
            {"client_id": "x"},
            ["9"],
        ]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api")  # every route also lives under /api
        self.requests.append((request.method, path))
        route = (request.method, path)
        if route == ("GET", "/system_stats"):
            return httpx.Response(200, json=self.stats_json())
        if route == ("GET", "/queue"):
            return httpx.Response(
                200,
                json={
                    "queue_running": [self._item(i, p) for i, p in enumerate(self.running)],
                    "queue_pending": [self._item(100 + i, p) for i, p in enumerate(self.pending)],
                },
            )
        if route == ("POST", "/free"):
            try:
                body = json.loads(request.content)  # the handler calls request.json()
            except ValueError:
                return httpx.Response(
                    500, text="500 Internal Server Error\n\nServer got itself in trouble"
                )
            self.flags.append(body)
            return httpx.Response(200)  # always, at once, empty body
        if route == ("POST", "/interrupt"):
            self.interrupts += 1
            return httpx.Response(200)
        return httpx.Response(404, text="404: Not Found")


# --------------------------------------------------------------------------- wiring


@pytest.fixture
def sim_ollama() -> Iterator[Callable[..., SimOllama]]:
    """`make(version=..., models=...)`: a SimOllama, stopped at teardown."""
    made: list[SimOllama] = []

    def make(**kw: Any) -> SimOllama:
        made.append(SimOllama(**kw))
        return made[-1]

    yield make
    for sim in made:
        sim.close()


@pytest.fixture
def fake_ollama(sim_ollama: Callable[..., SimOllama]) -> SimOllama:
    return sim_ollama()


@pytest.fixture
def fake_comfy() -> FakeComfy:
    return FakeComfy()


def _client_factory(cls: type[C], base_url: str) -> Iterator[Callable[..., C]]:
    """A `make(handler, **kw)` that builds `cls` over a MockTransport (no retry wait) and
    closes every client it made at teardown."""
    made: list[C] = []

    def make(handler: Handler, **kw: Any) -> C:
        kw.setdefault("retry_wait", wait_none())
        client = cls(kw.pop("base_url", base_url), transport=httpx.MockTransport(handler), **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def ollama_client() -> Iterator[Callable[..., OllamaClient]]:
    yield from _client_factory(OllamaClient, OLLAMA_URL)


@pytest.fixture
def comfy_client() -> Iterator[Callable[..., ComfyClient]]:
    yield from _client_factory(ComfyClient, COMFY_URL)


class Flaky:
    """Raises the given transport errors on the first calls, then defers to `handler`."""

    def __init__(self, handler: Handler, *errors: type[httpx.TransportError]) -> None:
        self.handler = handler
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)("simulated", request=request)
        return self.handler(request)


@pytest.fixture
def flaky() -> type[Flaky]:
    return Flaky


@contextmanager
def _serve(handler: Handler, delay_s: float = 0.0) -> Iterator[str]:
    """Answer real HTTP on 127.0.0.1 (ephemeral port) with `handler`; yield the base URL."""
    stop = threading.Event()

    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            content = self.rfile.read(length) if length else b""
            request = httpx.Request(
                self.command,
                f"http://127.0.0.1{self.path}",
                headers=dict(self.headers),
                content=content,
            )
            if delay_s:
                stop.wait(delay_s)
            response = handler(request)
            body = response.read()
            self.send_response(response.status_code)
            for key, value in response.headers.items():
                if key.lower() not in {"content-length", "transfer-encoding", "connection"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def serve() -> Callable[..., Any]:
    return _serve
