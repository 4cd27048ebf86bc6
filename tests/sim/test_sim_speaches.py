"""The fake speaches behaves as tenants.md §7 says: /api/ps, load and unload with their
status codes, a model in use is never unloaded, models load on a request and leave after
their TTL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from supervisor.sim.gpu import GIB, MemoryGpu
from supervisor.sim.speaches import MODELS, FakeSpeaches, SpeachesConfig

WHISPER = "Systran/faster-whisper-large-v3"


@pytest.fixture
def sim() -> Iterator[tuple[FakeSpeaches, str, MemoryGpu]]:
    gpu = MemoryGpu(24 * GIB)
    # A request takes 3 s; models stay until unloaded (TTL -1).
    fake = FakeSpeaches(gpu, SpeachesConfig(time_scale=0.01, request_s=300.0, stt_ttl_s=-1))
    server = fake.serve()
    yield fake, server.url, gpu
    server.stop()
    fake.close()


def transcribe(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/audio/transcriptions",
        files={"file": ("a.wav", b"RIFF....", "audio/wav")},
        data={"model": WHISPER},
        timeout=30,
    )


def test_load_and_unload_answer_as_speaches_does(sim: tuple[FakeSpeaches, str, MemoryGpu]) -> None:
    _, url, gpu = sim
    assert httpx.get(f"{url}/health").json() == {"message": "OK"}
    assert httpx.get(f"{url}/api/ps").json() == {"models": []}
    r = httpx.post(f"{url}/api/ps/{WHISPER}")
    assert (r.status_code, r.content) == (201, b"")
    assert httpx.post(f"{url}/api/ps/{WHISPER}").status_code == 409
    assert httpx.post(f"{url}/api/ps/nobody/unknown").status_code == 404
    assert httpx.get(f"{url}/api/ps").json() == {"models": [WHISPER]}
    assert gpu.used_bytes() == MODELS[WHISPER]
    r = httpx.delete(f"{url}/api/ps/{WHISPER}")
    assert (r.status_code, r.json()) == (200, {"message": f"Model '{WHISPER}' unloaded"})
    assert gpu.used_bytes() == 0
    r = httpx.delete(f"{url}/api/ps/{WHISPER}")
    assert (r.status_code, r.text) == (404, "Model not found")


def test_a_request_loads_its_model_which_cannot_be_unloaded_while_in_use(
    sim: tuple[FakeSpeaches, str, MemoryGpu],
) -> None:
    fake, url, gpu = sim
    fake.config.stt_ttl_s = 100.0  # 1 s once idle
    out: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", transcribe(url)), daemon=True)
    thread.start()  # 300 s x 0.01 = 3 s
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/api/ps").json() != {"models": [WHISPER]}:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = httpx.delete(f"{url}/api/ps/{WHISPER}")
    assert (r.status_code, r.text) == (409, f"Model {WHISPER} is still in use. self.ref_count=1")
    thread.join(10)
    assert out["r"].json() == {"text": "simulated transcription"}
    assert gpu.used_bytes() == MODELS[WHISPER]
    # Idle now: its TTL (100 s x 0.01) unloads it by itself.
    deadline = time.monotonic() + 15
    while httpx.get(f"{url}/api/ps").json() != {"models": []}:
        assert time.monotonic() < deadline, "the TTL never unloaded the model"
        time.sleep(0.01)
    assert gpu.used_bytes() == 0 and fake.unloads == 1 and fake.refused == 1
