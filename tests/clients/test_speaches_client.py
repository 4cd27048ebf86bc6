"""The speaches client against the fake speaches (supervisor/sim/speaches.py) over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from supervisor.clients.speaches import SpeachesClient
from supervisor.errors import ServiceError
from supervisor.model import ServedModel, ServedState
from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.speaches import MODELS, FakeSpeaches, SpeachesConfig

WHISPER = "Systran/faster-whisper-large-v3"
KOKORO = "speaches-ai/Kokoro-82M-v1.0-ONNX"


@pytest.fixture
def speaches() -> Iterator[tuple[FakeSpeaches, SpeachesClient]]:
    fake = FakeSpeaches(MemoryGpu(24 * GIB), SpeachesConfig(time_scale=1.0, request_s=1.0))
    server = fake.serve()
    client = SpeachesClient(server.url, timeout_s=5.0)
    yield fake, client
    client.close()
    server.stop()
    fake.close()


def test_loaded_models_and_their_unload(speaches: tuple[FakeSpeaches, SpeachesClient]) -> None:
    fake, client = speaches
    assert client.served() == ServedState((), can_unload=True)
    for model in (WHISPER, KOKORO):
        assert httpx.post(f"{client.base_url}/api/ps/{model}").status_code == 201
    assert client.served() == ServedState(
        (ServedModel(WHISPER, "loaded"), ServedModel(KOKORO, "loaded")), can_unload=True
    )
    assert fake.held_bytes() == MODELS[WHISPER] + MODELS[KOKORO]
    assert client.models() == (WHISPER, KOKORO)  # the loaded ones only
    assert client.busy(WHISPER) is False
    client.unload(WHISPER)
    assert client.served().models == (ServedModel(KOKORO, "loaded"),)
    assert fake.held_bytes() == MODELS[KOKORO]
    client.unload(WHISPER)  # not loaded any more (404): what was asked for, no error


def test_a_model_in_use_is_refused_with_a_clear_error(
    speaches: tuple[FakeSpeaches, SpeachesClient],
) -> None:
    fake, client = speaches
    url = client.base_url

    def speak() -> None:
        httpx.post(f"{url}/v1/audio/speech", json={"model": KOKORO, "input": "hi"}, timeout=10)

    thread = threading.Thread(target=speak, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while fake.loaded.get(KOKORO) is None or fake.loaded[KOKORO].ref_count == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    with pytest.raises(ServiceError) as info:
        client.unload(KOKORO)
    assert str(info.value).startswith(f"speaches at {url}: model {KOKORO} is in use")
    assert "HTTP 409" in str(info.value)
    assert client.served().models == (ServedModel(KOKORO, "loaded"),)
    thread.join(10)
    assert fake.requests_done == 1  # the request was not cut off
    client.unload(KOKORO)
    assert client.served().models == ()


def test_bad_answers_and_a_dead_server_are_service_errors() -> None:
    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"models": "whisper"})

    client = SpeachesClient("http://speaches.test:8000", transport=httpx.MockTransport(garbage))
    with client, pytest.raises(ServiceError, match="unexpected shape"):
        client.served()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = SpeachesClient(f"http://127.0.0.1:{port}", timeout_s=1.0, attempts=1)
    with dead, pytest.raises(ServiceError, match="cannot connect"):
        dead.unload(WHISPER)
