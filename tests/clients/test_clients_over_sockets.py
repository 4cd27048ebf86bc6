"""Both clients over real sockets on 127.0.0.1: the fakes behind a threaded HTTP server,
a port nobody listens on, and a server slower than the timeout."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from tenacity import wait_none

from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient
from supervisor.errors import ServiceError
from supervisor.model import ComfyQueue


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connecting is refused


def test_ollama_round_trip_over_http(fake_ollama: Any) -> None:
    with OllamaClient(fake_ollama.url, retry_wait=wait_none()) as client:
        assert client.version() == "0.12.5"
        client.preload("llama3.2", timeout_s=30)
        (model,) = client.ps()
        assert (model.name, model.size_vram_bytes) == (
            "llama3.2:latest",
            fake_ollama.loaded["llama3.2:latest"][1],
        )
        assert model.size_vram_bytes > fake_ollama.spec("llama3.2").size_bytes  # weights + KV
        client.unload("llama3.2:latest")
        assert client.ps() == ()
        with pytest.raises(ServiceError, match="model 'ghost:latest' is not installed"):
            client.unload("ghost")


def test_comfy_round_trip_over_http(fake_comfy: Any) -> None:
    with ComfyClient(fake_comfy.url, retry_wait=wait_none()) as client:
        assert client.system_stats().vram_total_bytes == fake_comfy.gpu.total_bytes
        assert client.queue() == ComfyQueue(0, 0)
        client.free(unload_models=True, free_memory=True)
        client.interrupt()
    assert fake_comfy.received("/free") == [{"unload_models": True, "free_memory": True}]
    assert len(fake_comfy.received("/interrupt")) == 1


def test_connection_refused(serve: Any) -> None:
    port = _closed_port()
    with (
        OllamaClient(f"http://127.0.0.1:{port}", retry_wait=wait_none()) as client,
        pytest.raises(
            ServiceError, match=rf"^ollama at http://127.0.0.1:{port}: GET /api/ps: cannot connect"
        ),
    ):
        client.ps()
    with (
        ComfyClient(f"http://127.0.0.1:{port}", retry_wait=wait_none()) as comfy,
        pytest.raises(ServiceError, match=r"POST /free: cannot connect"),
    ):
        comfy.free(unload_models=True, free_memory=False)


def test_a_slow_server_times_out_and_a_preload_waits_longer(fake_ollama: Any, serve: Any) -> None:
    with (
        serve(fake_ollama, delay_s=0.5) as url,
        OllamaClient(url, timeout_s=0.1, retry_wait=wait_none()) as client,
    ):
        with pytest.raises(ServiceError, match=r"GET /api/ps timed out after 0.1 s"):
            client.ps()
        client.preload("qwen3:8b", timeout_s=10)  # the read timeout is the preload's own
    assert "qwen3:8b" in fake_ollama.loaded


def test_a_closed_client_raises_service_error_not_runtime_error(
    fake_ollama: Any, serve: Any
) -> None:
    """A gate thread may still hold the client of a service the observer replaced (its
    container was recreated); the call must fail inside the ServiceError contract."""
    with serve(fake_ollama) as url:  # the sim behind one more server, closed after the test
        client = OllamaClient(url, retry_wait=wait_none())
        assert client.ps() == ()
        client.close()
        with pytest.raises(ServiceError, match="the client was closed"):
            client.ps()
