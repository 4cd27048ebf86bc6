"""Ollama and ComfyUI for the client tests: the simulator's own fakes (`supervisor.sim`,
the one model of each service the whole project tests against) on real sockets.

Each is also a MockTransport handler (it forwards to its server), as are the canned answers
for odd, old or broken servers; `serve()` puts any handler behind a real HTTP server on
127.0.0.1 in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx
import pytest
from tenacity import wait_none

from supervisor.clients._http import ServiceClient
from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient
from supervisor.sim.catalog import Catalog, CheckpointSpec, ModelSpec
from supervisor.sim.comfyui import FakeComfyUI
from supervisor.sim.comfyui_worker import ComfyConfig
from supervisor.sim.gpu import SimGpu, open_gpu
from supervisor.sim.httpbase import Exchange, Route, SimServer
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


class SimService:
    """One of the simulator's fakes on a real socket on 127.0.0.1, with a 24 GiB simulated
    GPU of its own.

    Calling it with an `httpx.Request` forwards the request to that server and returns its
    answer, so it is a MockTransport handler like the canned ones (and `Flaky` can wrap it),
    while the client under test keeps its own base URL in messages. Every request the server
    received is in `requests` as (method, path, JSON body or None).
    """

    def __init__(self, fake: Any, server: SimServer, gpu: SimGpu) -> None:
        self.fake, self.server, self.gpu = fake, server, gpu
        self.requests: list[tuple[str, str, Any]] = []
        route = server.router

        def recording(method: str, path: str) -> Route | None:
            found = route(method, path)
            if found is None:
                return None

            def record(ex: Exchange) -> None:
                self.requests.append((ex.method, ex.path, ex.json()))
                found(ex)

            return record

        server.router = recording
        self.url = server.url
        self._http = httpx.Client(base_url=self.url, timeout=30)

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


class SimOllama(SimService):
    """The simulator's fake Ollama (`supervisor.sim.ollama`) of the 2025 generation with the
    catalog above; loads take no time, keep-alives run in real time."""

    def __init__(self, version: str = "0.12.5", models: tuple[ModelSpec, ...] = (LLAMA, QWEN)):
        gpu = open_gpu(None, 24 * GIB)
        self.catalog = Catalog(models=models)
        config = ollama_config(  # real time (a 5-minute keep-alive lasts 5 minutes)
            "2025", version=version, load_base_s=0.0, load_bytes_per_s=1e15, unload_delay_s=0.0
        )
        fake = FakeOllama(gpu, self.catalog, config)
        super().__init__(fake, fake.serve("127.0.0.1", 0), gpu)

    @property
    def loaded(self) -> dict[str, tuple[int, int]]:
        """name -> (size, size_vram) of every model /api/ps would list."""
        return {r.name: (r.size_bytes, r.size_vram) for r in self.fake.sched.loaded()}

    def spec(self, name: str) -> ModelSpec:
        found = self.catalog.model(name)
        assert found is not None, name
        return found


# A checkpoint whose job runs ten real minutes: a job stays running while a test looks.
SLOW = CheckpointSpec("slow.safetensors", 2 * GIB, seconds=600.0)


class SimComfy(SimService):
    """The simulator's fake ComfyUI (`supervisor.sim.comfyui`), 0.3.64 (2025) unless a
    profile says otherwise; its one checkpoint's jobs run for ten minutes."""

    def __init__(self, profile: str = "2025") -> None:
        gpu = open_gpu(None, 24 * GIB)
        fake = FakeComfyUI(gpu, Catalog(checkpoints=(SLOW,)), ComfyConfig.for_profile(profile))
        super().__init__(fake, fake.serve("127.0.0.1", 0), gpu)

    def submit(self) -> str:
        """Queue one job; returns its prompt id."""
        job = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SLOW.name}},
            "2": {"class_type": "KSampler", "inputs": {"steps": 20}},
            "3": {"class_type": "SaveImage", "inputs": {}},
        }
        answer = self._http.post("/prompt", json={"prompt": job})
        assert answer.status_code == 200, answer.text
        prompt_id: str = answer.json()["prompt_id"]
        return prompt_id

    def received(self, path: str) -> list[Any]:
        """The bodies of the requests that reached `path` (with or without /api)."""
        return [body for _, p, body in self.requests if p.removeprefix("/api") == path]


# --------------------------------------------------------------------------- wiring


@pytest.fixture
def sim_ollama() -> Iterator[Callable[..., SimOllama]]:
    """`make(version=..., models=...)`: a SimOllama, stopped at teardown."""
    made: list[SimService] = []

    def make(**kw: Any) -> SimOllama:
        sim = SimOllama(**kw)
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.close()


@pytest.fixture
def fake_ollama(sim_ollama: Callable[..., SimOllama]) -> SimOllama:
    return sim_ollama()


@pytest.fixture
def fake_comfy() -> Iterator[SimComfy]:
    sim = SimComfy()
    yield sim
    sim.close()


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
