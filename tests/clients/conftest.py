"""Hand-written fake Ollama and ComfyUI servers for the client tests.

Each fake is a function from httpx.Request to httpx.Response that answers like the real
server does according to /work/shared/reference/api-facts.md (§1 Ollama, §2 ComfyUI):
the same JSON shapes, done_reason values, 404 error bodies and the empty 200 of /free.
`serve()` puts any such handler behind a real HTTP server on 127.0.0.1 in a thread, so
the same fake also answers over a socket.
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

Handler = Callable[[httpx.Request], httpx.Response]
C = TypeVar("C", bound=ServiceClient)

GIB = 1024**3
OLLAMA_URL = "http://ollama.test:11434"
COMFY_URL = "http://comfy.test:8188"


# --------------------------------------------------------------------------- Ollama


@dataclass
class Installed:
    name: str  # as /api/tags shows it (name:tag)
    size: int  # on-disk bytes (/api/tags)
    runner_size: int  # RAM + VRAM of a loaded runner (/api/ps size); all on GPU when loaded here
    arch: str = "llama"
    parameters: str = ""


@dataclass
class FakeOllama:
    """Ollama ≥ 0.12 as api-facts §1 describes it (loading is instant here)."""

    installed: dict[str, Installed] = field(default_factory=dict)
    loaded: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (size, size_vram)
    version: str = "0.12.5"
    has_context_length: bool = True  # False: v0.9.6 and older (no context_length in ps)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)

    def install(self, name: str, size: int, runner_size: int | None = None, **kw: Any) -> None:
        self.installed[name] = Installed(
            name, size, size if runner_size is None else runner_size, **kw
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        route = (request.method, request.url.path)
        if route == ("GET", "/"):
            return httpx.Response(200, text="Ollama is running")
        if route == ("GET", "/api/version"):
            return httpx.Response(200, json={"version": self.version})
        if route == ("GET", "/api/ps"):
            return httpx.Response(200, json={"models": [self._ps_entry(n) for n in self.loaded]})
        if route == ("GET", "/api/tags"):
            return httpx.Response(
                200, json={"models": [self._tag_entry(m) for m in self.installed.values()]}
            )
        if route == ("POST", "/api/show"):
            return self._show(body)
        if route == ("POST", "/api/generate"):
            return self._generate(body)
        return httpx.Response(404, text="404 page not found")

    def _find(self, name: str) -> Installed | None:
        if ":" not in name.rsplit("/", 1)[-1]:
            name += ":latest"
        return self.installed.get(name)

    def _not_found(self, name: str) -> httpx.Response:
        return httpx.Response(404, json={"error": f"model '{name}' not found"})

    def _details(self, m: Installed) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": m.arch,
            "families": [m.arch],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }

    def _ps_entry(self, name: str) -> dict[str, Any]:
        m = self.installed[name]
        size, size_vram = self.loaded[name]
        entry: dict[str, Any] = {
            "name": name,
            "model": name,
            "size": size,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": self._details(m),
            "expires_at": "2026-08-21T18:53:22.123-07:00",
            "size_vram": size_vram,
        }
        if self.has_context_length:
            entry["context_length"] = 4096
        return entry

    def _tag_entry(self, m: Installed) -> dict[str, Any]:
        return {
            "name": m.name,
            "model": m.name,
            "modified_at": "2026-08-01T10:00:00.000000000Z",
            "size": m.size,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": self._details(m),
        }

    def _show(self, body: Any) -> httpx.Response:
        name = (body or {}).get("model") or (body or {}).get("name") or ""
        if not name:
            return httpx.Response(400, json={"error": "model is required"})
        m = self._find(name)
        if m is None:
            return self._not_found(name)
        a = m.arch
        return httpx.Response(
            200,
            json={
                "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
                "modelfile": f"FROM /root/.ollama/models/blobs/sha256-x\n{m.parameters}",
                "parameters": m.parameters,
                "template": "{{ .Prompt }}",
                "details": self._details(m),
                "model_info": {
                    "general.architecture": a,
                    "general.file_type": 15,
                    "general.parameter_count": 3212749888,
                    f"{a}.attention.head_count": 24,
                    f"{a}.attention.head_count_kv": 8,
                    f"{a}.attention.key_length": 128,
                    f"{a}.attention.layer_norm_rms_epsilon": 0.00001,
                    f"{a}.attention.value_length": 128,
                    f"{a}.block_count": 28,
                    f"{a}.context_length": 131072,
                    f"{a}.embedding_length": 3072,
                    f"{a}.rope.freq_base": 500000,
                    "tokenizer.ggml.model": "gpt2",
                    "tokenizer.ggml.tokens": [],  # arrays > 5 are emptied without verbose
                },
                "tensors": [{"name": "token_embd.weight", "type": "Q6_K", "shape": [3072, 128256]}],
                "capabilities": ["completion", "tools"],
                "modified_at": "2026-08-01T10:00:00.000000000Z",
            },
        )

    def _generate(self, body: Any) -> httpx.Response:
        name = body.get("model", "")
        m = self._find(name)
        if m is None:
            return self._not_found(name)
        answer = {
            "model": m.name,
            "created_at": "2026-08-21T18:48:22.123Z",
            "response": "",
            "done": True,
        }
        if body.get("prompt"):
            raise AssertionError("the supervisor never sends prompts")
        if body.get("keep_alive") == 0:
            # Unload answers at once, even when the model is not loaded (api-facts 1.6).
            self.loaded.pop(m.name, None)
            return httpx.Response(200, json={**answer, "done_reason": "unload"})
        self.loaded[m.name] = (m.runner_size, m.runner_size)
        return httpx.Response(200, json={**answer, "done_reason": "load"})


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
def fake_ollama() -> FakeOllama:
    fake = FakeOllama()
    fake.install("llama3.2:latest", size=2019393189, runner_size=3400000000)
    fake.install(
        "qwen3:8b",
        size=5225376047,
        parameters='num_ctx                        8192\nstop "<|im_end|>"',
    )
    return fake


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
